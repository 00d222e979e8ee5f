"""A run's metrics log, ``metrics.jsonl`` (one JSON line per optimizer step), and the history its
checkpoint holds (the same lines). When a run resumes, the log is rewritten from the checkpoint's
history: a kill between a step's line and its checkpoint leaves the log ahead, a crash or a full
disk mid-append tears its last line, and only the history knows every step up to the checkpoint.
The CLI and the background jobs both call ``rewrite_log``, so after any kill, tear and resume the
log holds each step once. No ComfyUI import."""
from __future__ import annotations

import json

from .atomic import atomic_write


def checkpoint_history(state: dict | None) -> list[dict]:
    """The metrics of every step up to a checkpoint (``engine.load_checkpoint``'s dict; None: no
    checkpoint, an empty history)."""
    return json.loads(state["history"]) if state is not None else []


def rewrite_log(path: str, history: list[dict]) -> None:
    """``path`` (a run's metrics.jsonl) as exactly ``history``, one line per step, atomically: a
    fresh run starts it empty, a resume with its checkpoint's steps."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(m) + "\n" for m in history))
    atomic_write(path, write)
