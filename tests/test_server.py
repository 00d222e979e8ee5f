"""Against a real ComfyUI server subprocess on 127.0.0.1: the pack is listed, its web file served,
the example workflow runs over HTTP with progress on the websocket, and bad input fails cleanly."""
from __future__ import annotations

import json
import urllib.parse
import uuid

import pytest
import websocket

from rewardtune.testing.workflow import EXAMPLES, combined_example_prompt

pytestmark = pytest.mark.server
OUR_NODES = ("RewardTuneCombinedKSampler", "RewardTuneCombinedGuider")


def example_prompt(server, models, steps=8, switch=6, size=64):
    return combined_example_prompt(server.get("/object_info"), models["sd15"], models["lora"],
                                   steps=steps, switch=switch, size=size)


def test_object_info_lists_the_nodes_with_tooltips(server):
    info = server.get("/object_info")
    for name in OUR_NODES:
        assert name in info, f"{name} missing from /object_info (the pack failed to import?)\n{server.log_tail()}"
        node = info[name]
        assert node["category"] == "RewardTune/sampling"
        assert node["description"]
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert info["RewardTuneCombinedGuider"]["output"] == ["GUIDER"]
    assert info["RewardTuneCombinedKSampler"]["output"] == ["LATENT"]


def test_web_extension_is_served(server):
    exts = server.get("/extensions")
    ours = [e for e in exts if "rewardtune" in e.lower()]
    assert ours, exts
    body = server.get(ours[0])
    assert b"registerExtension" in body


@pytest.mark.slow
def test_example_workflow_runs_over_http_with_progress(server, models_tree):
    steps = 8
    prompt = example_prompt(server, models_tree, steps=steps)
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=120)
    try:
        pid = server.queue(prompt, client_id=client_id)
        progress, done = [], False
        while not done:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue  # preview images
            m = json.loads(msg)
            data = m.get("data", {})
            if data.get("prompt_id") not in (None, pid):
                continue
            if m["type"] == "progress" and data.get("node") == "7":
                progress.append((data["value"], data["max"]))
            if m["type"] == "execution_error":
                pytest.fail(json.dumps(data)[:3000])
            if m["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
                done = True
            if m["type"] == "execution_success":
                done = True
    finally:
        ws.close()
    assert progress and progress[-1] == (steps, steps), progress
    entry = server.wait(pid)
    assert entry["status"]["status_str"] == "success"
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert sorted({img["subfolder"] for img in images}) == ["rewardtune_demo"]
    assert len(images) == 6


@pytest.mark.slow
def test_bad_switch_fails_clearly_and_server_keeps_serving(server, models_tree):
    prompt = example_prompt(server, models_tree, steps=8, switch=9)
    pid = server.queue(prompt)
    entry = server.wait(pid)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "switch step must be between 0 and steps=8" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "RewardTuneCombinedKSampler"
    # still serving, and a good prompt still runs
    assert "RewardTuneCombinedKSampler" in server.get("/object_info")
    ok = server.wait(server.queue(example_prompt(server, models_tree, steps=4, switch=3)))
    assert ok["status"]["status_str"] == "success"


def test_example_workflow_is_listed_as_a_template(server):
    templates = server.get("/workflow_templates")
    name = EXAMPLES["combined"]
    assert name in templates.get("rewardtune", []), templates
    wf = server.get("/api/workflow_templates/rewardtune/" + urllib.parse.quote(name) + ".json")
    if isinstance(wf, bytes):
        wf = json.loads(wf)
    assert any(n["type"] == "RewardTuneCombinedKSampler" for n in wf["nodes"])
