"""Crash-safe file replacement (no ComfyUI import, so any process can use it)."""
from __future__ import annotations

import errno
import os
import shutil
import threading

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk (or the user's quota) ran out while a file was written; the previous file is intact.
    ``folder`` and ``free`` (the space left, as text) for callers that say it in their own words."""

    def __init__(self, message: str, folder: str, free: str):
        super().__init__(message)
        self.errno, self.folder, self.free = errno.ENOSPC, folder, free


def disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from or during, is a full disk or quota. Writers
    wrap the OSError: torch.save into a file object raises RuntimeError("… unexpected pos …") with
    it as the context; safetensors (Rust) says "No space left on device (os error 28)"."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _free(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "?"
    return f"{free / 2 ** 30:.1f} GiB" if free >= 2 ** 30 else f"{free / 2 ** 20:.1f} MiB"


def atomic_write(path: str, write) -> None:
    """write(tmp_path), then fsync and rename over ``path``: a kill at any moment leaves either
    the previous file or the new one, never a torn file. A full disk (at the write, the flush or
    the fsync) raises ``DiskFullError`` saying so, where, and that the previous file is intact;
    the half-written temp file is removed. ``write`` should write through a Python file object
    (``open(tmp, "wb")``) so the operating system's ENOSPC reaches it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"  # per thread: job.json has two writers
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if not disk_full(e):
            raise
        if os.path.exists(tmp):
            os.remove(tmp)  # before measuring: the space left once the unfinished file is gone
        name, free = os.path.basename(path), _free(folder)
        previous = f"the previous {name} is intact" if os.path.exists(path) else f"there was no {name} before"
        raise DiskFullError(f"the disk holding {folder} is full ({free} free): {name} could not be written, and "
                            f"{previous} (nothing was replaced). Free some space there", folder, free) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
