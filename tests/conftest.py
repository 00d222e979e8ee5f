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
import runpy
import tempfile

# One torch thread in this process and in every server, CLI run and oracle it starts (they inherit
# the variable), unless OMP_NUM_THREADS is set already. The models here are tiny, so a second
# thread buys nothing, and on 2 cores shared with anything else (a server beside the test, another
# job) torch's threads wait on each other: tests/test_trainer_rng.py's resume test took 30.6 s
# with two threads and 3.6 s with one (docs/tests.md, "Time").
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_ROOT = os.path.dirname(HERE)

# The pack as ``rewardtune`` (its install name) for library-level tests.
runpy.run_path(os.path.join(PACK_ROOT, "testing", "pack_import.py"))["import_pack"]()

from rewardtune.testing.comfy_host import (  # noqa: E402
    ComfyServer, InProcessComfy, make_custom_nodes_dir, write_extra_model_paths)

_SESSION_DIR = tempfile.mkdtemp(prefix="rt-session-")
_MODELS = os.path.join(_SESSION_DIR, "models")
_EMP = write_extra_model_paths(os.path.join(_SESSION_DIR, "extra_model_paths.yaml"), _MODELS,
                               custom_nodes=make_custom_nodes_dir(os.path.join(_SESSION_DIR, "server_nodes")))

SD15_CKPT = "rt_tiny_sd15.safetensors"
SDXL_CKPT = "rt_tiny_sdxl.safetensors"
SD15_LORA = "rt_tiny_sd15_lora.safetensors"
SD35_CKPT = "rt_tiny_sd35_checkpoint.safetensors"
SD35_LORA = "rt_tiny_sd35_checkpoint_lora.safetensors"


@pytest.fixture(scope="session")
def host():
    return InProcessComfy(os.path.join(_SESSION_DIR, "inproc"), _EMP)


@pytest.fixture(scope="session")
def models_tree(host):
    from rewardtune.testing import tiny_models as tm
    tm.write_sd15_checkpoint(os.path.join(_MODELS, "checkpoints", SD15_CKPT), seed=0)
    tm.write_sdxl_checkpoint(os.path.join(_MODELS, "checkpoints", SDXL_CKPT), seed=0)
    tm.write_sd15_lora(os.path.join(_MODELS, "loras", SD15_LORA), seed=3)
    from rewardtune.testing import tiny_flow_models as tf  # a flow-matching model, as a user's checkpoint
    tf.write_sd35_checkpoint(os.path.join(_MODELS, "checkpoints", SD35_CKPT), seed=0,
                             lora_path=os.path.join(_MODELS, "loras", SD35_LORA))
    return {"root": _MODELS, "yaml": _EMP, "sd15": SD15_CKPT, "sdxl": SDXL_CKPT, "lora": SD15_LORA,
            "sd35": SD35_CKPT, "sd35_lora": SD35_LORA}


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


# ------------------------------------------------------------------------------ reward models
ORACLE_PY = os.path.join(PACK_ROOT, ".rt", "oracle-imagereward", "bin", "python")


@pytest.fixture(scope="session")
def reward_tree(models_tree):
    """Tiny random reward models in the official layouts, inside the session's models tree,
    and the reference models they were saved from (to score against)."""
    from rewardtune.testing import reward_fixtures as rf
    rm_dir = os.path.join(models_tree["root"], "reward_models")
    cv_dir = os.path.join(models_tree["root"], "clip_vision")
    refs = {
        "hpsv2": rf.write_hpsv2(os.path.join(rm_dir, "HPS_v2.1_compressed.pt"), seed=1),
        "pickscore": rf.write_hf_clip(os.path.join(rm_dir, "PickScore_v1"), seed=2, hidden_act="gelu"),
        "clip_vitl": rf.write_hf_clip(os.path.join(cv_dir, "clip-vit-large-patch14.safetensors"), seed=3,
                                      hidden_act="quick_gelu", projection_dim=768),
        "aesthetic": rf.write_aesthetic(os.path.join(rm_dir, "sac+logos+ava1-l14-linearMSE.pth"), seed=4),
    }
    return {"dir": rm_dir, "clip_dir": cv_dir, "refs": refs,
            "files": {"hpsv2": "HPS_v2.1_compressed.pt", "pickscore": "PickScore_v1/model.safetensors",
                      "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
                      "clip_vitl": "clip-vit-large-patch14.safetensors"}}


@pytest.fixture(scope="session")
def imagereward_oracle():
    """The image-reward package (its own venv, built by scripts/oracles.sh) builds a random
    ImageReward, saves it as ImageReward.pt and scores test images with its own API."""
    import json
    import subprocess
    if not os.path.exists(ORACLE_PY):
        pytest.fail("the ImageReward oracle venv is missing: run `bash scripts/oracles.sh` "
                    "(scripts/test.sh does it)")
    out = os.path.join(_SESSION_DIR, "imagereward_oracle")
    subprocess.run([ORACLE_PY, os.path.join(PACK_ROOT, "testing", "oracles", "imagereward_ref.py"),
                    "dump", "--out", out, "--seed", "0"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    with open(os.path.join(out, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    return {"dir": out, "weights": os.path.join(out, "ImageReward.pt"), "cases": cases}


@pytest.fixture(scope="session")
def vitl14_clip_vision(reward_tree):
    """A full-size random OpenAI CLIP ViT-L/14 vision file in the clip_vision folder (the smallest
    CLIP ComfyUI's own Load CLIP Vision detects)."""
    from rewardtune.testing import reward_fixtures as rf
    name = "rt_vitl14_full.safetensors"
    rf.write_clip_vitl14_vision(os.path.join(reward_tree["clip_dir"], name), seed=21)
    return {"name": name, "path": os.path.join(reward_tree["clip_dir"], name)}


# ------------------------------------------------------------------------------ the toy world
@pytest.fixture(scope="session")
def toy_world(host, models_tree):
    """The toy world (docs/toyworld.md) written from the committed weights into the cache (seconds,
    once per machine), linked into the session's models tree, loaded by ComfyUI's checkpoint
    loader and the pack's reward loader. allow_build=False: a test never trains it for 15 minutes;
    a changed recipe or training code without rebuilt, committed weights fails with what to do."""
    from rewardtune.toyworld import world as W
    folder = W.ensure_world(allow_build=False)
    names = W.link_models(folder, models_tree["root"])
    return {"folder": folder, **names, "world": W.load(folder)}
