"""The command-line trainer on a detectable tiny SD1.5 checkpoint (loaded by ComfyUI's own
checkpoint loader) with a tiny HPSv2 reward file: runs, refuses to overwrite a run, resumes,
stops cleanly on Ctrl-C, keeps metrics.jsonl to one line per step through SIGKILLs and resumes,
refuses to resume with other inputs (the run's fingerprint), and reports bad input as one
message."""
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


@pytest.mark.slow
def test_cli_trains_refuses_to_overwrite_and_resumes(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli("--objective", "refl", "--prompts", "a red apple\n# a comment\na blue car", "--out", str(out), *SMALL)
    assert "finished step 2" in proc.stdout
    assert "memory: not checked: the model runs on the CPU" in proc.stdout  # no budget on the CPU: said, not hidden
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

    cli("--config", str(out / "config.json"), "--prompts", "a red apple\na blue car", "--out", str(out), "--resume",
        "--steps", "3")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


@pytest.mark.slow
def test_cli_refuses_a_run_over_the_memory_budget_before_it_starts(cli, tmp_path):
    """The node's check (memory.check_budget) runs in the CLI too: a step over --memory-budget-gb is
    refused before anything is written, saying what to lower; --skip-memory-check starts anyway."""
    out = tmp_path / "run"
    args = ["--objective", "refl", "--prompts", "p", "--out", str(out), *SMALL, "--memory-budget-gb", "0.001"]
    tight = cli(*args, check=False)
    assert tight.returncode == 2, tight.stderr
    assert "this run will not fit" in tight.stderr and "To fit:" in tight.stderr and "--skip-memory-check" in tight.stderr
    assert not out.exists()  # nothing started
    skipped = cli(*args, "--skip-memory-check", "--steps", "1")
    assert "finished step 1" in skipped.stdout and "memory:" not in skipped.stdout


@pytest.mark.slow
def test_cli_ctrl_c_stops_after_the_step_and_keeps_a_checkpoint(cli, tmp_path):
    out = tmp_path / "run"
    proc = _start(cli, "--objective", "refl", "--prompts", "p", "--out", str(out), *SMALL[2:], "--steps", "1000",
                  "--save-every", "1000")
    for line in proc.stdout:
        if line.startswith("step 2/1000"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    # a script can tell a stopped run from a finished one: the shell's status for Ctrl-C, not 0
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "stopped at step" in stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= state["step"] < 1000


BAD_CONFIGS = {"malformed config": ('{"lr": 0.001,', "is not valid JSON (Expecting property name"),
               "config list": ('[{"lr": 0.001}]', 'must be a JSON object of settings like {"cfg": 5.0}, not a list'),
               "lr string": ('{"lr": "0.001"}', '"lr" must be a number, got "0.001" (write numbers without quotes)')}


@pytest.mark.parametrize("case", ["empty folder", "missing caption", "rank 0", "no prompts", "missing reward",
                                  *BAD_CONFIGS, "missing config", "reward as checkpoint", "refl without prompts",
                                  "imagerefl without data", "budget 1e308", "out is a file", "rank 1e8"])
@pytest.mark.slow
def test_cli_bad_input_is_a_message(cli, reward_tree, tmp_path, case):
    """One "error:" line on stderr saying what to do, exit status 2, no traceback, nothing written
    (a --memory-budget-gb of 1e308, an --out that is a file and a --rank above the layers' sizes were
    tracebacks: "cannot convert float infinity to integer", FileExistsError, a 1.28 TB allocation)."""
    data = tmp_path / "data"
    data.mkdir()
    args, expect = ["--objective", "imagerefl", "--data", str(data), "--prompts", "p"], "has no images"
    refl = ["--objective", "refl", "--prompts", "p"]
    if case == "missing caption":
        from PIL import Image
        Image.new("RGB", (64, 64)).save(data / "cat.png")
        expect = "cat.png"
    elif case == "rank 0":
        args, expect = [*refl, "--rank", "0"], "rank must be ≥ 1"
    elif case == "no prompts":
        args, expect = ["--objective", "refl", "--prompts", "# only a comment"], "has no prompts"
    elif case == "refl without prompts":  # TrainConfig.check_inputs, before ComfyUI is loaded
        args, expect = ["--objective", "refl"], "classic ReFL samples from prompts: pass --prompts"
    elif case == "imagerefl without data":
        args, expect = ["--objective", "imagerefl"], "ImageReFL trains on real images: pass --data"
    elif case == "missing reward":
        args, expect = [*refl, "--reward", str(tmp_path / "nope.pt")], "does not exist"
    elif case in BAD_CONFIGS:
        (tmp_path / "run.json").write_text(BAD_CONFIGS[case][0])
        args, expect = [*refl, "--config", str(tmp_path / "run.json")], BAD_CONFIGS[case][1]
    elif case == "missing config":
        args, expect = [*refl, "--config", str(tmp_path / "nope.json")], "nope.json does not exist: give the path"
    elif case == "budget 1e308":
        args, expect = [*refl, "--memory-budget-gb", "1e308"], "memory_budget_gb must be ≥ 0"
    elif case == "out is a file":
        (tmp_path / "out").write_text("my notes")
        args, expect = [*refl, *SMALL], "is a file"
    elif case == "rank 1e8":  # bounded by the layers it adapts: known once the checkpoint is loaded
        args, expect = [*refl, *SMALL, "--rank", "100000000"], "takes a rank of at most 320"
    elif case == "reward as checkpoint":
        hps = os.path.join(reward_tree["dir"], reward_tree["files"]["hpsv2"])
        args, expect = [*refl, *SMALL, "--checkpoint", hps], "is not a checkpoint ComfyUI can load"
    proc = cli(*args, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    if case == "out is a file":
        assert (tmp_path / "out").read_text() == "my notes"
    else:
        assert not (tmp_path / "out").exists()  # nothing written


def _start(cli, *args) -> subprocess.Popen:
    """train.py as a user starts it in a terminal: Ctrl-C (SIGINT) at its default disposition. A test
    run launched in the background (``… &`` from a script: SIGINT ignored, and inherited so) would
    otherwise start the CLI with SIGINT ignored, which it leaves so on purpose (nohup)."""
    return subprocess.Popen([sys.executable, TRAIN, *cli.base, *args], env=cli.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill_at(cli, line_start: str, *args) -> None:
    """Run train.py and SIGKILL it as soon as it prints a line starting with ``line_start``."""
    proc = _start(cli, *args)
    for line in proc.stdout:
        if line.startswith(line_start):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{line_start!r} never came"


def _logged_steps(out) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _checkpoint_step(out) -> int:
    return int(torch.load(out / "checkpoint.pt", weights_only=True, mmap=True)["step"])


@pytest.mark.slow
def test_cli_metrics_hold_each_step_once_through_kills_and_resumes(cli, tmp_path):
    """SIGKILL before the first checkpoint, start afresh, SIGKILL two steps after a checkpoint,
    resume to the end: metrics.jsonl holds steps 1..8 once each, equal to the checkpoint's history
    (before: a fresh run appended to the killed run's lines, a resume appended the steps it redid)."""
    out = tmp_path / "run"
    run = ["--objective", "refl", "--prompts", "a red apple\na blue car", "--out", str(out), *SMALL[2:-4],
           "--save-every", "4", "--lr", "1e-3"]
    _kill_at(cli, "step 2/", *run, "--steps", "1000")
    assert not (out / "checkpoint.pt").exists() and _logged_steps(out)[:2] == [1, 2]

    _kill_at(cli, "step 6/", *run, "--steps", "1000")  # a fresh run in the same folder: its own log
    assert _checkpoint_step(out) == 4
    logged = _logged_steps(out)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 6, logged

    cli(*run, "--steps", "8", "--resume")  # redoes steps 5, 6 (7)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8 and _logged_steps(out) == list(range(1, 9))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(state["history"])


@pytest.mark.slow
def test_cli_resume_refuses_other_prompts_images_or_reward_and_names_them(cli, tmp_path):
    """One fingerprint (trainers/fingerprint.py, the jobs' too) is stored with the run: a resume
    with other prompts, another dataset or another reward model is refused, naming each, with the
    checkpoint untouched; a run without a stored fingerprint (an older version) resumes with a
    warning and stores one, which the next resume checks."""
    from PIL import Image
    from rewardtune.testing import reward_fixtures as rf
    data, other_data = tmp_path / "data", tmp_path / "other"
    for folder, caption in ((data, "a red square"), (other_data, "a blue square")):
        folder.mkdir()
        for i, colour in enumerate(("red", "green")):
            Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(caption if i == 0 else "a green square")
    other_reward = tmp_path / "HPS_v2.1_other.pt"
    rf.write_hpsv2(str(other_reward), seed=7)
    out = tmp_path / "run"
    run = ["--objective", "imagerefl", "--refl-every", "1", "--imagerefl-start", "1", "--imagerefl-tf-min", "2",
           "--imagerefl-tf-max", "3", "--out", str(out), *SMALL[2:]]  # both the prompts and the images are used
    cli(*run, "--steps", "1", "--data", str(data), "--prompts", "a cat\na dog")
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()

    other = cli(*run, "--steps", "2", "--resume", "--data", str(other_data), "--prompts", "a cat",
                "--reward", str(other_reward), check=False)
    assert other.returncode == 2, other.stderr
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in other.stderr, other.stderr
    from rewardtune.trainers.fingerprint import PARTS
    named = {name for name, label in PARTS.items() if label in errors[0]}
    assert named == {"reward", "prompts", "images"}, errors[0]  # the same files digest alike in another process
    assert "the prompts (2 then, 1 now)" in errors[0]
    assert ((out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before

    (out / "fingerprint.json").unlink()  # as a run of the version before fingerprints left it
    old = cli(*run, "--steps", "2", "--resume", "--data", str(data), "--prompts", "a cat\na dog")
    assert "warning:" in old.stderr and "no fingerprint" in old.stderr and "finished step 2" in old.stdout
    assert (out / "fingerprint.json").exists()
    reward = cli(*run, "--steps", "3", "--resume", "--data", str(data), "--prompts", "a cat\na dog",
                 "--reward", str(other_reward), check=False)
    assert reward.returncode == 2 and "inputs: the reward model differs." in reward.stderr, reward.stderr
    assert _checkpoint_step(out) == 2


def test_cli_ctrl_c_during_start_up_is_one_line_and_exit_130(cli, tmp_path):
    """Ctrl-C while ComfyUI loads (before training, when Ctrl-C cannot yet mean "stop after this
    step"): a short message, no KeyboardInterrupt traceback, exit status 130, nothing written."""
    out = tmp_path / "run"
    proc = _start(cli, "--objective", "refl", "--prompts", "p", "--out", str(out), *SMALL)
    for line in proc.stdout:
        if line.startswith("loading ComfyUI"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "interrupted before training started" in stderr and "Traceback" not in stderr, stderr
    assert "step 1/" not in stdout and not out.exists()
