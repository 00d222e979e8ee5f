"""HTTP routes for training jobs, under /rewardtune/ (ComfyUI also serves them under /api/):

    GET  /rewardtune/jobs                     every job's status (newest first, at most 200)
    GET  /rewardtune/jobs/{id}?since=&limit=  one job's status and metric lines (at most 5000)
    POST /rewardtune/jobs/{id}/cancel         stop after the current step (harmless when it ended)
    POST /rewardtune/jobs/{id}/resume         queue the job's graph again: it resumes from its checkpoint

Websocket events (``send_sync`` to every client): ``rewardtune.job`` (a job's status changed) and
``rewardtune.progress`` (one per optimizer step: id, step, steps, metrics).

Status codes: an id that names no job answers **404**, whatever is wrong with it: unknown, malformed,
or a traversal attempt however encoded (``..%2F..%2Fx``, ``%2E%2E``, ``..%5Cx``, double-encoded…).
Ids are checked against an allow-list (letters, digits, - and _) before any file is touched: aiohttp
decodes %2F and %2E before routing, so ``../x`` does reach the handler, and an id it cannot route
gets aiohttp's own 404. 400 is kept for bad query values (``since``, ``limit``); 409 for a resume
that cannot be queued.
"""
from __future__ import annotations

import time
import uuid

from aiohttp import web

from .manager import JOB_ID, get_manager

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


async def resume(server, job) -> dict:
    """Queue the prompt that started the job, validated like POST /prompt: the trainer node finds
    the same job (same fingerprint) and resumes it from its checkpoint."""
    import execution
    if job.state in ("queued", "running"):
        return {"id": job.id, "state": job.state, "queued": False}
    if not job.prompt:
        raise web.HTTPConflict(text=f"job {job.id} has no stored graph: queue its workflow again to resume it",
                               content_type="text/plain")
    prompt_id = str(uuid.uuid4())
    valid = await execution.validate_prompt(prompt_id, job.prompt, None)
    if not valid[0]:
        raise web.HTTPConflict(text=f"the job's graph no longer validates ({valid[1].get('message', valid[1])}): "
                                    "load its workflow, fix it and queue it again", content_type="text/plain")
    number = server.number
    server.number += 1
    server.prompt_queue.put((number, prompt_id, job.prompt, {"create_time": int(time.time() * 1000)}, valid[2], {}))
    return {"id": job.id, "state": job.state, "queued": True, "prompt_id": prompt_id}


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
        return web.json_response(await resume(server, _job_or_404(request)))
