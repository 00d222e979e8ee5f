"""The command-line trainer on a detectable tiny SD1.5 checkpoint (loaded by ComfyUI's own
checkpoint loader) with a tiny HPSv2 reward file: runs, refuses to overwrite a run, resumes,
stops cleanly on Ctrl-C, and reports bad input as a message."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(PACK_ROOT, "scripts", "train.py")
SMALL = ["--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--num-steps", "4", "--refl-stop-min", "2",
         "--refl-stop-max", "3", "--width", "64", "--height", "64", "--rank", "2", "--alpha", "2", "--cfg", "2",
         "--save-every", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def cli(models_tree, reward_tree):
    from rewardtune.testing.comfy_host import comfyui_dir
    env = {**os.environ, "COMFYUI_DIR": comfyui_dir()}
    base = ["--cpu", "--checkpoint", os.path.join(models_tree["root"], "checkpoints", models_tree["sd15"]),
            "--reward", os.path.join(reward_tree["dir"], reward_tree["files"]["hpsv2"])]

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, TRAIN, *base, *args], env=env, capture_output=True, text=True,
                              timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc
    run.env, run.base = env, base
    return run


def test_cli_trains_refuses_to_overwrite_and_resumes(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli("--objective", "refl", "--prompts", "a red apple\n# a comment\na blue car", "--out", str(out), *SMALL)
    assert "finished step 2" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all("reward" in m for m in lines)
    from safetensors.torch import load_file
    lora = load_file(str(out / "lora.safetensors"))
    assert any(k.endswith("lora_up.weight") for k in lora) and all(torch.isfinite(v).all() for v in lora.values())
    saved = json.loads((out / "config.json").read_text())
    assert saved["objective"] == "refl" and saved["rank"] == 2
    before = (out / "checkpoint.pt").read_bytes()

    again = cli("--objective", "refl", "--prompts", "x", "--out", str(out), *SMALL, check=False)
    assert again.returncode == 2 and "already holds a run (checkpoint at step 2)" in again.stderr
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing lost
    changed = cli("--objective", "refl", "--prompts", "x", "--out", str(out), "--resume", *SMALL[:-2], "--lr", "5e-3",
                  check=False)
    assert changed.returncode == 2 and "lr: 0.001 → 0.005" in changed.stderr

    cli("--config", str(out / "config.json"), "--prompts", "a red apple", "--out", str(out), "--resume", "--steps", "3")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


def test_cli_ctrl_c_stops_after_the_step_and_keeps_a_checkpoint(cli, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, TRAIN, *cli.base, "--objective", "refl", "--prompts", "p", "--out", str(out),
            *SMALL[2:], "--steps", "1000", "--save-every", "1000"]
    proc = subprocess.Popen(args, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/1000"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stopped at step" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= state["step"] < 1000


@pytest.mark.parametrize("case", ["empty folder", "missing caption", "rank 0", "no prompts", "missing reward"])
def test_cli_bad_input_is_a_message(cli, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    args, expect = ["--objective", "imagerefl", "--data", str(data), "--prompts", "p"], "has no images"
    if case == "missing caption":
        from PIL import Image
        Image.new("RGB", (64, 64)).save(data / "cat.png")
        expect = "cat.png"
    elif case == "rank 0":
        args, expect = ["--objective", "refl", "--prompts", "p", "--rank", "0"], "rank must be ≥ 1"
    elif case == "no prompts":
        args, expect = ["--objective", "refl", "--prompts", "# only a comment"], "has no prompts"
    elif case == "missing reward":
        args, expect = ["--objective", "refl", "--prompts", "p", "--reward", str(tmp_path / "nope.pt")], "does not exist"
    proc = cli(*args, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
