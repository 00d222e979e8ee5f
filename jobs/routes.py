"""HTTP routes for training jobs, under /rewardtune/ (ComfyUI also serves them under /api/):

    GET  /rewardtune/jobs                     every job's status (newest first, at most 200)
    GET  /rewardtune/jobs/{id}?since=&limit=  one job's status and metric lines (at most 5000)
    POST /rewardtune/jobs/{id}/cancel         stop after the current step (harmless when it ended)
    POST /rewardtune/jobs/{id}/resume         queue the job's graph again: it resumes from its checkpoint
    POST /rewardtune/jobs/{id}/remove         delete an ended job's folder (never a queued or running one)

Websocket events (``send_sync`` to every client): ``rewardtune.job`` (a job's status changed),
``rewardtune.progress`` (one per optimizer step: id, step, steps, metrics) and
``rewardtune.removed`` (``{"id"}``: a job was removed).

Answers:

* **404** (text): an id that names no job, whatever is wrong with it: unknown, malformed, or a
  traversal attempt however encoded (``..%2F..%2Fx``, ``%2E%2E``, ``..%5Cx``, double-encoded…).
  Ids are checked against an allow-list (letters, digits, - and _) before any file is touched:
  aiohttp decodes %2F and %2E before routing, so ``../x`` does reach the handler, and an id it
  cannot route gets aiohttp's own 404. The id is not echoed back.
* **400** (text): a bad query value (``since``, ``limit``).
* **500** (text): a remove whose folder could not be moved away (the job is kept as it was).
* **409** (text): a resume whose graph is missing or no longer validates; a remove of a queued or
  running job (cancel it first, and wait until it is stopped).
* **200** (JSON): cancel ``{"id", "state"}``; resume ``{"id", "state", "queued": false}`` when the
  job is already queued or running, else ``{"id", "state", "queued": true, "prompt_id", "number"}``;
  remove ``{"id", "removed": true}``.

Resume queues the job's stored graph (a clean copy of what the user queued, see
``manager.api_prompt``) through the same steps as ComfyUI's ``POST /prompt``. It takes an optional
JSON body ``{"client_id": "..."}``: that client then gets the prompt's progress messages, as when
it queues a prompt itself.
"""
from __future__ import annotations

import time
import uuid

from aiohttp import web

from .manager import JOB_ID, JobError, get_manager

MAX_LIST = 200
MAX_METRICS = 5000


def _job_or_404(request):
    job_id = request.match_info.get("job_id", "")
    job = get_manager().get(job_id) if JOB_ID.match(job_id) else None
    if job is None:  # the same answer for a malformed id: one status, the id is not echoed back
        raise web.HTTPNotFound(text="no such training job: ids are letters, digits, - and _ (GET /rewardtune/jobs "
                                    "lists them)", content_type="text/plain")
    return job


def _int(request, name: str, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(request.query.get(name, default))))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number", content_type="text/plain")


async def queue_prompt(server, prompt: dict, client_id: str | None = None) -> tuple[str, float]:
    """Queue an API prompt the way ComfyUI's ``POST /prompt`` does (server.py, ``post_prompt``),
    through the same public calls in the same order: the ``on_prompt`` handlers extensions
    registered, the queue number, node replacements, validation, the queue entry. Returns
    (prompt_id, number); a graph that does not validate raises 409 with ComfyUI's message."""
    import execution
    json_data = server.trigger_on_prompt({"prompt": prompt, **({"client_id": client_id} if client_id else {})})
    if "number" in json_data:
        number = float(json_data["number"])
    else:  # as POST /prompt: the server's counter orders the queue
        number = server.number
        server.number += 1
    prompt = json_data.get("prompt", prompt)
    replacements = getattr(server, "node_replace_manager", None)
    if replacements is not None:
        replacements.apply_replacements(prompt)
    prompt_id = str(uuid.uuid4())
    valid = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid[0]:
        error = valid[1].get("message", valid[1]) if isinstance(valid[1], dict) else valid[1]
        raise web.HTTPConflict(text=f"the job's graph no longer validates ({error}): load its workflow, fix it and "
                                    "queue it again", content_type="text/plain")
    extra_data = dict(json_data.get("extra_data") or {})
    if "client_id" in json_data:
        extra_data["client_id"] = json_data["client_id"]
    sensitive = {k: extra_data.pop(k) for k in getattr(execution, "SENSITIVE_EXTRA_DATA_KEYS", ()) if k in extra_data}
    extra_data["create_time"] = int(time.time() * 1000)
    server.prompt_queue.put((number, prompt_id, prompt, extra_data, valid[2], sensitive))
    return prompt_id, number


async def resume(server, job, client_id: str | None = None) -> dict:
    """Queue the graph that started the job: the trainer node finds the same job (same
    fingerprint) and resumes it from its checkpoint."""
    if job.state in ("queued", "running"):
        return {"id": job.id, "state": job.state, "queued": False}
    if not job.prompt:
        raise web.HTTPConflict(text=f"job {job.id} has no stored graph: queue its workflow again to resume it",
                               content_type="text/plain")
    prompt_id, number = await queue_prompt(server, job.prompt, client_id)
    return {"id": job.id, "state": job.state, "queued": True, "prompt_id": prompt_id, "number": number}


async def _client_id(request) -> str | None:
    """The optional ``client_id`` of a JSON body (the panel may send none, or no body at all)."""
    if not request.can_read_body:
        return None
    try:
        body = await request.json()
    except ValueError:
        return None
    client_id = body.get("client_id") if isinstance(body, dict) else None
    return client_id if isinstance(client_id, str) else None


def register(server) -> None:
    routes = server.routes

    @routes.get("/rewardtune/jobs")
    async def list_jobs(request):
        return web.json_response({"jobs": [j.status() for j in get_manager().jobs()[:MAX_LIST]]})

    @routes.get("/rewardtune/jobs/{job_id}")
    async def job_status(request):
        job = _job_or_404(request)
        since = _int(request, "since", 0, 0, 10 ** 9)
        limit = _int(request, "limit", 1000, 1, MAX_METRICS)
        return web.json_response({"job": job.status(), "metrics": job.metrics(since, limit)})

    @routes.post("/rewardtune/jobs/{job_id}/cancel")
    async def job_cancel(request):
        job = get_manager().cancel(_job_or_404(request).id)
        return web.json_response({"id": job.id, "state": job.state})

    @routes.post("/rewardtune/jobs/{job_id}/resume")
    async def job_resume(request):
        job = _job_or_404(request)
        return web.json_response(await resume(server, job, await _client_id(request)))

    @routes.post("/rewardtune/jobs/{job_id}/remove")
    async def job_remove(request):
        job = _job_or_404(request)
        try:
            get_manager().remove(job.id)
        except KeyError:  # removed by another request meanwhile
            raise web.HTTPNotFound(text="no such training job", content_type="text/plain")
        except JobError as e:
            raise web.HTTPConflict(text=str(e), content_type="text/plain")
        except OSError as e:  # the folder could not be moved away: the job is kept as it was
            raise web.HTTPInternalServerError(text=f"job {job.id} could not be removed ({e.strerror}); it is "
                                                   "kept as it was", content_type="text/plain")
        return web.json_response({"id": job.id, "removed": True})
