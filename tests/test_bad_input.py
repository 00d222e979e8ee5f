"""Bad input through the real host: damaged job folders after a server kill, traversal ids on the
job routes, non-finite images, paths outside ComfyUI's input folder, broken reward files and a
config_json that is not an object. Each must give one clear error (or be skipped with a warning)
and never hide the pack, the job list or the other jobs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error

import numpy as np
import pytest
import torch

from rewardtune.testing.comfy_host import ComfyServer
from test_trainer_node import SMALL as NODE_SMALL, train_prompt as node_train_prompt  # noqa: E402

# the node tests' settings, with ImageReFL's indices inside the 4-step schedule
SMALL = {**NODE_SMALL, "imagerefl_start": 2, "imagerefl_tf_min": 2, "imagerefl_tf_max": 3}
OUR_NODES = ("RewardTuneTrainLoRA", "RewardTuneLoadTrainedLoRA", "RewardTuneBestOfN", "RewardTuneCombinedKSampler")


def train_prompt(models_tree, reward_tree, **kw):
    return node_train_prompt(models_tree, reward_tree, **{"extra": SMALL, **kw})


# ------------------------------------------------------------------ a server killed mid-job, restarted
def _logged_steps(path: str) -> list[int]:
    steps = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError):
                    pass  # a line being appended right now
    return steps


def _saved_step(path: str) -> int:
    return int(torch.load(path, weights_only=True)["step"]) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def restarted(models_tree, reward_tree, tmp_path_factory):
    """A job killed with its server after a step that was logged but not yet checkpointed, its last
    metrics line then torn (a crash mid-append), two damaged copies of its folder beside it, and a
    fresh server started on the same folders."""
    work = str(tmp_path_factory.mktemp("killed"))
    steps, save_every = 10, 3
    srv = ComfyServer(work, models_tree["yaml"]).start()
    try:
        prompt = train_prompt(models_tree, reward_tree, name="torn", steps=steps, save_every=save_every, seed=9)
        assert srv.wait(srv.queue(prompt), timeout=120)["status"]["status_str"] == "success"
        (job_id,) = [j["id"] for j in srv.get("/rewardtune/jobs")["jobs"] if j["name"] == "torn"]
        jdir = os.path.join(work, "output", "rewardtune", "jobs", job_id)
        metrics, ckpt = os.path.join(jdir, "metrics.jsonl"), os.path.join(jdir, "checkpoint.pt")
        # freeze the server (SIGSTOP) two steps after a checkpoint (logged, not saved), check that
        # on disk, then kill it: deterministic whatever the speed of the machine. Two, so the log is
        # still ahead of the checkpoint once its last line is torn
        deadline, logged, saved = time.time() + 180, 0, 0
        while time.time() < deadline:
            done = _logged_steps(metrics)
            if done and done[-1] > save_every and done[-1] % save_every == save_every - 1:
                os.killpg(srv.proc.pid, signal.SIGSTOP)
                logged, saved = _logged_steps(metrics)[-1], _saved_step(ckpt)
                if logged - 1 > saved > 0:
                    break
                os.killpg(srv.proc.pid, signal.SIGCONT)
            time.sleep(0.01)
        assert logged - 1 > saved > 0, f"could not catch the job between checkpoints; log:\n{srv.log_tail()}"
    finally:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        srv.stop()
    # the last line half-written, as a crash or a full disk mid-append leaves it
    with open(metrics, "rb") as f:
        data = f.read()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(metrics, "wb") as f:
        f.write(data[:start + (len(data) - start) // 2])
    jobs_root = os.path.dirname(jdir)
    # damaged neighbours: a torn job.json, an unreadable checkpoint
    bad_json, bad_ckpt = "brokenjson-0000000001", "brokenckpt-0000000002"
    shutil.copytree(jdir, os.path.join(jobs_root, bad_json))
    with open(os.path.join(jobs_root, bad_json, "job.json"), "w", encoding="utf-8") as f:
        f.write('{"name": "brok')
    shutil.copytree(jdir, os.path.join(jobs_root, bad_ckpt))
    with open(os.path.join(jobs_root, bad_ckpt, "checkpoint.pt"), "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    srv2 = ComfyServer(work, models_tree["yaml"]).start()
    try:
        yield {"srv": srv2, "id": job_id, "logged": logged, "saved": saved, "steps": steps,
               "bad_json": bad_json, "bad_ckpt": bad_ckpt}
    finally:
        srv2.stop()


@pytest.mark.slow
@pytest.mark.server
def test_a_torn_metrics_line_and_broken_jobs_hide_nothing(restarted):
    srv, job_id = restarted["srv"], restarted["id"]
    info = srv.get("/object_info")
    for node in OUR_NODES:
        assert node in info, f"{node} missing: the pack failed to import\n{srv.log_tail()}"
    listed = {j["id"]: j for j in srv.get("/rewardtune/jobs")["jobs"]}  # 200, or urllib raises
    assert job_id in listed and restarted["bad_ckpt"] in listed, (list(listed), srv.log_tail())
    # the torn job.json: listed as broken, saying what is wrong and what to do (it used to vanish
    # from the list, leaving only a line in the server's log)
    broken = listed[restarted["bad_json"]]
    assert broken["state"] == "broken" and broken["steps"] == 0, broken
    assert "job.json" in broken["error"] and "Remove" in broken["error"] and "queue" in broken["error"].lower(), broken
    log = srv.log_tail(100_000)
    assert f"job folder {restarted['bad_json']} is damaged" in log
    # the torn line is reported, not silently dropped
    assert any(job_id in line and "torn line" in line and "metrics.jsonl" in line for line in log.splitlines()), log
    # the job's page answers and its metrics are the whole lines only
    st = srv.get(f"/rewardtune/jobs/{job_id}?limit=5000")
    assert [m["step"] for m in st["metrics"]] == list(range(1, restarted["logged"]))
    # Remove deletes the broken folder like any ended job's
    assert srv.post(f"/rewardtune/jobs/{restarted['bad_json']}/remove", {})["removed"]
    assert restarted["bad_json"] not in {j["id"] for j in srv.get("/rewardtune/jobs")["jobs"]}
    assert not os.path.exists(os.path.join(srv.workdir, "output", "rewardtune", "jobs", restarted["bad_json"]))


@pytest.mark.slow
@pytest.mark.server
def test_the_list_shows_the_step_a_resume_starts_from(restarted):
    srv, job_id, saved, steps = restarted["srv"], restarted["id"], restarted["saved"], restarted["steps"]
    listed = {j["id"]: j for j in srv.get("/rewardtune/jobs")["jobs"]}
    job = listed[job_id]
    assert job["state"] == "interrupted" and job["has_checkpoint"]
    # the log (torn line aside) reaches logged - 1 > saved: the list shows the checkpoint's step
    assert job["step"] == saved < restarted["logged"] - 1, (job["step"], saved, restarted["logged"])
    assert job["last"]["step"] == saved  # the metrics shown are those of that step
    broken = listed[restarted["bad_ckpt"]]
    assert broken["step"] == 0 and "checkpoint" in broken["error"] and "delete" in broken["error"], broken
    before = srv.get(f"/rewardtune/jobs/{job_id}?limit=5000")["metrics"]
    # resume: the log then holds every step once (the torn line is gone), the steps up to the
    # checkpoint untouched (a run restarted from zero would rewrite them, timings included)
    res = srv.post(f"/rewardtune/jobs/{job_id}/resume", {})
    assert res["queued"]
    assert srv.wait(res["prompt_id"], timeout=120)["status"]["status_str"] == "success"
    deadline = time.time() + 240
    while srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] != "finished" and time.time() < deadline:
        time.sleep(0.3)
    st = srv.get(f"/rewardtune/jobs/{job_id}?limit=5000")
    assert st["job"]["state"] == "finished" and st["job"]["step"] == steps, (st["job"], srv.log_tail())
    assert [m["step"] for m in st["metrics"]] == list(range(1, steps + 1))
    assert st["metrics"][:saved] == before[:saved]


@pytest.mark.slow
def test_a_torn_last_line_then_a_resume_keeps_every_step_and_a_broken_checkpoint_says_what_to_do(
        host, models_tree, reward_tree):
    """Through the node (mode wait) in the executor: a job ends at its checkpoint's step 3, the
    last line of its metrics.jsonl is torn (a crash or a full disk mid-append), and queueing it
    with 5 steps resumes it: the log holds steps 1–5 once, as the checkpoint's history does (the
    job path kept the whole lines up to the checkpoint's step, losing step 3 for good: [1, 2, 4,
    5]). Then its checkpoint is damaged and it is queued again: the job fails saying to delete the
    checkpoint to train again (the hint the list shows), not that "its last checkpoint is kept"."""
    name = "torn-then-resumed"
    prompt = train_prompt(models_tree, reward_tree, name=name, mode="wait", steps=3, save_every=3)
    host.run(prompt)
    (job,) = [j for j in _manager(host).jobs() if j.name == name]
    assert job.state == "finished" and job.step == 3
    data = open(job.metrics_file, "rb").read()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(job.metrics_file, "wb") as f:
        f.write(data[:start + (len(data) - start) // 2])  # step 3's line, half written
    host.run(train_prompt(models_tree, reward_tree, name=name, mode="wait", steps=5, save_every=3))
    logged = [json.loads(line) for line in open(job.metrics_file, encoding="utf-8")]
    state = torch.load(job.checkpoint, weights_only=True)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5] and logged == json.loads(state["history"])

    with open(job.checkpoint, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    err = host.run_expect_error(train_prompt(models_tree, reward_tree, name=name, mode="wait", steps=6, save_every=3))
    msg = err["exception_message"]
    assert "delete" in msg and job.checkpoint in msg and "last checkpoint is kept" not in msg, msg
    assert job.state == "failed" and "delete" in job.error and job.step == 0, (job.state, job.error)


TRAVERSAL_IDS = ("..%2F..%2Fx", "..%2F..%2F..%2Fetc%2Fpasswd", "%2E%2E", "%2E%2E%2F%2E%2E%2Fx", "a%2E%2E",
                 "..%5C..%5Cx", "%252E%252E%252Fx", "x%00y", "nope-123", "nope-123%0A", "-leading-dash", "a" * 81)


@pytest.mark.slow
@pytest.mark.server
def test_traversal_ids_answer_404_on_every_route(restarted):
    """jobs/routes.py documents it: an id that names no job (unknown, malformed, a traversal
    attempt, however encoded) answers 404."""
    srv = restarted["srv"]
    seen = {}
    for jid in TRAVERSAL_IDS:
        for method, path in (("GET", f"/rewardtune/jobs/{jid}"), ("GET", f"/api/rewardtune/jobs/{jid}"),
                             ("POST", f"/rewardtune/jobs/{jid}/cancel"), ("POST", f"/rewardtune/jobs/{jid}/resume"),
                             ("POST", f"/rewardtune/jobs/{jid}/remove"), ("POST", f"/api/rewardtune/jobs/{jid}/cancel")):
            with pytest.raises(urllib.error.HTTPError) as e:
                srv.get(path) if method == "GET" else srv.post(path, {})
            seen[(method, path)] = e.value.code
    wrong = {k: v for k, v in seen.items() if v != 404}
    assert not wrong, wrong
    assert srv.get("/rewardtune/jobs")["jobs"]  # and the server still serves


# ------------------------------------------------------------------ in the executor: images and files
def _write_latent(path, latent):
    from safetensors.torch import save_file
    save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])}, path)


def _nan_prompt(models_tree, reward_tree, latent_name):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_tree["files"]["hpsv2"], "reward_type": "auto", "precision": "fp32",
                         "aesthetic_clip": "(none)"}},
        "5": {"class_type": "RewardTuneBestOfN",
              "inputs": {"reward_model": ["4", 0], "images": ["3", 0], "prompt": "a red apple",
                         "one_prompt_per_line": False, "batch_size": 8, "top_k": 1}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def test_non_finite_images_get_a_clear_error(host, models_tree, reward_tree):
    """A NaN latent (an fp16 overflow upstream) decodes to a NaN image: Best-of-N and Reward Score
    refuse it by position instead of scoring NaN and keeping it as the best."""
    import folder_paths
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 4, 8, 8, generator=gen)
    inp = folder_paths.get_input_directory()
    _write_latent(os.path.join(inp, "rt_finite.latent"), latent)
    latent[1] = float("nan")
    _write_latent(os.path.join(inp, "rt_nan.latent"), latent)
    ok = host.run(_nan_prompt(models_tree, reward_tree, "rt_finite.latent"))  # the control: finite images score
    assert ok["5"]["text"][0].count("\n#") == 3
    err = host.run_expect_error(_nan_prompt(models_tree, reward_tree, "rt_nan.latent"))
    msg = err["exception_message"]
    assert err["node_type"] == "RewardTuneBestOfN", err
    assert "image #1" in msg and "NaN" in msg and "#0" not in msg and "#2" not in msg, msg
    assert "fp32" in msg  # says what to do
    # Reward Score too, and inf pixels as well as NaN
    handle = host.node_classes["RewardTuneLoadRewardModel"].execute(
        reward_tree["files"]["hpsv2"], "auto", "fp32", "(none)").args[0]
    images = torch.rand(4, 32, 32, 3)
    images[2, 5, 5, 0] = float("inf")
    for node, args in (("RewardTuneScoreImages", ("a", False, 8, False)), ("RewardTuneBestOfN", ("a", False, 8, 2))):
        with pytest.raises(Exception) as info:
            host.node_classes[node].execute(handle, images, *args)
        assert "image #2" in str(info.value) and "inf" in str(info.value), (node, str(info.value))
    assert "non-finite" in host.node_classes["RewardTuneBestOfN"].GET_NODE_INFO_V1()["description"]


def _hps_handle(host, reward_tree):
    return host.node_classes["RewardTuneLoadRewardModel"].execute(
        reward_tree["files"]["hpsv2"], "auto", "fp32", "(none)").args[0]


@pytest.mark.parametrize("shape", [(1, 1, 300_000), (1, 300_000, 1)])
def test_a_thin_png_scores_without_the_memory_of_its_resize(host, models_tree, reward_tree, shape):
    """An uploaded 1×W (or H×1) PNG, a few kB, through ComfyUI's Load Image into Reward Score with
    captions on. The reward preprocessing used to scale the short side to 224 first: 1×300,000
    became 224×67,200,000 pixels, 180 GB (4096 wide took 4.7 GB). It now crops the part the model
    sees before resizing, so the work is bounded by the model's input; the caption's font is bounded
    by the image's width as well as its height."""
    import folder_paths
    from PIL import Image
    _, h, w = shape
    name = f"rt_thin_{h}x{w}.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder_paths.get_input_directory(), name))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_tree["files"]["hpsv2"], "reward_type": "auto", "precision": "fp32",
                         "aesthetic_clip": "(none)"}},
        "3": {"class_type": "RewardTuneScoreImages",
              "inputs": {"reward_model": ["2", 0], "images": ["1", 0], "prompt": "a thin line",
                         "one_prompt_per_line": False, "batch_size": 8, "caption_images": True}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "rt_thin_captioned"}},
    }
    t0 = time.perf_counter()
    out = host.run(prompt)
    assert time.perf_counter() - t0 < 60
    text = out["3"]["text"][0]
    assert "1 image(s)" in text and "nan" not in text.lower(), text
    saved = out["4"]["images"][0]
    with Image.open(os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])) as im:
        assert im.size == (w, h) and im.mode == "RGB"


CHANNEL_CASES = {"gray": (2, 32, 32, 1), "gray+alpha": (2, 32, 32, 2), "one HWC image": (32, 32, 3)}


@pytest.mark.parametrize("case", CHANNEL_CASES)
def test_score_captions_grayscale_and_single_images(host, reward_tree, case):
    """Reward Score's captions on the images the scoring accepts: grayscale (1 channel) and
    gray + alpha (2) are expanded to RGB, as the docs promise, and one image without a batch
    axis is a batch of one (the captions used to crash in PIL on all three)."""
    handle = _hps_handle(host, reward_tree)
    images = torch.rand(CHANNEL_CASES[case], generator=torch.Generator().manual_seed(1))
    node = host.node_classes["RewardTuneScoreImages"]
    out = node.execute(handle, images, "a", False, 8, True).args
    plain = node.execute(handle, images, "a", False, 8, False).args
    assert out[0] == plain[0]  # the same scores with captions on
    batch = images if images.ndim == 4 else images[None]
    assert out[2].shape == (*batch.shape[:3], 3)
    rgb = batch[..., :1].expand(-1, -1, -1, 3) if batch.shape[-1] < 3 else batch
    # below the caption bar: the image, in RGB (through 8 bits); the bar: not the image
    assert torch.allclose(out[2][:, 24:], rgb[:, 24:], atol=0.5 / 255 + 1e-6)
    assert not torch.allclose(out[2][:, :8], rgb[:, :8], atol=0.1)


BAD_SCORE_INPUT = {
    # case: (images, prompt, one_prompt_per_line, what the message must say, what it must not)
    "empty batch": ((0, 32, 32, 3), "a", False, ["empty", "(0, 32, 32, 3)", "at least one image"], ["reshape"]),
    "5 channels": ((1, 8, 8, 5), "a", False, ["5 channels", "(1, 8, 8, 5)"], ["(1, 5, 8, 8)"]),
    "a blank line": ((3, 8, 8, 3), "a cat\n\na dog\nan owl", True, ["line 2 is empty", "one_prompt_per_line"], []),
    "only whitespace": ((2, 8, 8, 3), " \n\t\n", True, ["no prompt", "one_prompt_per_line"], []),
}


@pytest.mark.parametrize("case", BAD_SCORE_INPUT)
def test_bad_images_and_prompts_into_score_and_best_of_n_say_what_is_wrong(host, reward_tree, case):
    shape, prompt, per_line, says, never = BAD_SCORE_INPUT[case]
    handle = _hps_handle(host, reward_tree)
    for node, last in (("RewardTuneScoreImages", True), ("RewardTuneBestOfN", 1)):
        with pytest.raises(Exception) as info:
            host.node_classes[node].execute(handle, torch.rand(shape), prompt, per_line, 8, last)
        msg = str(info.value)
        assert all(s in msg for s in says) and not any(s in msg for s in never), (node, msg)


def _combined_prompt(models_tree, **inputs):
    from rewardtune.testing.workflow import combined_switch_inputs
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "RewardTuneCombinedKSampler",
              "inputs": {"base_model": ["1", 0], "tuned_model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": 0, "steps": 4, "cfg_base": 2.0, "cfg_tuned": 1.0,
                         "sampler_name": "euler", "scheduler": "normal", "handoff": "continuous", "denoise": 1.0,
                         **combined_switch_inputs(switch_step=2), **inputs}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "rt_combined_bad"}},
    }


NOT_A_SETTING = {
    # case: (prompt builder, what the message must say, what it must not)
    "denoise NaN": (lambda m: _combined_prompt(m, denoise=float("nan")), ["denoise", "between 0 and 1"],
                    ["cannot convert"]),
    "cfg NaN": (lambda m: _combined_prompt(m, cfg_tuned=float("nan")), ["cfg_tuned", "a number"], []),
    "unknown switch_unit": (lambda m: _combined_prompt(m, switch_unit="percent"), ["switch_unit", "step", "fraction"],
                            ["positional argument"]),
    "unknown mode": (lambda m: _combined_prompt(m, mode="average"), ["mode", "switch", "blend"],
                     ["positional argument"]),
    "LoRA strength NaN": (lambda m: {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m["sd15"]}},
        "2": {"class_type": "RewardTuneLoadTrainedLoRA",
              "inputs": {"model": ["1", 0], "job": "no-such-job", "which": "newest", "strength": float("nan")}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}, ["strength", "finite"], ["no training job"]),
}


@pytest.mark.parametrize("case", NOT_A_SETTING)
def test_sampler_and_lora_settings_that_are_not_numbers_say_so(host, models_tree, case):
    """NaN and inf pass ComfyUI's min/max checks (every comparison with NaN is false), and an
    unknown DynamicCombo option drops the input altogether: each is refused by the node by name
    (the Combined KSampler said "cannot convert float NaN to integer" or "missing 1 required
    positional argument"; a NaN CFG sampled NaN latents; Load Trained LoRA applied a NaN strength)."""
    build, says, never = NOT_A_SETTING[case]
    err = host.run_expect_error(build(models_tree))
    assert "exception_message" in err, err
    msg = err["exception_message"]
    assert all(s in msg for s in says) and not any(s in msg for s in never), msg


def _train_error(host, models_tree, reward_tree, **kw) -> str:
    err = host.run_expect_error(train_prompt(models_tree, reward_tree, name="paths", steps=2, save_every=1, **kw))
    assert err.get("node_type") == "RewardTuneTrainLoRA", err
    return err["exception_message"]


def _manager(host):
    """The job manager of the pack as ComfyUI loaded it in this process (its own module copy)."""
    import sys
    return sys.modules[host.node_classes["RewardTuneTrainLoRA"].__module__].get_manager()


def _progress_texts(host) -> list[str]:
    """The progress texts (ComfyUI's binary TEXT messages) sent since the last call."""
    import asyncio
    import struct
    host.loop.run_until_complete(asyncio.sleep(0))  # deliver what send_sync scheduled from the node
    texts = []
    while not host.server.messages.empty():
        event, data, _ = host.server.messages.get_nowait()
        if isinstance(data, (bytes, bytearray)) and event == 3:  # BinaryEventTypes.TEXT
            n = struct.unpack(">I", data[:4])[0]
            texts.append(bytes(data[4 + n:]).decode("utf-8"))
    return texts


REFUSED_UP_FRONT = {
    # case: (train_prompt settings, what the message must say, what it must not)
    "budget 1e308": ({"config_json": json.dumps({**SMALL, "memory_budget_gb": 1e308})},
                     ["memory_budget_gb", "at most"], ["infinity"]),
    "rank 1e8": ({"config_json": json.dumps({**SMALL, "rank": 100_000_000})},
                 ["rank 100000000", "at most 320", "attn1.to_k (320 × 320)"], []),
    "NaN images": ({"objective": "imagerefl", "prompts": "", "nan_images": True},
                   ["image #1", "NaN", "training images"], ["learning rate", "#0", "#2"]),
    "deep config_json": ({"config_json": "[" * 100_000 + "]" * 100_000}, ["config_json", "nested"], ["recursion"]),
    "NUL in dataset_folder": ({"objective": "imagerefl", "prompts": "", "dataset_folder": "my\x00set"},
                              ["dataset folder", "NUL"], ["embedded null byte"]),
    "over the budget": ({"config_json": json.dumps({**SMALL, "memory_budget_gb": 0.001})}, ["will not fit"], []),
}


@pytest.mark.parametrize("case", REFUSED_UP_FRONT)
def test_the_trainer_node_refuses_bad_input_before_a_job_exists(host, models_tree, reward_tree, case):
    """Input a run cannot honour is refused by the node with a message that names it, before a job
    is created: nothing fails later in the list, with the wrong cause (NaN training pixels used to
    start a job that failed with "the ImageReFL loss is nan … lower the learning rate"), or as a
    traceback ("cannot convert float infinity to integer", "maximum recursion depth", "embedded
    null byte", a 1.28 TB allocation for the LoRA)."""
    settings, says, never = REFUSED_UP_FRONT[case]
    settings = dict(settings)
    name = "refused-" + "".join(c if c.isalnum() else "-" for c in case)
    nan = settings.pop("nan_images", False)
    prompt = train_prompt(models_tree, reward_tree, name=name, steps=2, save_every=1, **settings)
    if nan:
        import folder_paths
        latent = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        latent[1] = float("nan")
        _write_latent(os.path.join(folder_paths.get_input_directory(), "rt_nan_train.latent"), latent)
        prompt["10"] = {"class_type": "LoadLatent", "inputs": {"latent": "rt_nan_train.latent"}}
        prompt["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}}
        prompt["3"]["inputs"].update(images=["11", 0], captions="a square")
    _progress_texts(host)
    err = host.run_expect_error(prompt)
    assert err.get("node_type") == "RewardTuneTrainLoRA", err
    msg = err["exception_message"]
    assert all(s in msg for s in says) and not any(s in msg for s in never), msg
    assert name not in {j.name for j in _manager(host).jobs()}  # no job, so none failed in the list
    if case == "over the budget":  # the estimate runs for a while: the node says so meanwhile
        assert any("estimating" in t for t in _progress_texts(host))


def test_dataset_and_prompt_paths_stay_in_the_input_folder(host, models_tree, reward_tree, tmp_path, monkeypatch):
    import folder_paths
    from PIL import Image
    monkeypatch.delenv("REWARDTUNE_ALLOW_PATHS", raising=False)
    inp = folder_paths.get_input_directory()
    outside = tmp_path / "outside_ds"
    outside.mkdir()
    Image.new("RGB", (64, 64)).save(outside / "secret_name.png")  # no caption: the message would list it
    (tmp_path / "secret_prompts.txt").write_text("# only a comment\n")
    inside = os.path.join(inp, "rt_inside_ds")
    os.makedirs(inside, exist_ok=True)
    Image.new("RGB", (64, 64)).save(os.path.join(inside, "inside_name.png"))
    link = os.path.join(inp, "rt_link_out")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(outside, link)

    def folder_error(path):
        return _train_error(host, models_tree, reward_tree, objective="imagerefl", prompts="", dataset_folder=path)

    def prompts_error(path):
        return _train_error(host, models_tree, reward_tree, prompts=path)

    refused = {}
    for path in ("/etc", "../../..", str(outside), "rt_link_out", "rt_inside_ds/../../..", "/no/such/folder",
                 str(tmp_path / "missing"), "../missing"):
        msg = folder_error(path)
        refused[path] = msg.replace(repr(path), "<path>")
        assert "REWARDTUNE_ALLOW_PATHS" in msg and "input folder" in msg, msg
        for leak in ("secret_name", "passwd", "hosts", "does not exist", "not a folder", "no images", str(outside)
                     if path != str(outside) else "\0"):
            assert leak not in msg, (path, leak, msg)
    # an existing folder and a missing one get the same words: the message tells nothing about the disk
    assert len(set(refused.values())) == 1, refused
    pr = {p: prompts_error(p).replace(repr(p), "<path>") for p in
          (str(tmp_path / "secret_prompts.txt"), "/no/such/prompts.txt", "../../../../etc/x.txt")}
    assert len(set(pr.values())) == 1 and "REWARDTUNE_ALLOW_PATHS" in next(iter(pr.values())), pr
    # inside the input folder the folder is read (this error lists the image missing its caption)
    assert "inside_name.png" in folder_error("rt_inside_ds")
    assert "inside_name.png" in folder_error(os.path.join(inp, "sub", "..", "rt_inside_ds"))
    # the opt-in: a folder named in REWARDTUNE_ALLOW_PATHS is read, through a link or directly
    monkeypatch.setenv("REWARDTUNE_ALLOW_PATHS", os.pathsep.join(["/nonexistent-allowed", str(tmp_path)]))
    assert "secret_name.png" in folder_error(str(outside))
    assert "secret_name.png" in folder_error("rt_link_out")
    assert "has no prompts" in prompts_error(str(tmp_path / "secret_prompts.txt"))
    assert "REWARDTUNE_ALLOW_PATHS" in folder_error("/etc")  # still only those folders
    # the tooltips say how to opt in
    info = host.node_classes["RewardTuneTrainLoRA"].GET_NODE_INFO_V1()["input"]["required"]
    assert "REWARDTUNE_ALLOW_PATHS" in info["dataset_folder"][1]["tooltip"]
    assert "REWARDTUNE_ALLOW_PATHS" in info["prompts"][1]["tooltip"]
    os.remove(link)


def test_config_json_that_is_not_an_object_says_so(host, models_tree, reward_tree):
    for text in ("[1, 2]", '"cfg"', "5", "null"):
        msg = _train_error(host, models_tree, reward_tree, config_json=text)
        assert "config_json must be a JSON object" in msg and '{"cfg": 5.0}' in msg, (text, msg)
    # a LoRA path smuggled in through config_json is refused: the lcm_lora input picks from the loras folder
    msg = _train_error(host, models_tree, reward_tree, objective="sqdf",
                       config_json=json.dumps({**SMALL, "sqdf_lcm_lora": "/etc/passwd"}))
    assert "lcm_lora" in msg and "passwd" not in msg.replace("/etc/passwd", ""), msg


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty (0 bytes)"),
    (b"0.25 0.5 0.75\n", "is not a PyTorch weights file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Not Found</body></html>", "is not a PyTorch weights file"),
])
def test_broken_reward_files_say_what_is_wrong(host, reward_tree, content, expected):
    name = "rt_broken_reward.pt"
    path = os.path.join(reward_tree["dir"], name)
    with open(path, "wb") as f:
        f.write(content)
    try:
        err = host.run_expect_error({
            "1": {"class_type": "RewardTuneLoadRewardModel",
                  "inputs": {"reward_model": name, "reward_type": "auto", "precision": "fp32", "aesthetic_clip": "(none)"}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
            "3": {"class_type": "RewardTuneScoreImages",
                  "inputs": {"reward_model": ["1", 0], "images": ["2", 0], "prompt": "a", "one_prompt_per_line": False,
                             "batch_size": 8, "caption_images": False}}})
    finally:
        os.remove(path)
    msg = err["exception_message"]
    assert expected in msg and name in msg and "download" in msg.lower(), msg
    assert "pop from empty list" not in msg and "pickled objects" not in msg
