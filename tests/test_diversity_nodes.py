"""Diversity nodes and the quality–diversity sweep through the real host."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from rewardtune.testing.workflow import EXAMPLES, combined_switch_inputs, load_example, ui_to_api

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_IDS = ("RewardTuneLoadDiversityEmbedder", "RewardTuneDiversityScore", "RewardTuneQualityDiversitySweep")


def sweep_prompt(models_tree, reward_file, *, switch_steps="0, 2, 4", blend_powers="1", steps=4, per_prompt=2,
                 prompts="a red car\na snowy mountain", embedder=None):
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": models_tree["lora"],
                                                     "strength_model": 1.0, "strength_clip": 0.0}},
        "3": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": reward_file, "reward_type": "auto", "precision": "auto", "aesthetic_clip": "(none)"}},
        "4": {"class_type": "RewardTuneQualityDiversitySweep",
              "inputs": {"base_model": ["1", 0], "tuned_model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2],
                         "reward_model": ["3", 0], "prompts": prompts, "negative": "", "images_per_prompt": per_prompt,
                         "seed": 3, "steps": steps, "switch_steps": switch_steps, "blend_powers": blend_powers,
                         "cfg_base": 5.0, "cfg_tuned": 1.0, "sampler_name": "euler", "scheduler": "normal",
                         "width": 64, "height": 64}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "rt_sweep"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    if embedder:
        p["7"] = {"class_type": "RewardTuneLoadDiversityEmbedder", "inputs": {"embedder_name": embedder}}
        p["4"]["inputs"]["embedder"] = ["7", 0]
    return p


def test_nodes_registered(host):
    for name in NODE_IDS:
        assert name in host.node_classes, f"{name} not registered"
        node = host.node_classes[name].GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


@pytest.mark.slow
def test_sweep_runs_headless(host, models_tree, reward_tree):
    import folder_paths
    outputs = host.run(sweep_prompt(models_tree, reward_tree["files"]["pickscore"]))
    rows = json.loads(outputs["6"]["text"][0])
    assert [r["point"] for r in rows] == ["k=0", "k=2", "k=4", "AIG p=1"]
    for r in rows:
        for key in ("reward_mean", "reward_std", "diversity", "vendi"):
            assert np.isfinite(r[key]), r
        assert r["images"] == 4 and len(r["diversity_per_prompt"]) == 2 and 1.0 <= r["vendi"] <= 2.0
    assert any(r["pareto"] for r in rows)
    # k = 0 is the tuned model alone, k = N the base alone: the LoRA changes the images
    assert rows[0]["reward_mean"] != rows[2]["reward_mean"]
    saved = outputs["5"]["images"]
    assert len(saved) == 1
    png = Image.open(os.path.join(folder_paths.get_output_directory(), saved[0]["subfolder"], saved[0]["filename"]))
    assert png.format == "PNG" and png.size == (768, 512)
    assert "(Pareto)" in outputs["4"]["text"][0]


@pytest.mark.slow
def test_sweep_row_equals_the_nodes_chained(host, models_tree, reward_tree):
    """A row of the sweep equals Combined KSampler → VAE Decode → Reward Score / Diversity Score
    run as ordinary nodes on the same seed, for a switch point and a blend point."""
    reward = reward_tree["files"]["hpsv2"]
    rows = json.loads(host.run(sweep_prompt(models_tree, reward, switch_steps="2", blend_powers="2",
                                            prompts="a red car"))["6"]["text"][0])
    for row, mode, k, power in ((rows[0], "switch", 2, 1.0), (rows[1], "blend", 4, 2.0)):
        graph = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": models_tree["lora"],
                                                         "strength_model": 1.0, "strength_clip": 0.0}},
            "3": {"class_type": "RewardTuneLoadRewardModel",
                  "inputs": {"reward_model": reward, "reward_type": "auto", "precision": "auto", "aesthetic_clip": "(none)"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red car"}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
            "7": {"class_type": "RewardTuneCombinedKSampler",
                  "inputs": {"base_model": ["1", 0], "tuned_model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0],
                             "latent_image": ["6", 0], "seed": 3, "steps": 4, "cfg_base": 5.0, "cfg_tuned": 1.0,
                             **combined_switch_inputs(switch_step=k, mode=mode, blend_power=power),
                             "sampler_name": "euler", "scheduler": "normal", "handoff": "continuous", "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
            "9": {"class_type": "RewardTuneScoreImages",
                  "inputs": {"reward_model": ["3", 0], "images": ["8", 0], "prompt": "a red car",
                             "one_prompt_per_line": False, "batch_size": 8, "caption_images": False}},
            "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
            "11": {"class_type": "RewardTuneDiversityScore", "inputs": {"images": ["8", 0], "images_per_prompt": 2}},
            "12": {"class_type": "PreviewAny", "inputs": {"source": ["11", 0]}},
        }
        out = host.run(graph)
        scores = [float(t) for t in out["10"]["text"]]
        assert len(scores) == 2
        assert row["reward_mean"] == pytest.approx(float(np.mean(scores)), abs=1e-6)
        assert row["diversity"] == pytest.approx(float(out["12"]["text"][0]), abs=1e-6)
    # negative control: the two points are different images
    assert abs(rows[0]["reward_mean"] - rows[1]["reward_mean"]) > 1e-6


def test_diversity_score_node(host, models_tree):
    images = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a boat"}},
              "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
              "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                         "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
              "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
              "6": {"class_type": "RewardTuneDiversityScore", "inputs": {"images": ["5", 0], "images_per_prompt": 2}},
              "7": {"class_type": "RepeatImageBatch", "inputs": {"image": ["5", 0], "amount": 1}},
              "8": {"class_type": "ImageFromBatch", "inputs": {"image": ["5", 0], "batch_index": 0, "length": 1}},
              "9": {"class_type": "RepeatImageBatch", "inputs": {"image": ["8", 0], "amount": 3}},
              "10": {"class_type": "RewardTuneDiversityScore", "inputs": {"images": ["9", 0], "images_per_prompt": 0}}}
    out = host.run(images)
    text = out["6"]["text"][0]
    assert "2 prompt(s)" in text and "pixels" in text
    value = float(re.search(r"1 - mean cosine: ([\d.]+)", text).group(1))
    assert 0.0 < value <= 2.0
    same = out["10"]["text"][0]
    assert re.search(r"1 - mean cosine: 0\.0000", same) and re.search(r"Vendi \(cosine\): 1\.0000", same)
    # a batch that is not a multiple of images_per_prompt
    images["6"]["inputs"]["images_per_prompt"] = 3
    err = host.run_expect_error(images)
    assert "not a multiple of 3" in err["exception_message"]


def test_sweep_bad_input(host, models_tree, reward_tree):
    err = host.run_expect_error(sweep_prompt(models_tree, reward_tree["files"]["pickscore"], switch_steps="0, 9"))
    assert "switch step 9 must be a whole number in [0, 4]" in err["exception_message"]
    err = host.run_expect_error(sweep_prompt(models_tree, reward_tree["files"]["pickscore"], switch_steps="a, 2"))
    assert "not a number" in err["exception_message"]
    err = host.run_expect_error(sweep_prompt(models_tree, reward_tree["files"]["pickscore"], switch_steps="",
                                             blend_powers=""))
    assert "at least one switch step" in err["exception_message"]
    # a number too large for a float, empty prompt lists: said, not "cannot convert float infinity to integer"
    # or a sweep of the empty prompt
    err = host.run_expect_error(sweep_prompt(models_tree, reward_tree["files"]["pickscore"], switch_steps="0, 1e400"))
    assert "1e400" in err["exception_message"] and "whole number in [0, 4]" in err["exception_message"], err
    for prompts in ("", "  \n\t\n "):
        err = host.run_expect_error(sweep_prompt(models_tree, reward_tree["files"]["pickscore"], prompts=prompts))
        assert "no prompts" in err["exception_message"] and "one per line" in err["exception_message"], err


@pytest.mark.slow
@pytest.mark.server
def test_example_workflows_run_over_http(reward_tree, server, models_tree):
    info = server.get("/object_info")
    for name in NODE_IDS:
        assert name in info, server.log_tail()
    sweep = ui_to_api(load_example(EXAMPLES["sweep"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): models_tree["sd15"], ("LoraLoader", "lora_name"): models_tree["lora"],
            ("RewardTuneLoadRewardModel", "reward_model"): reward_tree["files"]["pickscore"],
            ("RewardTuneQualityDiversitySweep", "steps"): 4, ("RewardTuneQualityDiversitySweep", "switch_steps"): "0, 2, 4",
            ("RewardTuneQualityDiversitySweep", "images_per_prompt"): 2,
            ("RewardTuneQualityDiversitySweep", "width"): 64, ("RewardTuneQualityDiversitySweep", "height"): 64})
    entry = server.wait(server.queue(sweep))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any(o.get("images") for o in entry["outputs"].values())
    div = ui_to_api(load_example(EXAMPLES["diversity"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): models_tree["sd15"],
            ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64, ("KSampler", "steps"): 3})
    entry = server.wait(server.queue(div))
    assert entry["status"]["status_str"] == "success", entry["status"]
    texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert any("1 - mean cosine" in t for t in texts)


@pytest.mark.slow
def test_clip_vision_embedder_equals_file(host, vitl14_clip_vision):
    """Diversity on ComfyUI's own CLIP_VISION equals the same file loaded as an embedder."""
    import torch
    from rewardtune.metrics import cosine_diversity
    from rewardtune.metrics.embedders import load_embedder
    from rewardtune.testing import reward_fixtures as rf
    import folder_paths
    images = rf.test_images(seed=30, size=(200, 240), n=4)
    for i, im in enumerate(images):
        im.save(os.path.join(folder_paths.get_input_directory(), f"rt_div_{i}.png"))
    prompt = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": vitl14_clip_vision["name"]}},
              "2": {"class_type": "RewardTuneLoadDiversityEmbedder",
                    "inputs": {"embedder_name": "pixels (no model)", "clip_vision": ["1", 0]}},
              "3": {"class_type": "RewardTuneLoadDiversityEmbedder", "inputs": {"embedder_name": vitl14_clip_vision["name"]}}}
    batch = None
    for i in range(4):
        prompt[f"i{i}"] = {"class_type": "LoadImage", "inputs": {"image": f"rt_div_{i}.png"}}
        if batch is None:
            batch = [f"i{i}", 0]
        else:
            prompt[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"i{i}", 0]}}
            batch = [f"b{i}", 0]
    prompt["4"] = {"class_type": "RewardTuneDiversityScore", "inputs": {"images": batch, "images_per_prompt": 2, "embedder": ["2", 0]}}
    prompt["5"] = {"class_type": "RewardTuneDiversityScore", "inputs": {"images": batch, "images_per_prompt": 2, "embedder": ["3", 0]}}
    out = host.run(prompt)
    via_comfy = float(re.search(r"1 - mean cosine: ([\d.]+)", out["4"]["text"][0]).group(1))
    via_file = float(re.search(r"1 - mean cosine: ([\d.]+)", out["5"]["text"][0]).group(1))
    lib = cosine_diversity(load_embedder(vitl14_clip_vision["path"]).embed(rf.pil_to_comfy(images)), per_group=2).value
    assert via_file == pytest.approx(lib, abs=1e-4) and via_comfy == pytest.approx(lib, abs=2e-4)
    assert "CLIP_VISION" in out["4"]["text"][0] and lib > 0
    assert torch.isfinite(torch.tensor(lib))
