"""Crash-safe file replacement (no ComfyUI import, so any process can use it)."""
from __future__ import annotations

import os
import threading


def atomic_write(path: str, write) -> None:
    """write(tmp_path), then fsync and rename over ``path``: a kill at any moment leaves either
    the previous file or the new one, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"  # per thread: job.json has two writers
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
