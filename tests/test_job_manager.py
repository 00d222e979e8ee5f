"""The job manager on its own (no server, no model): what it stores of a job's graph, where it
publishes a finished LoRA, and which jobs it removes. Each job's run here writes a LoRA file and
reports its steps the way the engine does; the HTTP side is tested in test_trainer_node.py."""
from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardtune.jobs.manager import JobError, JobManager, JobSpec, api_prompt
from rewardtune.trainers.config import TrainConfig

LORA = {"diffusion_model.x.lora_up.weight": torch.ones(2, 1), "diffusion_model.x.lora_down.weight": torch.ones(1, 2)}


def executed_prompt() -> dict:
    """An API prompt as ComfyUI's executor leaves it (``hidden.prompt``): ``is_changed`` added."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"},
                  "_meta": {"title": "Load Checkpoint"}},
            "3": {"class_type": "RewardTuneTrainLoRA", "inputs": {"model": ["1", 0], "steps": 3},
                  "is_changed": [float("nan")]}}


def spec(name: str, steps: int = 3, gate: threading.Event | None = None, prompt=None) -> JobSpec:
    def run(job):
        for step in range(job.step + 1, steps + 1):
            if gate is not None:
                gate.wait(30)
            if job.cancel.is_set():
                return job.step
            job.report({"step": step, "reward": 0.1 * step})
        save_file(LORA, job.lora)
        return steps
    return JobSpec(name, TrainConfig(objective="refl", steps=steps), f"fp{name}", run, prompt)


@pytest.fixture
def manager(tmp_path):
    m = JobManager(str(tmp_path / "jobs"), str(tmp_path / "loras" / "rewardtune"),
                   notify=lambda event, data: m.events.append((event, data)))
    m.events = []
    yield m
    m.shutdown(5)


def test_the_job_keeps_a_clean_copy_of_its_graph(manager, tmp_path):
    executed = executed_prompt()
    assert api_prompt(executed) == {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"},
              "_meta": {"title": "Load Checkpoint"}},
        "3": {"class_type": "RewardTuneTrainLoRA", "inputs": {"model": ["1", 0], "steps": 3}}}
    assert math.isnan(executed["3"]["is_changed"][0])  # the executor's prompt itself is left alone
    job = manager.submit(spec("clean", prompt=executed))
    assert job.done.wait(30) and job.state == "finished"
    assert "is_changed" not in job.prompt["3"]
    with open(os.path.join(job.dir, "job.json"), encoding="utf-8") as f:
        assert json.load(f)["prompt"] == api_prompt(executed)
    # a job.json written by an earlier version, with the executed prompt, is cleaned when read
    data = json.load(open(os.path.join(job.dir, "job.json"), encoding="utf-8"))
    data["prompt"] = executed
    with open(os.path.join(job.dir, "job.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    again = JobManager(manager.root, manager.lora_dir)
    assert again.get(job.id).prompt == api_prompt(executed)


def test_publish_is_the_one_writer_of_the_loras_folder(manager):
    job = manager.submit(spec("pub"))
    assert job.done.wait(30) and job.state == "finished"
    final = os.path.join(manager.lora_dir, f"{job.id}.safetensors")
    assert manager.lora_name(job) == f"rewardtune/{job.id}.safetensors"
    assert all(torch.equal(load_file(final)[k], LORA[k]) for k in LORA)  # copied when the job finished
    latest = {k: v * 2 for k, v in LORA.items()}
    assert manager.publish(job, latest_lora=latest) == f"rewardtune/{job.id}-latest.safetensors"
    written = load_file(os.path.join(manager.lora_dir, f"{job.id}-latest.safetensors"))
    assert all(torch.equal(written[k], latest[k]) for k in LORA)


def _user_texts():
    """What a user reads: the README, docs/, the help pages and the templates' notes."""
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "docs", "*.md")),
                 *glob.glob(os.path.join(root, "web", "docs", "**", "*.md"), recursive=True)]:
        yield os.path.relpath(path, root), open(path, encoding="utf-8").read()
    for path in glob.glob(os.path.join(root, "example_workflows", "*.json")):
        notes = [n["widgets_values"][0] for n in json.load(open(path, encoding="utf-8"))["nodes"]
                 if n["type"] in ("MarkdownNote", "Note")]
        yield os.path.relpath(path, root), "\n".join(notes)


def test_the_docs_name_the_published_lora_as_the_manager_writes_it(manager):
    """The LoRA a job publishes is rewardtune/<job name>-<fingerprint>.safetensors (the job id): every
    place a user reads about it says so (they said <job name>.safetensors)."""
    import re
    job = manager.submit(spec("my-run"))
    assert job.done.wait(30) and job.state == "finished"
    documented = {"final": "<job name>-<fingerprint>", "latest": "<job name>-<fingerprint>-latest"}

    def filled(stem):
        name = stem.replace("<job name>", "my-run").replace("<fingerprint>", job.fingerprint)
        return f"rewardtune/{name}.safetensors"
    assert manager.lora_name(job) == filled(documented["final"])
    assert manager.lora_name(job, latest=True) == filled(documented["latest"])
    wrong, seen = [], 0
    for where, text in _user_texts():
        for stem in re.findall(r"rewardtune/(<[^`\n]*?)\.safetensors", text):
            seen += 1
            if stem not in documented.values():
                wrong.append(f"{where}: rewardtune/{stem}.safetensors")
    assert seen >= 4 and not wrong, wrong


def test_remove_deletes_ended_jobs_only(manager):
    gate = threading.Event()
    running = manager.submit(spec("busy", steps=50, gate=gate))
    queued = manager.submit(spec("waiting"))
    for job in (running, queued):
        with pytest.raises(JobError, match=f"job {job.id} is (running|queued): cancel it"):
            manager.remove(job.id)
        assert os.path.isdir(job.dir) and manager.get(job.id) is job
    manager.cancel(queued.id)
    manager.cancel(running.id)
    gate.set()
    assert running.done.wait(30) and running.state == "stopped"
    for job in (running, queued):
        assert manager.remove(job.id) is job
        assert manager.get(job.id) is None and not os.path.exists(job.dir)
    assert os.listdir(manager.root) == []
    assert [d["id"] for e, d in manager.events if e == "rewardtune.removed"] == [running.id, queued.id]
    with pytest.raises(KeyError):
        manager.remove(running.id)
    # a removal a crash left half done is cleaned up when the next manager starts
    os.makedirs(os.path.join(manager.root, ".removed-x-1", "samples"))
    JobManager(manager.root, manager.lora_dir)
    assert os.listdir(manager.root) == []
