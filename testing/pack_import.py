"""Import this repository as the package ``rewardtune`` (its install name), whatever its folder is
called, for the tests, the scripts and the benchmarks.

The repository's own folder is never put on ``sys.path``: its ``nodes/`` package would shadow
ComfyUI's top-level ``nodes`` module (and ``testing``, ``jobs`` … other top-level names). The
package is built from its ``__init__.py`` with the repository as its only search location, so
``rewardtune.testing``, ``rewardtune.trainers`` … resolve inside it.

This file has no imports from the pack: callers load it by path before the pack is importable,

    import runpy
    runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]()
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "rewardtune"


def import_pack(comfy_cpu: bool | None = None):
    """The pack as ``rewardtune`` (imported once per process). With ``comfy_cpu`` (True: CPU,
    False: the GPU), ComfyUI is also put first on sys.path and its arguments set, before anything
    imports it (``testing/comfy_host.prepare_comfy_import``)."""
    pack = sys.modules.get(PACK_NAME)
    if pack is None:
        spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = pack
        try:
            spec.loader.exec_module(pack)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    if comfy_cpu is not None:
        from rewardtune.testing.comfy_host import prepare_comfy_import
        prepare_comfy_import(cpu=comfy_cpu)
    return pack
