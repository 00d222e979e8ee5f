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
* **409** (text): a resume whose graph is missing or no longer validates (ComfyUI's message and its
  node errors); a remove of a queued or running job (cancel it first, and wait until it is stopped).
* **502** (text): ComfyUI's ``POST /prompt`` answered a resume with neither a queued prompt nor a
  validation error (e.g. an extension's middleware refused it): its status and text.
* **200** (JSON): cancel ``{"id", "state"}``; resume ``{"id", "state", "queued": false}`` when the
  job is already queued or running, else ``{"id", "state", "queued": true, "prompt_id", "number"}``;
  remove ``{"id", "removed": true}``.

Resume posts the job's stored graph (a clean copy of what the user queued, see
``manager.api_prompt``) to ComfyUI's own ``POST /prompt``, over the server's HTTP interface, as the
frontend queues a prompt. It takes an optional JSON body ``{"client_id": "..."}``: that client then
gets the prompt's progress messages, as when it queues a prompt itself.
"""
from __future__ import annotations

import json

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


async def queue_prompt(request, prompt: dict, client_id: str | None = None) -> tuple[str, float]:
    """Queue an API prompt through ComfyUI's public ``POST /prompt``, over this server's own HTTP
    interface: posted to the socket ``request`` came in on, as the frontend posts a prompt, so
    ComfyUI's handler does every step (``on_prompt`` handlers, the queue number, node replacements,
    validation, the queue entry) as for any client, whatever its version does. The caller's cookie
    and authorization go along (a login extension sees the same user). Returns (prompt_id, number);
    a graph that no longer validates raises 409 with ComfyUI's message and its node errors."""
    import aiohttp
    import yarl
    host, port = request.transport.get_extra_info("sockname")[:2]
    tls = request.transport.get_extra_info("sslcontext") is not None
    url = yarl.URL.build(scheme="https" if tls else "http", host=host, port=port, path="/prompt")
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("cookie", "authorization")}
    body = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
    # ssl=False: the server's own socket, whose certificate may be self-signed (--tls-keyfile)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.post(url, json=body, headers=headers, ssl=False) as res:
            status, text = res.status, await res.text()
    answer = _json_or_none(text)
    if status == 200 and isinstance(answer, dict) and "prompt_id" in answer:
        return answer["prompt_id"], answer.get("number")
    if status == 400 and isinstance(answer, dict):
        raise web.HTTPConflict(text=f"the job's graph no longer validates ({_validation_error(answer)}): load its "
                                    "workflow, fix it and queue it again", content_type="text/plain")
    raise web.HTTPBadGateway(text=f"ComfyUI's POST /prompt answered {status}: {text[:500]}",
                             content_type="text/plain")


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _validation_error(answer: dict) -> str:
    """ComfyUI's answer to a prompt that does not validate, in one line: its message, then each
    node's errors (they name the input)."""
    error = answer.get("error")
    parts = [error.get("message", "") if isinstance(error, dict) else str(error or "")]
    for node_id, node in (answer.get("node_errors") or {}).items():
        for e in node.get("errors", []) if isinstance(node, dict) else ():
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {e.get('message', '')}: "
                         f"{e.get('details', '')}".rstrip(": "))
    return "; ".join(p for p in parts if p)


async def resume(request, job, client_id: str | None = None) -> dict:
    """Queue the graph that started the job: the trainer node finds the same job (same
    fingerprint) and resumes it from its checkpoint."""
    if job.state in ("queued", "running"):
        return {"id": job.id, "state": job.state, "queued": False}
    if not job.prompt:
        raise web.HTTPConflict(text=f"job {job.id} has no stored graph: queue its workflow again to resume it",
                               content_type="text/plain")
    prompt_id, number = await queue_prompt(request, job.prompt, client_id)
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
        return web.json_response(await resume(request, job, await _client_id(request)))

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
