"""Reward nodes through the real host: loaded by ComfyUI's own loader, prompts run by its
executor (in process) and over HTTP by a real server."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.rewards import load_reward_model
from rewardtune.testing.workflow import EXAMPLES, load_example, ui_to_api

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_IDS = ("RewardTuneLoadRewardModel", "RewardTuneScoreImages", "RewardTuneBestOfN")
PROMPT = "a small red house on a hill"


def generate_prompt(models_tree, reward_file, *, batch=4, size=64, steps=3, top_k=2, prompt=PROMPT,
                    per_line=False, aesthetic_clip="(none)", reward_type="auto"):
    """Tiny SD1.5 → 4 images → Load Reward Model → Reward Score + Best-of-N → save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 7, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_file, "reward_type": reward_type, "precision": "auto",
                         "aesthetic_clip": aesthetic_clip}},
        "8": {"class_type": "RewardTuneScoreImages",
              "inputs": {"reward_model": ["7", 0], "images": ["6", 0], "prompt": prompt,
                         "one_prompt_per_line": per_line, "batch_size": 3, "caption_images": True}},
        "9": {"class_type": "RewardTuneBestOfN",
              "inputs": {"reward_model": ["7", 0], "images": ["6", 0], "prompt": prompt,
                         "one_prompt_per_line": per_line, "batch_size": 8, "top_k": top_k}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "rt_all"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "rt_best"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["8", 2], "filename_prefix": "rt_captioned"}},
    }


def parse_scores(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^#\d+: (-?[\d.]+)", text, re.M)]


def saved(output_dir, outputs, node):
    return [np.asarray(Image.open(os.path.join(output_dir, i["subfolder"], i["filename"])), dtype=np.float32) / 255
            for i in outputs[node]["images"]]


def test_nodes_registered_with_the_reward_folder(host, reward_tree):
    for name in NODE_IDS:
        assert name in host.node_classes, f"{name} not registered (the pack failed to import?)"
    import folder_paths
    assert "reward_models" in folder_paths.folder_names_and_paths
    files = folder_paths.get_filename_list("reward_models")
    for f in ("HPS_v2.1_compressed.pt", "PickScore_v1/model.safetensors", "sac+logos+ava1-l14-linearMSE.pth"):
        assert f in files, files
    info = host.node_classes["RewardTuneLoadRewardModel"].GET_NODE_INFO_V1()
    assert "HPS_v2.1_compressed.pt" in info["input"]["required"]["reward_model"][1]["options"]
    clip_opts = info["input"]["required"]["aesthetic_clip"][1]["options"]
    assert "clip-vit-large-patch14.safetensors" in clip_opts
    for name in NODE_IDS:
        node = host.node_classes[name].GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pickscore", "hpsv2", "aesthetic"])
def test_generate_score_and_keep_best(host, models_tree, reward_tree, kind):
    import folder_paths
    files = reward_tree["files"]
    prompt = generate_prompt(models_tree, files[kind],
                             aesthetic_clip=files["clip_vitl"] if kind == "aesthetic" else "(none)")
    outputs = host.run(prompt)
    text = outputs["8"]["text"][0]
    scores = parse_scores(text)
    assert len(scores) == 4 and len(set(scores)) > 1, text
    # the node's scores are the library's scores of the decoded images (saved PNGs: ±1/255)
    out_dir = folder_paths.get_output_directory()
    images = torch.from_numpy(np.stack(saved(out_dir, outputs, "10")))
    kw = {"clip_vision_path": os.path.join(reward_tree["clip_dir"], files["clip_vitl"])} if kind == "aesthetic" else {}
    lib = load_reward_model(os.path.join(reward_tree["dir"], files[kind]), **kw).score(images, PROMPT)
    assert np.allclose(scores, lib.numpy(), atol=2e-3 * (1 + abs(lib).max().item())), (scores, lib)
    # best-of-N kept the two best, best first
    best = saved(out_dir, outputs, "11")
    order = np.argsort(scores)[::-1][:2]
    assert len(best) == 2
    for kept, idx in zip(best, order):
        assert np.array_equal(kept, images[idx].numpy())
    summary = outputs["9"]["text"][0]
    assert f"kept 2: #{order[0]}" in summary
    captioned = saved(out_dir, outputs, "12")
    assert len(captioned) == 4 and not np.array_equal(captioned[0], images[0].numpy())


@pytest.mark.slow
def test_aesthetic_with_comfy_clip_vision_equals_file_path(host, models_tree, reward_tree, vitl14_clip_vision):
    """A CLIP_VISION from ComfyUI's Load CLIP Vision (real ViT-L/14 size, the only sizes its
    loader detects) gives the same scores as the same file loaded by RewardTune."""
    from rewardtune.testing import reward_fixtures as rf
    cv = vitl14_clip_vision["path"]
    images = rf.test_images(seed=22, size=(240, 200), n=2)
    import folder_paths
    for i, im in enumerate(images):
        im.save(os.path.join(folder_paths.get_input_directory(), f"rt_aes_{i}.png"))
    prompt = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "rt_vitl14_full.safetensors"}},
        "2": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_tree["files"]["aesthetic"], "reward_type": "aesthetic",
                         "precision": "fp32", "aesthetic_clip": "(none)", "clip_vision": ["1", 0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "rt_aes_0.png"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "rt_aes_1.png"}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["4", 0]}},
        "6": {"class_type": "RewardTuneScoreImages",
              "inputs": {"reward_model": ["2", 0], "images": ["5", 0], "prompt": "", "one_prompt_per_line": False,
                         "batch_size": 8, "caption_images": False}},
    }
    scores = parse_scores(host.run(prompt)["6"]["text"][0])
    lib = load_reward_model(os.path.join(reward_tree["dir"], reward_tree["files"]["aesthetic"]), clip_vision_path=cv)
    expected = lib.score(rf.pil_to_comfy(images))
    # ComfyUI runs the tower with its own attention kernels: equal up to float32 rounding
    assert np.allclose(scores, expected.numpy(), rtol=5e-4, atol=1e-4), (scores, expected)
    assert expected.std() > 1e-3


def test_errors_say_what_to_do(host, models_tree, reward_tree):
    import folder_paths
    rm_dir = reward_tree["dir"]
    # one prompt per line, but 3 lines for 4 images
    err = host.run_expect_error(generate_prompt(models_tree, reward_tree["files"]["pickscore"],
                                                prompt="a\nb\nc", per_line=True))
    assert "3 prompts for 4 images" in err["exception_message"], err
    # a LoRA dropped into reward_models
    shutil.copy(os.path.join(models_tree["root"], "loras", models_tree["lora"]), os.path.join(rm_dir, "oops_lora.safetensors"))
    try:
        err = host.run_expect_error(generate_prompt(models_tree, "oops_lora.safetensors"))
        assert "looks like a LoRA" in err["exception_message"] and "models/loras" in err["exception_message"], err
    finally:
        os.remove(os.path.join(rm_dir, "oops_lora.safetensors"))
    # the wrong type chosen explicitly
    err = host.run_expect_error(generate_prompt(models_tree, reward_tree["files"]["hpsv2"], reward_type="pickscore"))
    assert "looks like a hpsv2 model, not pickscore" in err["exception_message"], err
    # aesthetic without its CLIP
    err = host.run_expect_error(generate_prompt(models_tree, reward_tree["files"]["aesthetic"]))
    assert "CLIP ViT-L/14" in err["exception_message"], err
    # a file that vanished after the list was made: the message names the folders and the files
    loader = host.node_classes["RewardTuneLoadRewardModel"]
    with pytest.raises(Exception) as info:
        loader.execute("ImageReward.pt", "auto", "auto", "(none)")
    msg = str(info.value)
    assert "not found" in msg and rm_dir in msg and "ImageReward.pt" in msg and "HPS_v2.1_compressed.pt" in msg
    assert folder_paths.get_folder_paths("reward_models")


# --------------------------------------------------------------------------------- server
@pytest.mark.slow
@pytest.mark.server
def test_example_workflow_runs_over_http_and_server_survives_bad_input(reward_tree, server, models_tree):
    info = server.get("/object_info")
    for name in NODE_IDS:
        assert name in info, f"{name} missing from /object_info\n{server.log_tail()}"
    good = ui_to_api(load_example(EXAMPLES["best_of_n"]), info, {
        ("CheckpointLoaderSimple", "ckpt_name"): models_tree["sd15"],
        ("RewardTuneLoadRewardModel", "reward_model"): reward_tree["files"]["pickscore"],
        ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64,
        ("KSampler", "steps"): 3})
    # first a broken prompt: a prompt count mismatch must fail that prompt only
    bad = json.loads(json.dumps(good))
    bad["8"]["inputs"]["one_prompt_per_line"] = True
    bad["8"]["inputs"]["prompt"] = "one\ntwo"
    entry = server.wait(server.queue(bad))
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "2 prompts for 4 images" in errors[0][1]["exception_message"]
    # the server keeps serving: the shipped example workflow runs
    entry = server.wait(server.queue(good))
    assert entry["status"]["status_str"] == "success", entry["status"]
    outs = entry["outputs"]
    assert len(parse_scores(outs["8"]["text"][0])) == 4
    assert len(outs["11"]["images"]) == 1 and len(outs["10"]["images"]) == 4


@pytest.mark.slow
def test_official_imagereward_file_through_the_nodes(host, models_tree, reward_tree, imagereward_oracle):
    """The full-size ImageReward.pt the reference package saved, picked in Load Reward Model."""
    name = "rt_random_ImageReward.pt"
    link = os.path.join(reward_tree["dir"], name)
    if not os.path.lexists(link):
        os.symlink(imagereward_oracle["weights"], link)
    try:
        outputs = host.run(generate_prompt(models_tree, name, batch=2, top_k=1))
    finally:
        os.remove(link)
    text = outputs["8"]["text"][0]
    assert text.startswith("imagereward (rt_random_ImageReward.pt), 2 image(s)"), text
    scores = parse_scores(text)
    assert len(scores) == 2 and all(np.isfinite(scores))
    assert outputs["9"]["text"][0].endswith(f"kept 1: #{int(np.argmax(scores))} ({max(scores):.4f})")


def test_cancel_stops_scoring_between_batches(host, reward_tree):
    """ComfyUI's Cancel (the interrupt flag) is honoured between scoring batches."""
    import comfy.model_management as mm
    handle = host.node_classes["RewardTuneLoadRewardModel"].execute(
        reward_tree["files"]["hpsv2"], "auto", "fp32", "(none)").args[0]
    score = host.node_classes["RewardTuneScoreImages"]
    images = torch.rand(4, 32, 32, 3)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            score.execute(handle, images, "a", False, 2, False)
    finally:
        mm.interrupt_current_processing(False)
    out = score.execute(handle, images, "a", False, 2, False)
    assert len(out.args[0]) == 4
