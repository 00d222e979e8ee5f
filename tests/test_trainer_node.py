"""The trainer nodes against a real ComfyUI server (tiny SD1.5 checkpoint, tiny HPSv2 reward):
background and wait modes, attach/resume on re-queue, /interrupt, a server restart mid-job, the
job routes, two jobs at once, the queue limit, and what the server does while a job trains.

Claims about order ("the step rose while the prompt ran", "the second job started after the
first ended") are read from the websocket: ComfyUI puts every ``send_sync`` (from any thread) on
one queue, so the order of the messages a client receives is the order of the events."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import uuid

import pytest
import torch
from safetensors.torch import load_file

from rewardtune.testing.comfy_host import ComfyServer

SMALL = {"num_steps": 4, "refl_stop_min": 2, "refl_stop_max": 3, "cfg": 2.0}


@pytest.fixture(scope="module")
def trainer_server(models_tree, reward_tree, tmp_path_factory):
    srv = ComfyServer(str(tmp_path_factory.mktemp("trainer_server")), models_tree["yaml"])
    srv.start()
    yield srv
    srv.stop()


def train_prompt(models_tree, reward_tree, *, name, mode="background", steps=3, save_every=1, seed=0, lr=1e-3,
                 objective="refl", extra=None, prompts="a red apple\na blue car", dataset_folder="", config_json=None):
    """Checkpoint → Load Reward Model → Train Reward LoRA. ``config_json`` (a string) replaces the
    SMALL settings merged with ``extra``."""
    if config_json is None:
        config_json = json.dumps({**SMALL, **(extra or {})})
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_tree["files"]["hpsv2"], "reward_type": "auto", "precision": "fp32",
                         "aesthetic_clip": "(none)"}},
        "3": {"class_type": "RewardTuneTrainLoRA",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward_model": ["2", 0],
                         "job_name": name, "mode": mode, "preset": "custom (the settings below)",
                         "objective": objective, "prompts": prompts, "dataset_folder": dataset_folder,
                         "steps": steps, "learning_rate": lr, "rank": 2, "batch_size": 1, "grad_accum": 1,
                         "width": 64, "height": 64, "precision": "fp32", "gradient_checkpointing": False,
                         "save_every": save_every, "seed": seed, "config_json": config_json}},
    }


def _sample_nodes(model_ref, prefix):
    return {"5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": 5, "steps": 4, "cfg": 2.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": ["5", 0], "negative": ["6", 0],
                                                      "latent_image": ["7", 0], "denoise": 1.0}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}}}


def _latest(srv, prefix):
    out = os.path.join(srv.workdir, "output")
    return os.path.join(out, sorted(f for f in os.listdir(out) if f.startswith(prefix))[-1])


def jobs(srv):
    return srv.get("/rewardtune/jobs")["jobs"]


def wait_job(srv, job_id, states=("finished",), timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = srv.get(f"/rewardtune/jobs/{job_id}")["job"]
        if st["state"] in states:
            return st
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} not in {states}: {st}; log:\n{srv.log_tail()}")


def only_new_job(srv, before, name):
    new = [j for j in jobs(srv) if j["id"] not in before and j["name"] == name]
    assert len(new) == 1, new
    return new[0]["id"]


class Events:
    """Every websocket message one client receives, in the server's order (see the module doc)."""

    def __init__(self, srv):
        import websocket
        self.client = str(uuid.uuid4())
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={self.client}", timeout=1)
        self.msgs: list[tuple[str, dict]] = []
        self.binary = 0  # preview frames
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        import websocket
        while not self._closed:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if isinstance(msg, str):
                m = json.loads(msg)
                self.msgs.append((m["type"], m.get("data") or {}))
            else:
                self.binary += 1

    def close(self):
        self._closed = True
        self._thread.join(5)
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def find(self, pred, start=0) -> int | None:
        return next((i for i, (t, d) in enumerate(self.msgs[start:], start) if pred(t, d)), None)

    def find_last(self, pred) -> int | None:
        return max((i for i, (t, d) in enumerate(self.msgs) if pred(t, d)), default=None)

    def wait_for(self, pred, start=0, timeout=120, what="an event") -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            i = self.find(pred, start)
            if i is not None:
                return i
            time.sleep(0.05)
        raise TimeoutError(f"no {what} within {timeout}s; got {[t for t, _ in self.msgs][-30:]}")

    def outcome(self, prompt_id, timeout=300) -> tuple[int, str]:
        """The index and type of the message that ended a prompt."""
        i = self.wait_for(lambda t, d: t in ("execution_success", "execution_interrupted", "execution_error")
                          and d.get("prompt_id") == prompt_id, timeout=timeout, what=f"end of prompt {prompt_id}")
        return i, self.msgs[i][0]

    def steps(self, job_id, start=0, end=None) -> list[int]:
        """The optimizer steps a job reported (rewardtune.progress) between two message indices."""
        return [d["step"] for t, d in self.msgs[start:end] if t == "rewardtune.progress" and d["id"] == job_id]

    def job_state(self, job_id, state) -> int | None:
        return self.find(lambda t, d: t == "rewardtune.job" and d["id"] == job_id and d["state"] == state)

    def node_window(self, prompt_id, node) -> tuple[int, int]:
        """Indices of the message that started a node of a prompt and of the next one of that prompt
        (the next node, or the prompt's end): the node ran between them."""
        a = self.find(lambda t, d: t == "executing" and d.get("prompt_id") == prompt_id and d.get("node") == node)
        assert a is not None, f"node {node} of {prompt_id} never ran"
        b = self.find(lambda t, d: d.get("prompt_id") == prompt_id and t in ("executing", "execution_success",
                                                                             "execution_interrupted",
                                                                             "execution_error"), a + 1)
        assert b is not None
        return a, b


def job_dir(srv, job_id):
    return os.path.join(srv.workdir, "output", "rewardtune", "jobs", job_id)


def metric_rows(srv, job_id) -> list[dict]:
    """The job's metrics.jsonl as written (every field, the step's timing too)."""
    with open(os.path.join(job_dir(srv, job_id), "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_on_disk(srv, models_tree, job_id) -> dict:
    """Content hash and mtime of a finished job's LoRA files and checkpoint, and its metrics file."""
    out = {}
    for path in (os.path.join(job_dir(srv, job_id), "lora.safetensors"),
                 os.path.join(models_tree["root"], "loras", "rewardtune", f"{job_id}.safetensors"),
                 os.path.join(job_dir(srv, job_id), "checkpoint.pt"),
                 os.path.join(job_dir(srv, job_id), "metrics.jsonl")):
        with open(path, "rb") as f:
            out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def run_prompt(srv, ev, prompt, timeout=300) -> tuple[str, dict, int]:
    """Queue a prompt as the Events client; its history entry and the index of its last message."""
    pid = srv.queue(prompt, client_id=ev.client)
    end, _ = ev.outcome(pid, timeout)
    return pid, srv.wait(pid, timeout=60), end


def history_text(entry) -> str:
    return "".join(t for out in entry["outputs"].values() for t in out.get("text", []))


def test_nodes_and_routes_are_registered(trainer_server):
    info = trainer_server.get("/object_info")
    for node in ("RewardTuneTrainLoRA", "RewardTuneLoadTrainedLoRA"):
        assert node in info
        for name, spec in info[node]["input"]["required"].items():
            assert spec[1].get("tooltip"), (node, name)
    assert isinstance(jobs(trainer_server), list)
    # the panel's scripts are served to the browser
    exts = trainer_server.get("/extensions")
    assert any(e.endswith("/rewardtune.js") for e in exts) and any(e.endswith("/rewardtune_panel.js") for e in exts)
    panel = trainer_server.get([e for e in exts if e.endswith("/rewardtune_panel.js")][0])
    assert b"export class JobsPanel" in panel


@pytest.mark.slow
def test_background_job_trains_while_the_server_serves_and_the_lora_matches_loraloader(
        trainer_server, models_tree, reward_tree):
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    ev = Events(srv)
    t0 = time.time()
    prompt = train_prompt(models_tree, reward_tree, name="bg", steps=12)
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}}  # the node's curve output
    entry = srv.wait(srv.queue(prompt), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    returned_after = time.time() - t0
    job_id = only_new_job(srv, before, "bg")
    background_outputs_point_to_the_training_tab(srv, entry, job_id)
    # while it trains, other prompts sample the very checkpoint the job trains on: the job's private
    # UNet copy keeps them apart (on a shared UNet the foreground unloads the job's adapters mid-step
    # and the job dies: 'NoneType' object has no attribute 'prepare_state'), so each latent equals
    # an idle run's. A prompt counts as overlapping when a training step ended while its KSampler
    # ran; the loop samples (one seed per prompt) until the job ends, and at least one must overlap.
    other = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}}}
    other.update(_sample_nodes(["1", 0], "rt_during"))
    overlapped, seed, prompts_run = {}, 4, 0
    try:
        while srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] in ("queued", "running"):
            seed += 1
            other["8"]["inputs"]["seed"] = seed
            other["9"]["inputs"]["filename_prefix"] = f"rt_during_s{seed}_"
            pid, entry, _ = run_prompt(srv, ev, other, timeout=120)
            assert entry["status"]["status_str"] == "success", entry["status"]
            prompts_run += 1
            start, end = ev.node_window(pid, "8")
            inside = ev.steps(job_id, start, end)
            if inside and not overlapped:
                overlapped[seed] = inside
    finally:
        ev.close()
    assert overlapped, f"none of {prompts_run} foreground prompts overlapped a training step"
    final = wait_job(srv, job_id)
    (seed, inside), = overlapped.items()
    srv.post("/free", {"free_memory": True, "unload_models": True})  # drop the cache: sample again, idle
    time.sleep(1.0)
    other["8"]["inputs"]["seed"] = seed
    other["9"]["inputs"]["filename_prefix"] = "rt_idle"
    assert srv.wait(srv.queue(other), timeout=120)["status"]["status_str"] == "success"
    during, idle = (load_file(_latest(srv, p))["latent_tensor"] for p in (f"rt_during_s{seed}_", "rt_idle"))
    assert torch.equal(during, idle), f"the prompt during training step(s) {inside} differs from the idle one"
    assert final["step"] == 12 and final["last"]["step"] == 12
    metrics = srv.get(f"/rewardtune/jobs/{job_id}?since=8")["metrics"]
    assert [m["step"] for m in metrics] == [9, 10, 11, 12]
    print(f"background prompt returned in {returned_after:.2f}s; {prompts_run} foreground prompts ran while the "
          f"job trained; the one with seed {seed} overlapped training step(s) {inside}")
    assert returned_after < 30

    # the companion node's MODEL samples like LoraLoader on the published file
    lora_name = f"rewardtune/{job_id}.safetensors"
    assert lora_name in srv.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]

    sample = _sample_nodes
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
             "2": {"class_type": "RewardTuneLoadTrainedLoRA",
                   "inputs": {"model": ["1", 0], "job": job_id, "which": "final", "strength": 1.0}},
             "3": {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}}
    graph.update(sample(["2", 0], "rt_companion"))
    graph.update({k + "b": v for k, v in sample(["3", 0], "rt_loraloader").items()})
    for k in list(graph):
        if k.endswith("b"):
            for name, val in graph[k]["inputs"].items():
                if isinstance(val, list) and val[0] in ("5", "6", "7", "8"):
                    graph[k]["inputs"][name] = [val[0] + "b", val[1]]
    assert srv.wait(srv.queue(graph), timeout=120)["status"]["status_str"] == "success"
    a, b = load_file(_latest(srv, "rt_companion")), load_file(_latest(srv, "rt_loraloader"))
    assert (a["latent_tensor"] - b["latent_tensor"]).abs().max() <= 1e-5

    # the same run with nothing else sampling gives the same LoRA, bit for bit: the foreground
    # prompts did not leak into the training
    before = {j["id"] for j in jobs(srv)}
    srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="bg-alone", steps=12)), timeout=120)
    alone_id = only_new_job(srv, before, "bg-alone")
    wait_job(srv, alone_id)
    busy = load_file(os.path.join(models_tree["root"], "loras", lora_name))
    alone = load_file(os.path.join(models_tree["root"], "loras", f"rewardtune/{alone_id}.safetensors"))
    assert busy.keys() == alone.keys() and all(torch.equal(busy[k], alone[k]) for k in busy)
    lora = load_file(os.path.join(models_tree["root"], "loras", lora_name))
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())


def background_outputs_point_to_the_training_tab(srv, entry, job_id):
    """A node in background mode returns before its job has trained: its summary and its curve
    image say that the curve is live in the Training tab, that MODEL is the untrained input model
    until the job ends, and the LoRA's file once it ends (the image said "no steps yet"). The image
    shows the summary's lines, nothing else."""
    import numpy as np
    from PIL import Image

    from rewardtune.metrics.plot import curve_plot
    text = history_text(entry)
    assert "Training tab" in text and "untrained input model until the job ends" in text, text
    assert f"published as\nloras/rewardtune/{job_id}.safetensors" in text, text
    note = text[text.index("Training in the background"):].splitlines()
    (shown,) = entry["outputs"]["4"]["images"]
    png = srv.get("/view?" + urllib.parse.urlencode({k: shown[k] for k in ("filename", "subfolder", "type")}))
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    kw = {"title": "bg: reward during training (refl)", "y_label": "s*(R+o)"}
    expected = np.asarray(curve_plot([], [], **kw, empty=note)).astype(int)
    assert image.shape == expected.shape and np.abs(image - expected).max() <= 1
    assert np.abs(image - np.asarray(curve_plot([], [], **kw)).astype(int)).max() > 100  # not "no steps yet"


def _checkpoint(srv, job_id):
    import torch
    return torch.load(os.path.join(srv.workdir, "output", "rewardtune", "jobs", job_id, "checkpoint.pt"),
                      weights_only=True)


@pytest.mark.slow
def test_wait_mode_interrupt_resume_more_steps_and_requeue(trainer_server, models_tree, reward_tree):
    """Cancel stops a wait-mode job after a step; queueing the graph again continues it from its
    checkpoint (the first new step is the saved one + 1; the steps before it are not redone);
    a finished job re-queued trains nothing; more steps continue it; and the result equals an
    uninterrupted run's LoRA bit for bit."""
    srv = trainer_server
    n1, n2 = 6, 8
    before = {j["id"] for j in jobs(srv)}
    prompt = train_prompt(models_tree, reward_tree, name="wait", mode="wait", steps=n1, seed=1)
    with Events(srv) as ev:
        pid = srv.queue(prompt, client_id=ev.client)
        i = ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["step"] >= 2, what="step 2")
        at_interrupt, job_id = ev.msgs[i][1]["step"], ev.msgs[i][1]["id"]
        srv.post("/interrupt", {})
        _, kind = ev.outcome(pid)
    assert kind == "execution_interrupted", (kind, at_interrupt, srv.log_tail(3000))
    progress = [d["value"] for t, d in ev.msgs if t == "progress" and d.get("node") == "3"]
    assert progress and max(progress) >= 1 and ev.steps(job_id)[:2] == [1, 2]  # the bar is throttled
    assert only_new_job(srv, before, "wait") == job_id
    st = wait_job(srv, job_id, ("stopped",), timeout=60)
    saved = st["step"]
    assert at_interrupt <= saved <= at_interrupt + 1 and saved < n1  # within one step
    assert _checkpoint(srv, job_id)["step"] == saved  # the last checkpoint is loadable and current
    samples = os.listdir(os.path.join(job_dir(srv, job_id), "samples"))
    assert ev.binary >= 1 and f"step_{saved - 1:06d}.png" in samples  # save_every=1: one per step
    rows_stopped = metric_rows(srv, job_id)
    assert [r["step"] for r in rows_stopped] == list(range(1, saved + 1))

    # queueing the same graph resumes the job to its end, from the checkpoint
    with Events(srv) as ev:
        _, entry, _ = run_prompt(srv, ev, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert ev.steps(job_id) == list(range(saved + 1, n1 + 1)), "the resumed run did not start after the checkpoint"
    rows = metric_rows(srv, job_id)
    assert [r["step"] for r in rows] == list(range(1, n1 + 1))
    assert rows[:saved] == rows_stopped  # the steps before the checkpoint were kept, not redone (timings too)
    st = srv.get(f"/rewardtune/jobs/{job_id}")["job"]
    assert st["state"] == "finished" and st["step"] == n1

    # again: attaches to the finished job and trains nothing (no step, no file rewritten)
    files = files_on_disk(srv, models_tree, job_id)
    lora_n1 = load_file(os.path.join(job_dir(srv, job_id), "lora.safetensors"))
    with Events(srv) as ev:
        _, entry, _ = run_prompt(srv, ev, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert ev.steps(job_id) == [] and files_on_disk(srv, models_tree, job_id) == files
    assert f"finished at step {n1}/{n1}" in history_text(entry)

    # more steps: the same job continues from its final checkpoint
    more = train_prompt(models_tree, reward_tree, name="wait", mode="wait", steps=n2, seed=1)
    with Events(srv) as ev:
        _, entry, _ = run_prompt(srv, ev, more)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert [j["id"] for j in jobs(srv) if j["name"] == "wait"] == [job_id]  # no new job
    assert ev.steps(job_id) == list(range(n1 + 1, n2 + 1)), "more steps did not continue from the checkpoint"
    assert metric_rows(srv, job_id)[:n1] == rows
    lora = load_file(os.path.join(job_dir(srv, job_id), "lora.safetensors"))
    assert not same_tensors(lora, lora_n1)  # the two steps changed the weights

    # the same settings run once without a break (another name: another job) give the same LoRA
    before = {j["id"] for j in jobs(srv)}
    entry = srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="wait-ref", mode="wait", steps=n2,
                                            seed=1)), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    ref_id = only_new_job(srv, before, "wait-ref")
    assert same_tensors(lora, load_file(os.path.join(job_dir(srv, ref_id), "lora.safetensors")))


@pytest.mark.slow
def test_routes_validate_and_cancel_of_a_finished_job_is_harmless(trainer_server):
    srv = trainer_server
    # every id that names no job answers exactly 404 (jobs/routes.py); tests/test_bad_input.py covers more ids
    for path in ("/rewardtune/jobs/nope-123", "/rewardtune/jobs/..%2F..%2Fx", "/api/rewardtune/jobs/nope-123",
                 "/rewardtune/jobs/a%2E%2E"):
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.get(path)
        assert e.value.code == 404, path
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.post("/rewardtune/jobs/..%2F..%2Fetc/cancel", {})
    assert e.value.code == 404
    finished = [j for j in jobs(srv) if j["state"] == "finished"]
    assert finished
    res = srv.post(f"/rewardtune/jobs/{finished[0]['id']}/cancel", {})
    assert res["state"] == "finished"
    assert srv.get(f"/rewardtune/jobs/{finished[0]['id']}")["job"]["state"] == "finished"
    assert srv.get("/rewardtune/jobs/" + finished[0]["id"] + "?limit=2")["metrics"][-1]["step"] == finished[0]["step"]
    assert len(srv.get("/rewardtune/jobs/" + finished[0]["id"] + "?limit=2")["metrics"]) == 2


@pytest.mark.slow
def test_resume_route_continues_a_stopped_job_without_a_restart(trainer_server, models_tree, reward_tree):
    """Issue 15: a job stopped by Cancel and resumed through the route (no server restart) trains
    on to its end, every step logged once. The job keeps a clean copy of the graph it was queued
    with (ComfyUI's executed prompt carries "is_changed": [NaN]: queued again, the whole graph
    came from the output cache and the job stayed stopped), and the route posts it to ComfyUI's own
    POST /prompt: the trainer node really runs again, and a graph that no longer validates is
    refused with ComfyUI's message. Removing the finished job then deletes its folder and keeps the
    LoRA it published."""
    srv, n = trainer_server, 8
    prompt = train_prompt(models_tree, reward_tree, name="resume-route", steps=n, seed=11)
    before = {j["id"] for j in jobs(srv)}
    with Events(srv) as ev:
        assert srv.wait(srv.queue(prompt), timeout=120)["status"]["status_str"] == "success"
        job_id = only_new_job(srv, before, "resume-route")
        ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["id"] == job_id and d["step"] >= 2, what="step 2")
        assert srv.post(f"/rewardtune/jobs/{job_id}/cancel", {})["id"] == job_id
        saved = wait_job(srv, job_id, ("stopped",), timeout=60)["step"]
    assert 2 <= saved < n and _checkpoint(srv, job_id)["step"] == saved
    with open(os.path.join(job_dir(srv, job_id), "job.json"), encoding="utf-8") as f:
        assert json.load(f)["prompt"] == prompt  # what was queued, nothing the executor added
    # the route posts the graph to ComfyUI's own POST /prompt: a graph that no longer validates (its
    # reward file moved away) is refused with ComfyUI's message, which names the node's input
    reward_file = os.path.join(reward_tree["dir"], reward_tree["files"]["hpsv2"])
    os.rename(reward_file, reward_file + ".away")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.post(f"/rewardtune/jobs/{job_id}/resume", {})
        refusal = e.value.read().decode()
        assert e.value.code == 409 and "no longer validates" in refusal and "reward_model" in refusal, refusal
    finally:
        os.rename(reward_file + ".away", reward_file)
    assert srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] == "stopped"

    with Events(srv) as ev:
        res = srv.post(f"/rewardtune/jobs/{job_id}/resume", {"client_id": ev.client})
        assert res["queued"] and res["state"] == "stopped", res
        entry = srv.wait(res["prompt_id"], timeout=120)
        assert entry["status"]["status_str"] == "success", entry["status"]
        ev.node_window(res["prompt_id"], "3")  # the trainer node ran (a cached node sends no 'executing')
        st = wait_job(srv, job_id, timeout=120)
        ev.wait_for(lambda t, d: t == "rewardtune.job" and d["id"] == job_id and d["state"] == "finished")
    assert st["step"] == n
    assert ev.steps(job_id) == list(range(saved + 1, n + 1)), "the resumed run did not start after the checkpoint"
    assert [r["step"] for r in metric_rows(srv, job_id)] == list(range(1, n + 1))

    # remove: the folder goes, the published LoRA stays; then the id names no job
    published = os.path.join(models_tree["root"], "loras", "rewardtune", f"{job_id}.safetensors")
    assert os.path.exists(published)
    assert srv.post(f"/rewardtune/jobs/{job_id}/remove", {}) == {"id": job_id, "removed": True}
    assert not os.path.exists(job_dir(srv, job_id)) and os.path.exists(published)
    assert job_id not in {j["id"] for j in jobs(srv)}
    for method, path in (("GET", f"/rewardtune/jobs/{job_id}"), ("POST", f"/rewardtune/jobs/{job_id}/remove")):
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.get(path) if method == "GET" else srv.post(path, {})
        assert e.value.code == 404, (method, path)


@pytest.mark.slow
def test_remove_route_refuses_running_and_queued_jobs(trainer_server, models_tree, reward_tree):
    """A running or queued job is never removed (409, its folder untouched); once stopped it is."""
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    ids = []
    try:
        for k, name in enumerate(("rm-running", "rm-queued")):
            entry = srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name=name, steps=10_000, seed=20 + k)),
                             timeout=120)
            assert entry["status"]["status_str"] == "success", entry["status"]
            ids.append(only_new_job(srv, before, name))
        running, queued = ids
        wait_job(srv, running, ("running",), timeout=60)
        assert srv.get(f"/rewardtune/jobs/{queued}")["job"]["state"] == "queued"
        for job_id, state in ((running, "running"), (queued, "queued")):
            with pytest.raises(urllib.error.HTTPError) as e:
                srv.post(f"/rewardtune/jobs/{job_id}/remove", {})
            assert e.value.code == 409, job_id
            text = e.value.read().decode()
            assert f"job {job_id} is {state}" in text and "cancel it" in text, text
            assert os.path.isfile(os.path.join(job_dir(srv, job_id), "job.json"))
            assert srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] == state
    finally:
        for job_id in ids:
            srv.post(f"/rewardtune/jobs/{job_id}/cancel", {})
    for job_id in ids:
        wait_job(srv, job_id, ("stopped",), timeout=60)
        assert srv.post(f"/rewardtune/jobs/{job_id}/remove", {})["removed"]
        assert not os.path.exists(job_dir(srv, job_id))
    assert not {j["id"] for j in jobs(srv)} & set(ids)
    assert not [f for f in os.listdir(os.path.dirname(job_dir(srv, ids[0]))) if f.startswith(".removed-")]


@pytest.mark.slow
def test_two_jobs_queue_and_neither_corrupts_the_other(trainer_server, models_tree, reward_tree):
    """The second job is queued while the first trains and takes its first step only after the
    first has ended (read from the order of the server's events, whatever the timing)."""
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    with Events(srv) as ev:
        srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="first", steps=4, seed=3)), timeout=120)
        a = only_new_job(srv, before, "first")
        ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["id"] == a, what="the first job's first step")
        srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="second", steps=3, seed=4)), timeout=120)
        b = only_new_job(srv, before, "second")
        for job_id, n in ((a, 4), (b, 3)):
            st = wait_job(srv, job_id)
            assert st["step"] == n and _checkpoint(srv, job_id)["step"] == n
            assert [m["step"] for m in srv.get(f"/rewardtune/jobs/{job_id}")["metrics"]] == list(range(1, n + 1))
        ev.wait_for(lambda t, d: t == "rewardtune.job" and d["id"] == b and d["state"] == "finished")
    first_ended, second_queued = ev.job_state(a, "finished"), ev.job_state(b, "queued")
    second_started = ev.job_state(b, "running")
    first_step_b = ev.find(lambda t, d: t == "rewardtune.progress" and d["id"] == b)
    last_step_a = ev.find_last(lambda t, d: t == "rewardtune.progress" and d["id"] == a)
    assert None not in (first_ended, second_queued, second_started, first_step_b, last_step_a), ev.msgs
    assert second_queued < first_ended, "the second job was not queued while the first trained"
    assert last_step_a < first_ended < second_started < first_step_b, "both jobs trained at once"
    assert ev.steps(a) == [1, 2, 3, 4] and ev.steps(b) == [1, 2, 3]


OBJECT_INFO_BOUND_S = 5.0  # measured 1.0-1.8 s while steps ran, on 2 CPU cores shared with other test runs


@pytest.mark.slow
def test_while_a_job_trains_the_server_answers_attaches_loads_cancels_and_limits_the_queue(
        trainer_server, models_tree, reward_tree):
    """One long background job, and while it trains: /object_info answers within seconds; the same
    graph again attaches (no second job); Load Trained LoRA 'newest' gives the checkpoint's LoRA;
    a foreground Cancel stops the foreground prompt, not the job; changed settings start new jobs
    that wait, up to the queue limit, and one more is refused with a message that says what to do."""
    from rewardtune.jobs.manager import MAX_QUEUED
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    busy = train_prompt(models_tree, reward_tree, name="busy", steps=10_000, seed=7)
    idle = []
    for _ in range(2):  # for the log: the same request with nothing training
        t0 = time.perf_counter()
        srv.get("/object_info")
        idle.append(time.perf_counter() - t0)
    ev = Events(srv)
    captured, stop_polling, waiting = {}, threading.Event(), []
    try:
        entry = srv.wait(srv.queue(busy), timeout=120)
        assert entry["status"]["status_str"] == "success", entry["status"]
        job_id = only_new_job(srv, before, "busy")
        ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["id"] == job_id, what="the job's first step")

        # /object_info while steps run: until a step ended between a request's start and its answer
        times, overlapped = [], False
        while not overlapped and len(times) < 20:
            mark, t0 = len(ev.msgs), time.perf_counter()
            srv.get("/object_info", timeout=OBJECT_INFO_BOUND_S + 25)
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)  # let the reader catch up with a progress event sent before the answer
            overlapped = bool(ev.steps(job_id, mark))
        print(f"/object_info idle: {', '.join(f'{t:.2f}' for t in idle)} s; while training: "
              f"{', '.join(f'{t:.2f}' for t in times)} s")
        assert overlapped, "no training step ended during 20 /object_info requests"
        assert max(times) < OBJECT_INFO_BOUND_S, times

        # the same graph again attaches to the running job
        step_before = srv.get(f"/rewardtune/jobs/{job_id}")["job"]["step"]
        mark = len(ev.msgs)
        _, entry, _ = run_prompt(srv, ev, busy)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert [j["id"] for j in jobs(srv) if j["name"] == "busy"] == [job_id]
        assert f"job {job_id}: running" in history_text(entry)
        next_step = ev.steps(job_id, mark)[:1] or ev.steps(job_id, ev.wait_for(
            lambda t, d: t == "rewardtune.progress" and d["id"] == job_id, mark))
        assert next_step[0] > step_before  # it went on; nothing restarted

        # Load Trained LoRA 'newest' mid-run: the LoRA of the checkpoint it names
        ckpt = os.path.join(job_dir(srv, job_id), "checkpoint.pt")

        def poll():  # every checkpoint the job writes (save_every=1: one a step)
            while not stop_polling.is_set():
                try:
                    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
                    captured.setdefault(int(state["step"]), {k: v.clone() for k, v in state["lora"].items()})
                except (OSError, RuntimeError):
                    pass
                time.sleep(0.02)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(0.2)
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
                 "2": {"class_type": "RewardTuneLoadTrainedLoRA",
                       "inputs": {"model": ["1", 0], "job": job_id, "which": "newest", "strength": 1.0}}}
        graph.update(_sample_nodes(["2", 0], "rt_newest"))
        _, entry, _ = run_prompt(srv, ev, graph)
        assert entry["status"]["status_str"] == "success", entry["status"]
        text = history_text(entry)
        step = int(re.search(r"loaded the checkpoint of step (\d+)", text).group(1))
        deadline = time.time() + 60
        while max(captured, default=0) <= step and time.time() < deadline:  # and one checkpoint after it
            time.sleep(0.05)
        stop_polling.set()
        poller.join(5)
        assert f"LoRA: rewardtune/{job_id}-latest.safetensors" in text
        assert step in captured, f"step {step} was not seen by the poller (saw {sorted(captured)})"
        published = load_file(os.path.join(models_tree["root"], "loras", "rewardtune", f"{job_id}-latest.safetensors"))
        assert same_tensors(published, captured[step])
        assert max(captured) > step and not same_tensors(published, captured[max(captured)])  # checkpoints differ
        assert srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] == "running"

        # a foreground Cancel stops the foreground prompt and the job trains on. Three times: the
        # flag is one per process, so a job that read it would take the Cancel from the prompt
        # about half the time (and die), the prompt running on
        fg = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}}}
        fg.update(_sample_nodes(["1", 0], "rt_cancelled"))
        mark = len(ev.msgs)
        for k in range(3):
            fg["8"]["inputs"].update(steps=10_000, seed=1000 + k)
            pid = srv.queue(fg, client_id=ev.client)
            ev.wait_for(lambda t, d: t == "progress" and d.get("prompt_id") == pid, what="the foreground sampler's progress")
            srv.post("/interrupt", {})
            end, kind = ev.outcome(pid, timeout=60)
            assert kind == "execution_interrupted" and ev.msgs[end][1]["node_type"] == "KSampler", ev.msgs[end]
            ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["id"] == job_id, end, timeout=60,
                        what="a training step after the Cancel")
        ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["id"] == job_id,
                    ev.find_last(lambda t, d: t == "rewardtune.progress" and d["id"] == job_id) + 1, timeout=60,
                    what="a whole training step after the last Cancel")
        st = srv.get(f"/rewardtune/jobs/{job_id}")["job"]
        assert st["state"] == "running" and st["error"] is None
        assert ev.find(lambda t, d: t == "rewardtune.job" and d["id"] == job_id, mark) is None  # no state change

        # changed settings: new jobs (same name, another id) that wait; one past the limit is refused
        waiting = []
        for k in range(MAX_QUEUED):
            changed = train_prompt(models_tree, reward_tree, name="busy", steps=10_000, seed=7, lr=2e-3 + 1e-3 * k)
            entry = srv.wait(srv.queue(changed), timeout=120)
            assert entry["status"]["status_str"] == "success", entry["status"]
            (new,) = [j for j in jobs(srv) if j["name"] == "busy" and j["id"] not in (job_id, *waiting)]
            assert new["state"] == "queued" and f"job {new['id']}: queued" in history_text(entry)
            waiting.append(new["id"])
        count = len(jobs(srv))
        refused = train_prompt(models_tree, reward_tree, name="busy", steps=10_000, seed=8)
        entry = srv.wait(srv.queue(refused), timeout=120)
        assert entry["status"]["status_str"] == "error"
        (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert err["node_type"] == "RewardTuneTrainLoRA" and err["exception_type"].endswith("JobError"), err
        assert f"{MAX_QUEUED} training jobs are already waiting" in err["exception_message"]
        assert "cancel one" in err["exception_message"] and "Traceback" not in err["exception_message"]
        assert len(jobs(srv)) == count and srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] == "running"
    except BaseException:
        srv.post("/interrupt", {})  # a 10,000-step foreground prompt a failed Cancel left running
        raise
    finally:
        stop_polling.set()
        ev.close()
        for j in jobs(srv):  # leave nothing running for the next tests
            if j["state"] in ("queued", "running"):
                srv.post(f"/rewardtune/jobs/{j['id']}/cancel", {})
    for w in waiting:
        st = srv.get(f"/rewardtune/jobs/{w}")["job"]
        assert st["state"] == "stopped" and st["step"] == 0 and not st["has_checkpoint"]
    st = wait_job(srv, job_id, ("stopped",), timeout=60)
    assert _checkpoint(srv, job_id)["step"] == st["step"] and st["step"] < 10_000


@pytest.mark.slow
def test_a_killed_server_lists_the_job_and_resumes_it(models_tree, reward_tree, tmp_path):
    """SIGKILL mid-job, start the server again, resume: the run continues from the checkpoint (the
    first new step is the saved one + 1, the logged steps before it are kept) and its LoRA equals
    an uninterrupted job's bit for bit."""
    import signal
    n = 6
    srv = ComfyServer(str(tmp_path), models_tree["yaml"]).start()
    try:
        srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="crash", steps=n, seed=5, save_every=2)),
                 timeout=120)
        (job,) = [j for j in jobs(srv) if j["name"] == "crash"]
        deadline = time.time() + 120
        while srv.get(f"/rewardtune/jobs/{job['id']}")["job"]["step"] < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    saved = _checkpoint(srv, job["id"])["step"]
    assert 2 <= saved < n
    rows_at_kill = metric_rows(srv, job["id"])
    assert [r["step"] for r in rows_at_kill][:saved] == list(range(1, saved + 1))
    srv2 = ComfyServer(str(tmp_path), models_tree["yaml"]).start()
    try:
        st = srv2.get(f"/rewardtune/jobs/{job['id']}")["job"]
        assert st["state"] == "interrupted" and st["has_checkpoint"]
        with Events(srv2) as ev:
            res = srv2.post(f"/rewardtune/jobs/{job['id']}/resume", {})
            assert res["queued"]
            srv2.wait(res["prompt_id"], timeout=120)
            st = wait_job(srv2, job["id"])
            ev.wait_for(lambda t, d: t == "rewardtune.job" and d["id"] == job["id"] and d["state"] == "finished")
        assert st["step"] == n
        assert ev.steps(job["id"]) == list(range(saved + 1, n + 1)), "the resumed run did not start after the checkpoint"
        rows = metric_rows(srv2, job["id"])
        assert [r["step"] for r in rows] == list(range(1, n + 1))  # the steps after the checkpoint were redone once
        assert rows[:saved] == rows_at_kill[:saved]  # and the ones before it kept
        before = {j["id"] for j in jobs(srv2)}
        srv2.wait(srv2.queue(train_prompt(models_tree, reward_tree, name="crash-ref", steps=n, seed=5, save_every=2)),
                  timeout=120)
        ref_id = only_new_job(srv2, before, "crash-ref")
        wait_job(srv2, ref_id)
    finally:
        srv2.stop()
    resumed, ref = (load_file(os.path.join(job_dir(srv2, i), "lora.safetensors")) for i in (job["id"], ref_id))
    assert same_tensors(resumed, ref)


@pytest.mark.slow
def test_example_workflow_trains_then_samples_with_the_combined_ksampler(trainer_server, models_tree, reward_tree):
    """The ImageReFL template (example_workflows/5 Train ImageReFL …) over HTTP: ImageReFL on a small
    folder in the input directory, then base → freshly tuned with the Combined KSampler."""
    from rewardtune.testing.workflow import train_example_prompt, write_tiny_dataset
    srv = trainer_server
    write_tiny_dataset(os.path.join(srv.workdir, "input", "rt_example_dataset"))
    prompt = train_example_prompt(srv.get("/object_info"), models_tree["sd15"], reward_tree["files"]["hpsv2"],
                                  "rt_example_dataset", job_name="example")
    entry = srv.wait(srv.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (job,) = [j for j in jobs(srv) if j["name"] == "example"]
    assert job["state"] == "finished" and job["step"] == 6 and job["objective"] == "imagerefl"
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(saved) == 2 and all(img["filename"].startswith("rewardtune_after_training") for img in saved)
    text = "".join(t for out in entry["outputs"].values() for t in out.get("text", []))
    assert "finished at step 6/6" in text and f"rewardtune/{job['id']}.safetensors" in text


@pytest.mark.slow
def test_the_node_trains_sqdf_with_and_without_a_consistency_model(trainer_server, models_tree, reward_tree):
    srv = trainer_server
    spec = srv.get("/object_info/RewardTuneTrainLoRA")["RewardTuneTrainLoRA"]["input"]["optional"]["lcm_lora"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert options[0] == "(none)" and models_tree["lora"] in options
    for name, lcm in (("sqdf", "(none)"), ("sqdf-lcm", models_tree["lora"])):  # the tiny LoRA as a stand-in LCM-LoRA
        prompt = train_prompt(models_tree, reward_tree, name=name, mode="wait", steps=2, objective="sqdf",
                              extra={"sqdf_collect": 2, "sqdf_buffer": 4, "sqdf_window": 4})
        prompt["3"]["inputs"]["lcm_lora"] = lcm
        entry = srv.wait(srv.queue(prompt), timeout=300)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (job,) = [j for j in jobs(srv) if j["name"] == name]
        assert job["state"] == "finished" and job["config"]["objective"] == "sqdf"
        metrics = srv.get(f"/rewardtune/jobs/{job['id']}")["metrics"]
        assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["kl"] == 0.0 and "collect_reward" in metrics[0]
        text = "".join(t for out in entry["outputs"].values() for t in out.get("text", []))
        expected = "no LCM-LoRA given" if lcm == "(none)" else f"consistency model {lcm}"
        assert expected in text, text


@pytest.mark.slow
def test_the_node_refuses_a_run_that_will_not_fit_before_a_job_exists_and_caches_the_estimate(
        trainer_server, models_tree, reward_tree):
    """The step's peak is estimated (FakeTensorMode) where the node checks its config, before the
    job is submitted: a deliberately tiny memory budget is refused with what to lower and leaves
    no job; a sufficient budget trains, with the estimate from the cache (same models and memory
    settings); with no budget on the CPU there is nothing to check."""
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    settings = {**SMALL, "batch_size": 2, "decode_checkpointing": False}
    jobs_root = os.path.join(srv.workdir, "output", "rewardtune", "jobs")
    folders = set(os.listdir(jobs_root)) if os.path.isdir(jobs_root) else set()

    tiny = train_prompt(models_tree, reward_tree, name="fits", mode="wait", steps=1,
                        extra={**settings, "memory_budget_gb": 0.001})
    entry = srv.wait(srv.queue(tiny), timeout=300)
    assert entry["status"]["status_str"] == "error"
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_type"] == "RewardTuneTrainLoRA" and err["exception_type"].endswith("ConfigError"), err
    msg = err["exception_message"]
    assert "this run will not fit" in msg and "Traceback" not in msg
    for what in ("turn on gradient_checkpointing", "turn on decode_checkpointing", "lower batch_size (now 2"):
        assert what in msg, msg
    assert "the device has 0.0 GiB" in msg and "memory_budget_gb" in msg and "estimated in" in msg, msg
    needed = float(re.search(r"needs about ([0-9.]+) GiB", msg).group(1))
    assert 0 < needed < 4, msg  # the tiny SD1.5 (25.8M UNet) at 64×64: a fraction of a GiB
    # refused before the job: no job listed, no job folder written
    assert {j["id"] for j in jobs(srv)} == before
    assert (set(os.listdir(jobs_root)) if os.path.isdir(jobs_root) else set()) == folders

    # the same models and memory settings with room to spare: trains; the estimate is the cached one
    ok = train_prompt(models_tree, reward_tree, name="fits", mode="wait", steps=1,
                      extra={**settings, "memory_budget_gb": 64})
    entry = srv.wait(srv.queue(ok), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = history_text(entry)
    assert "state finished" in text or ": finished at step 1/1" in text, text
    line = next(t for t in text.splitlines() if t.startswith("memory: "))
    assert "fits the 64.0 GiB available" in line and "(memory_budget_gb; cached estimate)" in line, line
    assert "UNet: the job trains on a private copy (+" in text, text
    assert len([j for j in jobs(srv) if j["id"] not in before and j["name"] == "fits"]) == 1

    # no budget, on the CPU: not checked (and said so)
    plain = train_prompt(models_tree, reward_tree, name="fits-cpu", mode="wait", steps=1)
    entry = srv.wait(srv.queue(plain), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "memory: not checked: the model runs on the CPU" in history_text(entry)


# ------------------------------------------------------------------ small cards: no private UNet copy
CARD = {**SMALL, "save_every": 1}
FIGURES = re.compile(r"the step with the copy needs ([0-9.]+) (MiB|GiB), the step alone ([0-9.]+) (MiB|GiB)")


def _gib(value: str, unit: str) -> float:
    return float(value) / (1024 if unit == "MiB" else 1)


def _base_sample(models_tree, variant: int, prefix: str) -> dict:
    """The checkpoint's own model sampled by KSamplerAdvanced over the whole schedule (what KSampler
    does). ``variant`` moves end_at_step past the schedule's end: the same result, but another
    cache key, so ComfyUI samples again instead of returning the cached latent, while the
    checkpoint loader (same inputs) hands over the very MODEL object the jobs trained on."""
    nodes = _sample_nodes(["1", 0], prefix)
    ks = nodes.pop("8")["inputs"]
    nodes["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ks["model"], "add_noise": "enable", "noise_seed": ks["seed"], "steps": ks["steps"], "cfg": ks["cfg"],
        "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"], "positive": ks["positive"],
        "negative": ks["negative"], "latent_image": ks["latent_image"], "start_at_step": 0,
        "end_at_step": 10000 - variant, "return_with_leftover_noise": "disable"}}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}}, **nodes}


def _train_and_sample_tuned(models_tree, reward_tree, name, extra, prefix, **kw):
    """A wait-mode training prompt whose tuned MODEL output is sampled right after the job."""
    prompt = train_prompt(models_tree, reward_tree, name=name, mode="wait", steps=kw.pop("steps", 2),
                          extra={**CARD, **extra}, **kw)
    prompt.update({k + "t": v for k, v in _sample_nodes(["3", 0], prefix).items()})
    for node in ("8t", "9t"):
        for key, val in prompt[node]["inputs"].items():
            if isinstance(val, list) and val[0] in ("5", "6", "7", "8"):
                prompt[node]["inputs"][key] = [val[0] + "t", val[1]]
    return prompt


@pytest.mark.slow
def test_auto_trains_on_the_graphs_weights_when_no_copy_fits_and_leaves_the_model_as_it_was(
        trainer_server, models_tree, reward_tree):
    """unet_copy "auto" (the default): a budget that holds the step and a private UNet copy trains on
    the copy; one that holds the step but not the copy trains (mode wait) on the graph's own
    weights — the same LoRA bit for bit, the tuned MODEL output carries it, and the summary says
    which and why. After a shared job that finished or was cancelled, the graph's model (the cached
    loader output the job trained on) samples exactly what it sampled before (a failed one:
    test_small_card.py, in process)."""
    srv = trainer_server
    ev = Events(srv)
    try:
        def base(variant):
            pid, entry, _ = run_prompt(srv, ev, _base_sample(models_tree, variant, f"rt_card_base{variant}_"))
            assert entry["status"]["status_str"] == "success", entry["status"]
            cached = [n for t, d in ev.msgs if t == "execution_cached" and d.get("prompt_id") == pid
                      for n in d["nodes"]]
            return load_file(_latest(srv, f"rt_card_base{variant}_"))["latent_tensor"], cached

        before, _ = base(0)

        # a large budget: a private copy, with the figures that decide it
        _, entry, _ = run_prompt(srv, ev, _train_and_sample_tuned(models_tree, reward_tree, "card-private",
                                                                  {"memory_budget_gb": 64}, "rt_card_tp_"))
        assert entry["status"]["status_str"] == "success", entry["status"]
        text = history_text(entry)
        unet = next(t for t in text.splitlines() if t.startswith("UNet: "))
        assert unet.startswith("UNet: the job trains on a private copy (+") and "budget 64.0 GiB" in unet, unet
        both, u1, alone, u2 = FIGURES.search(unet).groups()
        both, alone = _gib(both, u1), _gib(alone, u2)
        assert 0 < alone < both, unet
        (private_job,) = [j for j in jobs(srv) if j["name"] == "card-private"]

        # a budget between the step alone and the step with the copy: the graph's weights
        budget = (alone + both) / 2
        _, entry, _ = run_prompt(srv, ev, _train_and_sample_tuned(models_tree, reward_tree, "card-shared",
                                                                  {"memory_budget_gb": budget}, "rt_card_ts_"))
        assert entry["status"]["status_str"] == "success", entry["status"]
        text = history_text(entry)
        assert "finished at step 2/2" in text, text
        unet = next(t for t in text.splitlines() if t.startswith("UNet: "))
        assert unet.startswith("UNet: trains on the graph's weights (no room for a private copy: the step with the "
                               "copy needs"), unet
        assert "the queue waits for this node" in unet, unet
        (shared_job,) = [j for j in jobs(srv) if j["name"] == "card-shared"]
        private_lora, shared_lora = (load_file(os.path.join(job_dir(srv, j["id"]), "lora.safetensors"))
                                     for j in (private_job, shared_job))
        assert same_tensors(private_lora, shared_lora), "training on the shared weights trained something else"
        tuned_private, tuned_shared = (load_file(_latest(srv, p))["latent_tensor"] for p in ("rt_card_tp_", "rt_card_ts_"))
        assert torch.equal(tuned_shared, tuned_private) and not torch.equal(tuned_shared, before)

        after, cached = base(1)
        assert "1" in cached, "the checkpoint loader ran again: not the model the job trained on"
        assert torch.equal(after, before), "the graph's model changed after a shared job"

        # a job cancelled on the shared weights
        stopping = train_prompt(models_tree, reward_tree, name="card-stop", mode="wait", steps=50,
                                extra={**CARD, "memory_budget_gb": budget})
        pid = srv.queue(stopping, client_id=ev.client)
        start = len(ev.msgs)
        ev.wait_for(lambda t, d: t == "rewardtune.progress" and d["step"] >= 1, start=start, what="step 1")
        srv.post("/interrupt", {})
        _, kind = ev.outcome(pid)
        assert kind == "execution_interrupted"
        (stopped,) = [j for j in jobs(srv) if j["name"] == "card-stop"]
        assert wait_job(srv, stopped["id"], ("stopped",), timeout=60)["step"] < 50
        after, cached = base(2)
        assert "1" in cached and torch.equal(after, before), "the graph's model changed after a cancelled shared job"
    finally:
        ev.close()


@pytest.mark.slow
def test_a_background_job_never_shares_the_graphs_weights(trainer_server, models_tree, reward_tree):
    """Mode background with no room for the private copy is refused before a job exists, saying to
    use mode wait; so is unet_copy "shared" in mode background, and an unknown unet_copy."""
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}

    def error(extra):
        prompt = train_prompt(models_tree, reward_tree, name="card-bg", mode="background", steps=1,
                              extra={**CARD, **extra})
        entry = srv.wait(srv.queue(prompt), timeout=300)
        assert entry["status"]["status_str"] == "error", entry["status"]
        (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert err["exception_type"].endswith("ConfigError"), err
        return err["exception_message"]

    # a background job with room for the copy: its summary has the figures that decide
    prompt = train_prompt(models_tree, reward_tree, name="card-bg", mode="background", steps=1,
                          extra={**CARD, "memory_budget_gb": 64})
    entry = srv.wait(srv.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    both, u1, alone, u2 = FIGURES.search(history_text(entry)).groups()
    started = only_new_job(srv, before, "card-bg")
    wait_job(srv, started)
    before.add(started)
    # queued again, it attaches to that job: the UNet line does not claim this queue's choice for it
    entry = srv.wait(srv.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "UNet: as chosen when this job started (this queue attached to it)" in history_text(entry)

    # a budget that holds the step but not the copy
    msg = error({"memory_budget_gb": (_gib(alone, u2) + _gib(both, u1)) / 2})
    assert "no room for the background job's private copy of the UNet" in msg and "Use mode wait" in msg, msg
    assert FIGURES.search(msg), msg

    msg = error({"unet_copy": "shared"})
    assert 'unet_copy "shared"' in msg and "use mode wait" in msg, msg
    msg = error({"unet_copy": "copy"})
    assert "unet_copy must be one of auto, private, shared" in msg, msg
    assert {j["id"] for j in jobs(srv)} == before  # nothing was started
