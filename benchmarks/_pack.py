"""Import this repository as the package ``rewardtune`` (its install name) from a benchmark script,
and optionally set ComfyUI up (on the CPU or the GPU) before anything imports it."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_pack(comfy_cpu: bool | None = None) -> None:
    pkgs = os.path.join(ROOT, ".rt", "pkgs")
    os.makedirs(pkgs, exist_ok=True)
    if not os.path.lexists(os.path.join(pkgs, "rewardtune")):
        os.symlink(ROOT, os.path.join(pkgs, "rewardtune"))
    if pkgs not in sys.path:
        sys.path.insert(0, pkgs)
    if comfy_cpu is not None:
        from rewardtune.testing.comfy_host import prepare_comfy_import
        prepare_comfy_import(cpu=comfy_cpu)
