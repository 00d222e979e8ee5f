"""Background training jobs: one manager per server, one job trains at a time, the rest wait.

A job lives in a folder of its own under ComfyUI's output folder and survives a restart:

    output/rewardtune/jobs/<job id>/
        job.json          name, state, step, error, fingerprint, the prompt that started it
        config.json       the TrainConfig
        metrics.jsonl     one JSON line per optimizer step
        checkpoint.pt     LoRA + optimizer + RNG (written atomically by the engine)
        lora.safetensors  the final LoRA

The manager owns a trained LoRA's way into the graph: ``publish`` copies the final LoRA (or a
mid-training checkpoint's, as ``<job id>-latest``) into ``models/loras/rewardtune/`` and
``lora_name`` is the name LoraLoader lists it under. ``remove`` deletes an ended job's folder
(event ``rewardtune.removed``).

The job id is the job name plus a fingerprint of everything that defines the run (config, data,
prompts, models): queueing the same graph again finds the same job and attaches to it (running),
returns it (finished) or resumes it from its checkpoint (stopped, failed, interrupted by a server
restart); a changed config gives another id, so a new job.

Threads: the worker thread trains (outside inference mode, on its own copies of inference
tensors); nodes and routes only read job state and set a job's own cancel event. ComfyUI's
process-wide interrupt flag is never read here: a node in *wait* mode watches it on its own
thread and cancels its job (see nodes/trainer.py).
"""
from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..trainers.atomic import atomic_write
from ..trainers.config import TrainConfig
from ..trainers.history import rewrite_log

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}\Z")  # \Z: "$" would accept a trailing newline
ACTIVE = ("queued", "running")                            # a job in these states holds the worker or waits
ENDED = ("finished", "stopped", "failed", "interrupted")  # these can be resumed or removed
BROKEN = "broken"  # a folder whose job.json or config.json cannot be read: listed to be removed or re-queued
LORA_FOLDER = "rewardtune"  # published LoRAs: <first loras folder>/rewardtune/, listed as rewardtune/<file>
MAX_QUEUED = 4
log = logging.getLogger("rewardtune.jobs")


class JobError(RuntimeError):
    """A job request that cannot be served, with what to do about it."""


def slug(name: str) -> str:
    """A job name as the readable part of an id: letters, digits, - and _ only (no path tricks)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", name.strip()).strip("-_")[:48]
    if not s:
        raise JobError(f"job name {name!r} has no letters or digits: give the job a name such as 'hps-run'")
    return s


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def api_prompt(prompt) -> dict | None:
    """A clean copy of an API prompt, as a client queues it: per node its ``class_type``, ``inputs``
    and ``_meta``, nothing the executor added. ComfyUI writes ``"is_changed": [NaN]`` into the
    prompt it executes (nodes with a fingerprint function); queued again, that stored value stands in
    for the node's fingerprint and the whole graph comes from the output cache: the job would
    never resume."""
    if not isinstance(prompt, dict):
        return None
    return {str(node_id): {k: copy.deepcopy(node[k]) for k in ("class_type", "inputs", "_meta") if k in node}
            for node_id, node in prompt.items() if isinstance(node, dict) and "class_type" in node}


def checkpoint_step(path: str) -> int:
    """The step saved in a checkpoint, read through mmap: the optimizer state and an SQDF replay
    buffer (gigabytes) stay on disk."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or step < 0:
        raise ValueError("it holds no step")
    return step


def resume_step(job: "Job") -> tuple[int, str | None]:
    """(the step a resume of ``job`` starts from, what is wrong with its checkpoint): its
    checkpoint's step and None, 0 and None without one; an unreadable checkpoint gives 0 and an
    error that says what to do."""
    if not os.path.exists(job.checkpoint):
        return 0, None
    try:
        return checkpoint_step(job.checkpoint), None
    except Exception as e:
        log.warning("RewardTune: job %s: cannot read its checkpoint: %s", job.id, e)
        return 0, (f"its checkpoint cannot be read ({type(e).__name__}): delete {job.checkpoint} to train "
                   "this job again from step 0, or queue the workflow with another job name")


@dataclass
class JobSpec:
    """Everything one run needs. ``run(job)`` trains (calls the engine) and returns the final step;
    it receives the job to read ``job.cancel`` and report with ``job.report(metrics)``."""
    name: str
    config: TrainConfig
    fingerprint: str
    run: Callable[["Job"], int]
    prompt: dict | None = None                  # the API prompt that started it (shown in the panel)


@dataclass
class Job:
    id: str
    dir: str
    name: str
    config: TrainConfig
    fingerprint: str
    state: str = "queued"
    step: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    prompt: dict | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    spec: JobSpec | None = field(default=None, repr=False)
    last: dict = field(default_factory=dict)    # the newest metrics line
    preview: str | None = None                  # the newest sample image (samples/step_XXXXXX.png)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ---- files
    @property
    def checkpoint(self) -> str:
        return os.path.join(self.dir, "checkpoint.pt")

    @property
    def lora(self) -> str:
        return os.path.join(self.dir, "lora.safetensors")

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.dir, "metrics.jsonl")

    def status(self) -> dict:
        known = self.state != BROKEN  # a broken folder's settings are not known: none are shown
        return {"id": self.id, "name": self.name, "state": self.state, "step": self.step,
                "steps": self.config.steps if known else 0, "objective": self.config.objective if known else None,
                "error": self.error, "created": self.created, "updated": self.updated, "last": self.last,
                "has_checkpoint": os.path.exists(self.checkpoint),
                "config": json.loads(self.config.to_json()) if known else None, "preview": self.preview}

    def save(self) -> None:
        self.updated = time.time()
        data = {k: v for k, v in self.status().items() if k not in ("has_checkpoint", "config", "last", "preview")}
        data.update(fingerprint=self.fingerprint, prompt=self.prompt)
        write_text(os.path.join(self.dir, "job.json"), json.dumps(data, indent=1))

    def read_metrics(self) -> tuple[list[dict], list[int]]:
        """(rows, numbers of the lines skipped). A line that is not a JSON object with a whole
        ``step`` (half-written by a crash or a full disk mid-append) is skipped, never raised."""
        rows, torn = [], []
        try:
            with open(self.metrics_file, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                            raise ValueError("not a metrics row")
                    except ValueError:
                        torn.append(n)
                        continue
                    rows.append(row)
        except FileNotFoundError:
            pass
        return rows, torn

    def metrics(self, since: int = 0, limit: int = 1000) -> list[dict]:
        """Metric lines with step > since, at most ``limit`` (the newest when there are more)."""
        rows = [r for r in self.read_metrics()[0] if r["step"] > since]
        return rows[-limit:]

    def warn_torn(self, torn: list[int]) -> None:
        if torn:
            log.warning("RewardTune: job %s: skipping %d torn line(s) in metrics.jsonl (line %s; a crash or a "
                        "full disk mid-write); the other lines are kept", self.id, len(torn),
                        ", ".join(map(str, torn[:5])))

    def restart_metrics(self, history: list[dict]) -> None:
        """Before a run: metrics.jsonl rewritten as ``history``, the metrics its checkpoint holds
        (empty without one), as the CLI does (``trainers.history.rewrite_log``). A resumed run
        repeats the steps after its checkpoint; a torn line (a crash or a full disk mid-append)
        may be a step only the history still holds, and the next line would be appended to it."""
        self.warn_torn(self.read_metrics()[1])
        rewrite_log(self.metrics_file, history)
        self.step, self.last = (int(history[-1]["step"]), history[-1]) if history else (0, {})

    def report(self, metrics: dict) -> None:
        """Called by the run after every optimizer step."""
        with self._lock:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            self.step, self.last = int(metrics["step"]), metrics


class JobManager:
    def __init__(self, root: str, lora_dir: str | None = None,
                 notify: Callable[[str, dict], None] | None = None):
        self.root, self.lora_dir = root, lora_dir
        self.notify = notify or (lambda event, data: None)
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        os.makedirs(root, exist_ok=True)
        self._scan()

    # ---- registry
    def _scan(self) -> None:
        """Jobs left on disk by an earlier server: listed; a job that was queued or running when the
        server stopped is marked interrupted (resumable from its checkpoint). A damaged folder (a
        torn job.json, an unreadable config) is listed as ``broken`` with what is wrong and what to
        do (``_broken``), alone: it never hides the other jobs, nor stops the server or the pack
        from starting."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            log.warning("RewardTune: cannot list the jobs folder %s: %s", self.root, e)
            return
        for name in names:
            if name.startswith(".removed-"):  # a removal the last server did not finish
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                continue
            try:
                job = self._load(name)
            except Exception as e:  # a damaged job folder must not stop the server from starting
                log.warning("RewardTune: job folder %s is damaged, listed as broken: %s", name, e)
                job = self._broken(name, e)
            if job is not None:
                self._jobs[job.id] = job

    def _load(self, name: str) -> Job | None:
        folder = os.path.join(self.root, name)
        path = os.path.join(folder, "job.json")
        if not JOB_ID.match(name) or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("it does not hold a JSON object")
        except (OSError, ValueError) as e:
            raise ValueError(f"job.json cannot be read ({e})") from e
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                config = TrainConfig.from_json(f.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"config.json cannot be read ({e})") from e
        state = data.get("state")
        # api_prompt: job.json files written by earlier versions hold the executed prompt (is_changed: NaN)
        job = Job(name, folder, str(data.get("name", name)), config, str(data.get("fingerprint", "")),
                  state=state if state in ACTIVE + ENDED else "interrupted", error=data.get("error"),
                  created=float(data.get("created", time.time())), prompt=api_prompt(data.get("prompt")))
        # the step a resume starts from is the checkpoint's, not the last logged one: a kill
        # between a step's metrics line and its checkpoint leaves the log ahead
        job.step, problem = resume_step(job)
        job.error = problem or job.error
        rows, torn = job.read_metrics()
        job.warn_torn(torn)
        done = [r for r in rows if r["step"] <= job.step]
        job.last = done[-1] if done else {}
        if job.state in ACTIVE:
            job.state = "interrupted"
            job.save()
        job.done.set()
        return job

    def _broken(self, name: str, e: Exception) -> Job | None:
        """A job folder ``_load`` could not read, as a job in state ``broken`` that says what is
        wrong and what to do: Remove (the folder goes, with its checkpoint), or queue its workflow
        again, which rewrites its files and resumes from its checkpoint if that can be read."""
        folder = os.path.join(self.root, name)
        try:
            created = os.path.getmtime(folder)
        except OSError:
            created = time.time()
        job = Job(name, folder, name, TrainConfig(), "", state=BROKEN, created=created)
        job.error = (f"this job's folder is damaged: {e}. It cannot be resumed from the list. Queue its workflow "
                     "again to rewrite the folder's files and resume from its checkpoint, or Remove it (the folder "
                     f"{folder} is deleted; copy checkpoint.pt or lora.safetensors out of it first to keep them)")
        job.done.set()
        return job

    def get(self, job_id: str) -> Job | None:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def job_id(self, name: str, fp: str) -> str:
        return f"{slug(name)}-{fp}"

    # ---- start / attach / resume
    def submit(self, spec: JobSpec) -> Job:
        """Start the run, or attach to / resume the job with the same name and fingerprint."""
        job_id = self.job_id(spec.name, spec.fingerprint)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ACTIVE:
                return job  # attach
            if job is not None and job.state == "finished" and job.step >= spec.config.steps:
                return job
            waiting = sum(j.state == "queued" for j in self._jobs.values())
            if waiting >= MAX_QUEUED:
                raise JobError(f"{waiting} training jobs are already waiting: cancel one (Training tab or "
                               f"POST /rewardtune/jobs/<id>/cancel) or wait for them to finish")
            if job is None or job.state == BROKEN:  # a broken folder's files are written anew
                job = Job(job_id, os.path.join(self.root, job_id), spec.name, spec.config, spec.fingerprint,
                          prompt=api_prompt(spec.prompt))
                os.makedirs(job.dir, exist_ok=True)
                write_text(os.path.join(job.dir, "config.json"), spec.config.to_json())
                self._jobs[job_id] = job
            job.config, job.spec, job.state, job.error = spec.config, spec, "queued", None
            job.cancel.clear()
            job.done.clear()
            job.save()
            self._queue.put(job)
            self._ensure_worker()
        self._event(job)
        return job

    def cancel(self, job_id: str) -> Job:
        """Stop a job after its current step (a queued job never starts). Harmless on a job that
        has already ended."""
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        job.cancel.set()
        with self._lock:
            if job.state == "queued":
                job.state = "stopped"
                job.save()
                job.done.set()
        self._event(job)
        return job

    # ---- the worker
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            # daemon + an atexit hook that cancels: Ctrl-C still exits, and the running job saves first
            self._worker = threading.Thread(target=self._work, name="rewardtune-trainer", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.state != "queued":  # cancelled while waiting
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        job.state = "running"
        job.save()
        self._event(job)
        try:
            job.step = job.spec.run(job)
            job.state = "stopped" if job.cancel.is_set() and job.step < job.config.steps else "finished"
            if job.state == "finished":
                self.publish(job)
        except Exception as e:  # the job fails; the server and the last checkpoint are kept
            log.error("RewardTune job %s failed:\n%s", job.id, traceback.format_exc())
            # what a resume starts from, not the last logged step; a checkpoint that cannot be read
            # is what the job must say (with what to do), as the list says after a restart
            job.step, problem = resume_step(job)
            job.state, job.error = "failed", problem or f"{type(e).__name__}: {e}"
        finally:
            job.spec = None  # drop the live models
            job.save()
            job.done.set()
            self._event(job)

    # ---- the trained LoRA in the loras folder
    def lora_name(self, job: Job, latest: bool = False) -> str:
        """The name LoraLoader lists the job's published LoRA under: the final one, or with
        ``latest`` the copy of a mid-training checkpoint's."""
        return f"{LORA_FOLDER}/{job.id}{'-latest' if latest else ''}.safetensors"

    def publish(self, job: Job, latest_lora: dict | None = None) -> str:
        """Write a job's LoRA into the loras folder (atomically) and return its LoraLoader name:
        the final ``lora.safetensors`` (copied when the job finishes), or ``latest_lora``, the
        weights of a mid-training checkpoint, as ``<job id>-latest``. Without a loras folder (a
        manager outside ComfyUI) nothing is written."""
        name = self.lora_name(job, latest=latest_lora is not None)
        if not self.lora_dir:
            return name
        dst = os.path.join(self.lora_dir, os.path.basename(name))
        os.makedirs(self.lora_dir, exist_ok=True)
        if latest_lora is None:
            if os.path.exists(job.lora):
                atomic_write(dst, lambda tmp: shutil.copyfile(job.lora, tmp))
        else:
            import safetensors.torch
            tensors = {k: v.contiguous() for k, v in latest_lora.items()}
            atomic_write(dst, lambda tmp: safetensors.torch.save_file(tensors, tmp))
        return name

    # ---- remove
    def remove(self, job_id: str) -> Job:
        """Delete an ended job (finished, stopped, failed, interrupted): its folder and its entry.
        A queued or running job is refused (JobError: cancel it first). The LoRAs it published in
        the loras folder stay: workflows may load them. The folder is first renamed (one atomic
        step that the job list never shows half done), then deleted."""
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state not in ACTIVE:
            job.done.wait(10)  # a job that has just ended: the worker's last save takes a moment
        with self._lock:
            if job.state in ACTIVE or not job.done.is_set():  # done: the worker has saved it for the last time
                raise JobError(f"job {job.id} is {job.state}: cancel it and wait until it has stopped, then remove it")
            trash = os.path.join(self.root, f".removed-{job.id}-{time.time_ns()}")
            if os.path.exists(job.dir):
                os.replace(job.dir, trash)  # an OSError here leaves the job as it was
            del self._jobs[job.id]
        shutil.rmtree(trash, ignore_errors=True)
        log.info("RewardTune: removed job %s", job.id)
        try:
            self.notify("rewardtune.removed", {"id": job.id})
        except Exception:  # the event loop may be gone at shutdown
            pass
        return job

    def _event(self, job: Job) -> None:
        try:
            self.notify("rewardtune.job", job.status())
        except Exception:  # the event loop may be gone at shutdown
            pass

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait for the running one to save its checkpoint."""
        running = [j for j in self.jobs() if j.state in ACTIVE]
        for j in running:
            j.cancel.set()
        for j in running:
            j.done.wait(timeout)


_MANAGER: JobManager | None = None
_MANAGER_LOCK = threading.Lock()


def get_manager() -> JobManager:
    """The server's job manager, rooted in ComfyUI's output folder (created on first use)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            import folder_paths
            root = os.path.join(folder_paths.get_output_directory(), "rewardtune", "jobs")
            lora_dir = os.path.join(folder_paths.get_folder_paths("loras")[0], LORA_FOLDER)
            _MANAGER = JobManager(root, lora_dir, notify=_send_sync)
            atexit.register(_MANAGER.shutdown)
        return _MANAGER


def _send_sync(event: str, data: dict) -> None:
    try:
        from server import PromptServer
        instance = getattr(PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(event, data)
    except Exception:
        pass
