"""The toy world through the loaders and the executor a user's files go through.

The world's files are written from the committed weights (toyworld/weights/) into the cache, once
per machine, linked into the session's models tree, and then only ComfyUI's own nodes
(CheckpointLoaderSimple, CLIPTextEncode, KSampler, VAEDecode, SaveImage) and the pack's reward
nodes touch them. The figures asserted here are the ones docs/toyworld.md reports, measured on the
committed weights, with tolerances near what was measured.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.toyworld import build as B
from rewardtune.toyworld import detector as D
from rewardtune.toyworld import scenes as S
from rewardtune.toyworld import world as W

SEEDS = 8


def test_committed_weights_are_this_recipes():
    """The committed weights were built from this code's recipe (the source files' text and
    RECIPE): changing either without rebuilding fails here rather than silently testing an old world."""
    m = W.committed_manifest()
    assert m is not None, f"no committed weights at {W.COMMITTED}"
    assert m["hash"] == B.recipe_hash(), "toyworld's code or RECIPE changed: rebuild (`python scripts/toyworld.py build`)"
    # the budget: the diffusion model trains in at most 15 minutes on 2 cores (measured 9.6)
    assert m["seconds"]["diffusion"] < 15 * 60, m["seconds"]


def graph(checkpoint: str, caption: str, seed: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": caption}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": S.SIZE, "height": S.SIZE, "batch_size": SEEDS}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 20, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "RewardTuneLoadRewardModel",
              "inputs": {"reward_model": W.REWARD + "/model.safetensors", "reward_type": "auto", "precision": "auto",
                         "aesthetic_clip": "(none)"}},
        "9": {"class_type": "RewardTuneScoreImages",
              "inputs": {"reward_model": ["8", 0], "images": ["6", 0], "prompt": caption, "one_prompt_per_line": False,
                         "batch_size": 8, "caption_images": False}},
    }


def saved(outputs, node) -> np.ndarray:
    import folder_paths
    out = folder_paths.get_output_directory()
    return np.stack([np.asarray(Image.open(os.path.join(out, i["subfolder"], i["filename"])).convert("RGB"),
                                dtype=np.float32) / 255 for i in outputs[node]["images"]])


def colours(images) -> list[set[str]]:
    return [{s.colour for s in d.shapes} for d in D.detect_batch(images)]


def test_plain_comfyui_graph_draws_the_captions_colour_and_the_reward_nodes_score_it(host, toy_world):
    """CheckpointLoaderSimple → CLIPTextEncode → KSampler → VAEDecode on the world's checkpoint
    draws the caption's colour (the detector's reading of the PNGs SaveImage wrote), another
    caption's colour rarely; the pack's evaluation sampler draws the same pictures; the Reward
    Score node scores them as the learned reward the pack's loader returns."""
    import re
    from rewardtune.toyworld import evaluate as E
    world = toy_world["world"]
    found = {}
    for caption, colour, other in (("a red circle", "red", "blue"), ("a blue square", "blue", "red")):
        outputs = host.run(graph(toy_world["checkpoint"], caption, 3, "toy"))
        images = saved(outputs, "7")
        assert images.shape == (SEEDS, S.SIZE, S.SIZE, 3)
        seen = colours(images)
        found[caption] = (sum(colour in c for c in seen), sum(other in c for c in seen))
        # the pack's sampler (what docs/reproduction.md measures with) is KSampler, bit for bit up to PNG rounding
        ours = E.sample(world.model, None, E.ConditioningCache(world.clip), world.vae, [caption], SEEDS, seed=3)
        assert np.abs(ours - images).max() <= 1 / 255 + 1e-6
        # Reward Score's numbers are the learned reward's on these pictures
        scores = [float(x) for x in re.findall(r"^#\d+: (-?[\d.]+)", outputs["9"]["text"][0], re.M)]
        lib = world.reward.score(torch.from_numpy(ours), [caption] * SEEDS).float().numpy()
        assert np.allclose(scores, lib, atol=1e-3), (scores, lib)
    for caption, (right, wrong) in found.items():
        assert right >= 6 and wrong <= 1, found


def test_clip_text_encode_equals_the_fast_path_the_world_was_trained_with(toy_world):
    """Training encoded captions with models.encode_captions (identity layers skipped); CLIPTextEncode
    on the loaded checkpoint computes the same numbers, so a user's prompt reaches the model as the
    training captions did."""
    from rewardtune.toyworld import models as M
    clip = toy_world["world"].clip
    captions = ["a red circle", "a green square to the left of a yellow triangle", "a red circle, a blue square and a purple triangle", ""]
    fast = M.encode_captions(clip, captions)
    for c in captions:
        ref = clip.encode_from_tokens_scheduled(clip.tokenize(c))
        assert torch.equal(ref[0][0], fast[c][0][0])
        assert torch.equal(ref[0][1]["pooled_output"], fast[c][0][1]["pooled_output"])


@pytest.mark.slow
def test_held_out_captions_and_the_detector_figures(toy_world):
    """The figures the build measured and docs/toyworld.md reports, measured again here on the
    loaded world (seen and held-out captions, 8 pictures each)."""
    from rewardtune.toyworld import evaluate as E
    world = toy_world["world"]
    conds = E.ConditioningCache(world.clip)
    m = W.manifest(toy_world["folder"])["figures"]
    caps = S.held_out_captions()
    got = E.detector_accuracy(E.sample(world.model, None, conds, world.vae, caps, SEEDS), caps, SEEDS)
    assert got == m["detector_held_out"]
