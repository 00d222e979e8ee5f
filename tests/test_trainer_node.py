"""The trainer nodes against a real ComfyUI server (tiny SD1.5 checkpoint, tiny HPSv2 reward):
background and wait modes, attach/resume on re-queue, /interrupt, a server restart mid-job, the
job routes, and two jobs at once."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import uuid

import pytest
import torch

from rewardtune.testing.comfy_host import ComfyServer

SMALL = {"num_steps": 4, "refl_stop_min": 2, "refl_stop_max": 3, "cfg": 2.0}


@pytest.fixture(scope="module")
def trainer_server(models_tree, reward_tree, tmp_path_factory):
    srv = ComfyServer(str(tmp_path_factory.mktemp("trainer_server")), models_tree["yaml"])
    srv.start()
    yield srv
    srv.stop()


def train_prompt(models_tree, reward_tree, *, name, mode="background", steps=3, save_every=1, seed=0, lr=1e-3,
                 objective="refl", extra=None):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_tree["files"]["hpsv2"], "reward_type": "auto", "precision": "fp32",
                         "aesthetic_clip": "(none)"}},
        "3": {"class_type": "RewardTuneTrainLoRA",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward_model": ["2", 0],
                         "job_name": name, "mode": mode, "preset": "custom (the settings below)",
                         "objective": objective, "prompts": "a red apple\na blue car", "dataset_folder": "",
                         "steps": steps, "learning_rate": lr, "rank": 2, "batch_size": 1, "grad_accum": 1,
                         "width": 64, "height": 64, "precision": "fp32", "gradient_checkpointing": False,
                         "save_every": save_every, "seed": seed, "config_json": json.dumps({**SMALL, **(extra or {})})}},
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


def test_background_job_trains_while_the_server_serves_and_the_lora_matches_loraloader(
        trainer_server, models_tree, reward_tree):
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    t0 = time.time()
    entry = srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="bg", steps=12)), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    returned_after = time.time() - t0
    job_id = only_new_job(srv, before, "bg")
    # while it trains: the server answers and another prompt runs
    t1 = time.time()
    srv.get("/object_info")
    # the other prompts sample the very checkpoint the job trains on: the job's private UNet copy
    # keeps them apart (on a shared UNet the foreground unloads the job's adapters mid-step and the
    # job dies: 'NoneType' object has no attribute 'prepare_state'), so the latent equals an idle run
    other = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}}}
    other.update(_sample_nodes(["1", 0], "rt_during"))
    assert srv.wait(srv.queue(other), timeout=120)["status"]["status_str"] == "success"
    state_meanwhile = srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"]
    answered_after = time.time() - t1
    seed = 100
    while srv.get(f"/rewardtune/jobs/{job_id}")["job"]["state"] in ("queued", "running"):  # keep sampling it
        other["8"]["inputs"]["seed"] = seed = seed + 1
        srv.wait(srv.queue({**other, "9": {**other["9"], "inputs": {**other["9"]["inputs"],
                                                                       "filename_prefix": "rt_busy"}}}), timeout=120)
    other["8"]["inputs"]["seed"] = 5
    final = wait_job(srv, job_id)
    srv.post("/free", {"free_memory": True, "unload_models": True})  # drop the cache: sample again, idle
    time.sleep(1.0)
    other["9"]["inputs"]["filename_prefix"] = "rt_idle"
    assert srv.wait(srv.queue(other), timeout=120)["status"]["status_str"] == "success"
    from safetensors.torch import load_file
    during, idle = (load_file(_latest(srv, p))["latent_tensor"] for p in ("rt_during", "rt_idle"))
    assert state_meanwhile == "running" and torch.equal(during, idle)
    assert final["step"] == 12 and final["last"]["step"] == 12
    metrics = srv.get(f"/rewardtune/jobs/{job_id}?since=8")["metrics"]
    assert [m["step"] for m in metrics] == [9, 10, 11, 12]
    print(f"background prompt returned in {returned_after:.2f}s; server answered + other prompt in "
          f"{answered_after:.2f}s while the job was {state_meanwhile}")
    assert returned_after < 30 and state_meanwhile in ("queued", "running", "finished")

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


def _checkpoint(srv, job_id):
    import torch
    return torch.load(os.path.join(srv.workdir, "output", "rewardtune", "jobs", job_id, "checkpoint.pt"),
                      weights_only=True)


def test_wait_mode_progress_interrupt_and_resume(trainer_server, models_tree, reward_tree):
    import websocket
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    client = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={client}", timeout=120)
    prompt = train_prompt(models_tree, reward_tree, name="wait", mode="wait", steps=30, seed=1)
    pid = srv.queue(prompt, client_id=client)
    progress, step_events, at_interrupt, previews = [], [], None, 0
    try:
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                previews += 1  # a binary preview frame: the periodic sample on the node
                continue
            m = json.loads(msg)
            if m["type"] == "progress" and m["data"].get("node") == "3":
                progress.append(m["data"]["value"])
            if m["type"] == "rewardtune.progress":
                step_events.append(m["data"]["step"])
                if m["data"]["step"] >= 3 and at_interrupt is None:
                    at_interrupt = m["data"]["step"]
                    srv.post("/interrupt", {})
            if m["type"] in ("execution_interrupted", "execution_error", "execution_success") and \
                    m["data"].get("prompt_id") == pid:
                kind = m["type"]
                break
    finally:
        ws.close()
    assert kind == "execution_interrupted", (kind, at_interrupt, step_events, srv.log_tail(3000))
    assert progress and max(progress) >= 1 and step_events[:3] == [1, 2, 3]  # the bar is throttled
    job_id = only_new_job(srv, before, "wait")
    st = wait_job(srv, job_id, ("stopped",), timeout=60)
    assert at_interrupt <= st["step"] <= at_interrupt + 1  # within one step
    assert _checkpoint(srv, job_id)["step"] == st["step"]  # the last checkpoint is loadable and current
    samples = os.listdir(os.path.join(srv.workdir, "output", "rewardtune", "jobs", job_id, "samples"))
    assert previews >= 1 and f"step_{st['step'] - 1:06d}.png" in samples  # save_every=1: one per step
    # queueing the same graph resumes the job to its end
    entry = srv.wait(srv.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    st = srv.get(f"/rewardtune/jobs/{job_id}")
    assert st["job"]["state"] == "finished" and st["job"]["step"] == 30
    assert [m["step"] for m in st["metrics"]] == list(range(1, 31))
    # again: attaches to the finished job, trains nothing
    srv.wait(srv.queue(prompt), timeout=120)
    assert len(srv.get(f"/rewardtune/jobs/{job_id}")["metrics"]) == 30


def test_routes_validate_and_cancel_of_a_finished_job_is_harmless(trainer_server):
    srv = trainer_server
    for path, code in (("/rewardtune/jobs/nope-123", 404), ("/rewardtune/jobs/..%2F..%2Fx", (400, 404)),
                       ("/api/rewardtune/jobs/nope-123", 404), ("/rewardtune/jobs/a%2E%2E", (400, 404))):
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.get(path)
        assert e.value.code in (code if isinstance(code, tuple) else (code,)), path
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.post("/rewardtune/jobs/..%2F..%2Fetc/cancel", {})
    assert e.value.code in (400, 404)
    finished = [j for j in jobs(srv) if j["state"] == "finished"]
    assert finished
    res = srv.post(f"/rewardtune/jobs/{finished[0]['id']}/cancel", {})
    assert res["state"] == "finished"
    assert srv.get(f"/rewardtune/jobs/{finished[0]['id']}")["job"]["state"] == "finished"
    assert srv.get("/rewardtune/jobs/" + finished[0]["id"] + "?limit=2")["metrics"][-1]["step"] == finished[0]["step"]
    assert len(srv.get("/rewardtune/jobs/" + finished[0]["id"] + "?limit=2")["metrics"]) == 2


def test_two_jobs_queue_and_neither_corrupts_the_other(trainer_server, models_tree, reward_tree):
    srv = trainer_server
    before = {j["id"] for j in jobs(srv)}
    srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="first", steps=5, seed=3)), timeout=120)
    srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="second", steps=4, seed=4)), timeout=120)
    a, b = only_new_job(srv, before, "first"), only_new_job(srv, before, "second")
    states = {j["id"]: j["state"] for j in jobs(srv)}
    assert states[b] in ("queued", "running", "finished")
    if states[a] == "running":
        assert states[b] == "queued"  # one trains at a time, the other waits
    for job_id, n in ((a, 5), (b, 4)):
        st = wait_job(srv, job_id)
        assert st["step"] == n and _checkpoint(srv, job_id)["step"] == n
        assert [m["step"] for m in srv.get(f"/rewardtune/jobs/{job_id}")["metrics"]] == list(range(1, n + 1))


def test_a_killed_server_lists_the_job_and_resumes_it(models_tree, reward_tree, tmp_path):
    import signal
    srv = ComfyServer(str(tmp_path), models_tree["yaml"]).start()
    try:
        srv.wait(srv.queue(train_prompt(models_tree, reward_tree, name="crash", steps=40, seed=5, save_every=2)),
                 timeout=120)
        (job,) = [j for j in jobs(srv) if j["name"] == "crash"]
        deadline = time.time() + 120
        while srv.get(f"/rewardtune/jobs/{job['id']}")["job"]["step"] < 5 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    saved = _checkpoint(srv, job["id"])["step"]
    assert 2 <= saved < 40
    srv2 = ComfyServer(str(tmp_path), models_tree["yaml"]).start()
    try:
        st = srv2.get(f"/rewardtune/jobs/{job['id']}")["job"]
        assert st["state"] == "interrupted" and st["has_checkpoint"]
        res = srv2.post(f"/rewardtune/jobs/{job['id']}/resume", {})
        assert res["queued"]
        srv2.wait(res["prompt_id"], timeout=120)
        st = wait_job(srv2, job["id"])
        assert st["step"] == 40
        steps = [m["step"] for m in srv2.get(f"/rewardtune/jobs/{job['id']}?limit=5000")["metrics"]]
        assert steps == list(range(1, 41))  # resumed from the checkpoint: the steps after it were redone once
    finally:
        srv2.stop()


def test_example_workflow_trains_then_samples_with_the_combined_ksampler(trainer_server, models_tree, reward_tree):
    """example_workflows/train_imagerefl_then_combined.json over HTTP: ImageReFL on a small
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
