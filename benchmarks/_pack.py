"""Import this repository as the package ``rewardtune`` (its install name) from a benchmark script,
and optionally set ComfyUI up (on the CPU or the GPU) before anything imports it: the benchmarks'
name for testing/pack_import.py."""
from __future__ import annotations

import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import_pack = runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]
