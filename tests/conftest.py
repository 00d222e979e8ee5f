"""Test harness: a real ComfyUI (fetched by scripts/setup.sh), tiny real models, no mocks.

Fixtures:
* ``host``: ComfyUI imported in this process on CPU, built-in nodes and this pack loaded by
  ComfyUI's own custom-node loader from a custom_nodes folder, prompts run by its PromptExecutor.
* ``models_tree``: a temp models folder registered through extra_model_paths.yaml, holding tiny
  detectable SD1.5/SDXL checkpoints and a LoRA, written once per session.
* ``server``: a real ``main.py --cpu`` subprocess on 127.0.0.1 using the same models tree.
"""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_ROOT = os.path.dirname(HERE)

# Make the pack importable as ``rewardtune`` (its install name) for library-level tests.
_PKGS = tempfile.mkdtemp(prefix="rt-pkgs-")
os.symlink(PACK_ROOT, os.path.join(_PKGS, "rewardtune"))
sys.path.insert(0, _PKGS)

from rewardtune.testing.comfy_host import (  # noqa: E402
    ComfyServer, InProcessComfy, make_custom_nodes_dir, write_extra_model_paths)

_SESSION_DIR = tempfile.mkdtemp(prefix="rt-session-")
_MODELS = os.path.join(_SESSION_DIR, "models")
_EMP = write_extra_model_paths(os.path.join(_SESSION_DIR, "extra_model_paths.yaml"), _MODELS,
                               custom_nodes=make_custom_nodes_dir(os.path.join(_SESSION_DIR, "server_nodes")))

SD15_CKPT = "rt_tiny_sd15.safetensors"
SDXL_CKPT = "rt_tiny_sdxl.safetensors"
SD15_LORA = "rt_tiny_sd15_lora.safetensors"


@pytest.fixture(scope="session")
def host():
    return InProcessComfy(os.path.join(_SESSION_DIR, "inproc"), _EMP)


@pytest.fixture(scope="session")
def models_tree(host):
    from rewardtune.testing import tiny_models as tm
    tm.write_sd15_checkpoint(os.path.join(_MODELS, "checkpoints", SD15_CKPT), seed=0)
    tm.write_sdxl_checkpoint(os.path.join(_MODELS, "checkpoints", SDXL_CKPT), seed=0)
    tm.write_sd15_lora(os.path.join(_MODELS, "loras", SD15_LORA), seed=3)
    return {"root": _MODELS, "yaml": _EMP, "sd15": SD15_CKPT, "sdxl": SDXL_CKPT, "lora": SD15_LORA}


@pytest.fixture(scope="module")
def server(models_tree, tmp_path_factory):
    srv = ComfyServer(str(tmp_path_factory.mktemp("server")), models_tree["yaml"])
    srv.start()
    yield srv
    srv.stop()


def pytest_sessionfinish(session, exitstatus):
    """The tiny checkpoints take ~550 MB: don't leave them behind in /tmp."""
    import shutil
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    shutil.rmtree(_PKGS, ignore_errors=True)
