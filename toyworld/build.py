"""Building the toy world from nothing: the recipe, its hash, the stages in order, the files.

    world = build_world(out_dir)          # ~15 min on 2 CPU cores; see RECIPE

writes into ``out_dir``:

* ``models/checkpoints/rt_toyworld.safetensors``: the all-in-one SD3.5-family checkpoint
  (MMDiT + CLIP-L + TAESD3-layout VAE) CheckpointLoaderSimple reads;
* ``models/reward_models/rt_toyworld_pickscore/``: the learned reward as a PickScore folder;
* ``manifest.json``: the recipe, its hash, what each stage measured, how long it took.

The recipe is plain values; its hash (with the toy world's source files) names the cache folder,
so a changed recipe or code builds a new world and an unchanged one is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch

from . import weights as W

HERE = os.path.dirname(os.path.abspath(__file__))

RECIPE = {
    "version": 1,
    "seed": 0,
    "threads": 2,
    "vae": {"steps": 2500, "crop": 32, "crop_fraction": 0.8, "crop_batch": 16, "batch": 8, "lr": 2e-3,
            "fg_weight": 9.0, "edge_weight": 1.0, "latent_noise": 0.1},
    "data": {"images": 16000},
    "diffusion": {"depth": 2, "steps": 4000, "batch": 32, "lr": 1e-3, "weight_decay": 0.0, "cond_drop": 0.1,
                  "shift": 3.0, "ema": 0.999},
    "reward": {"pairs": 6000, "held_out_pairs": 1000, "steps": 2000, "batch": 64, "lr": 1e-3, "weight_decay": 1e-2},
    "clip_seed": 7,
}
# the files whose code decides what the world is (their text is hashed with the recipe)
SOURCES = ("scenes.py", "models.py", "train.py", "reward.py", "preference.py", "detector.py", "build.py")
CHECKPOINT = "rt_toyworld.safetensors"
REWARD = "rt_toyworld_pickscore"
PACKED = "world.safetensors.xz"


def recipe_hash(recipe: dict = RECIPE) -> str:
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def build_world(out_dir: str, recipe: dict = RECIPE, log=print) -> dict:
    """Train every network of the world and write its files into ``out_dir``; returns the manifest.
    ComfyUI must be importable (its arguments set) before this is called."""
    import comfy.sd
    from . import models as M
    from . import scenes as S
    from . import train as T
    from .reward import train_reward
    torch.set_num_threads(recipe["threads"])
    seed, times, figures = recipe["seed"], {}, {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    taesd = T.train_vae(recipe["vae"], seed + 1, log)
    times["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scenes = S.sample_scenes(seed + 2, recipe["data"]["images"])
    latents = T.encode_images(taesd, S.render_batch(scenes))
    model = M.build_mmdit(recipe["diffusion"]["depth"], seed + 3, S.SIZE // 8)
    sd = M.checkpoint_state_dict(model, M.clip_l_state_dict(recipe["clip_seed"]), taesd)
    patcher, clip = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=True)[:2]
    captions = sorted({s.caption for s in scenes} | {""})
    conds = M.encode_captions(clip, captions)
    index = {c: i for i, c in enumerate(captions)}
    context = torch.cat([conds[c][0][0][..., :M.CLIP_WIDTH] for c in captions])
    pooled = torch.cat([conds[c][0][1]["pooled_output"][..., :M.CLIP_WIDTH] for c in captions])
    times["data"] = time.perf_counter() - t0
    log(f"data: {len(scenes)} pictures encoded, {len(captions)} captions ({times['data']:.0f} s)")

    t0 = time.perf_counter()
    dm = T.train_diffusion(patcher.model.diffusion_model, latents, torch.tensor([index[s.caption] for s in scenes]),
                           context, pooled, index[""], recipe["diffusion"], seed + 4, log)
    times["diffusion"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward, figures["reward"] = train_reward(taesd, recipe["reward"], seed + 5, log)
    times["reward"] = time.perf_counter() - t0

    # the world is the quantised weights (the committed file): every figure is measured on them
    trained = {f"model.{k}": v for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    trained.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()})
    trained.update({f"reward.{k}": v for k, v in reward.state_dict().items() if not k.endswith("position_ids")})
    packed = W.quantise(trained)
    times["total"] = time.perf_counter() - t_all
    manifest = {"recipe": recipe, "hash": recipe_hash(recipe), "seconds": times, "figures": figures,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "clip_fingerprint": W.fingerprint(M.clip_l_state_dict(recipe["clip_seed"]))}
    manifest["figures"].update(materialise(out_dir, packed, manifest, log))
    W.save_packed(packed, os.path.join(out_dir, PACKED), {"manifest": json.dumps(manifest, sort_keys=True)})
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: str, manifest: dict) -> None:
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def materialise(out_dir: str, packed: dict, manifest: dict, log=print, evaluate: bool = True) -> dict:
    """The world's files from its packed weights: the CLIP-L regenerated from its seed (and
    checked against the fingerprint the build recorded), the checkpoint and the reward folder
    written as ComfyUI's and RewardTune's loaders read them. With ``evaluate``, the world is
    loaded back through those loaders and measured (toyworld/evaluate.py); returns the figures."""
    from safetensors.torch import save_file
    from . import models as M
    from .reward import build as build_reward, save_pickscore
    sd = W.dequantise(packed)
    clip_sd = M.clip_l_state_dict(manifest["recipe"]["clip_seed"])
    if W.fingerprint(clip_sd) != manifest["clip_fingerprint"]:
        raise RuntimeError("the regenerated CLIP-L text encoder differs from the one the toy world was trained with "
                           f"(torch {torch.__version__}; the world was built with {manifest['torch']}): rebuild the world "
                           "with `python scripts/toyworld.py build`")
    models_dir = os.path.join(out_dir, "models")
    ckpt = os.path.join(models_dir, "checkpoints", CHECKPOINT)
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    files = {k: v.contiguous() for k, v in sd.items() if not k.startswith("reward.")}
    files.update({M.CLIP_KEYS_PREFIX + k: v.half().contiguous() for k, v in clip_sd.items()})
    save_file(files, ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)
    reward = build_reward(0)
    reward.load_state_dict({k[len("reward."):]: v for k, v in sd.items() if k.startswith("reward.")}, strict=False)
    save_pickscore(reward, os.path.join(models_dir, "reward_models", REWARD))
    return evaluate_world(out_dir, log) if evaluate else {}


def evaluate_world(out_dir: str, log=print, seeds: int = 8) -> dict:
    """What the built world can do, measured through ComfyUI's loaders: the detector's text
    alignment on seen and held-out captions, the VAE's reconstructions, the learned reward's
    agreement with the true preference on the base model's own pictures."""
    from . import evaluate as E
    from . import scenes as S
    from .world import load
    from .train import encode_images, decode_latents
    world = load(out_dir)
    conds = E.ConditioningCache(world.clip)
    out = {}
    for name, caps in (("seen", S.seen_captions()), ("held_out", S.held_out_captions())):
        imgs = E.sample(world.model, None, conds, world.vae, caps, seeds)
        out[f"detector_{name}"] = E.detector_accuracy(imgs, caps, seeds)
        log(f"{name} captions: {out[f'detector_{name}']}")
    scenes = S.sample_scenes(99, 400)
    x = S.render_batch(scenes)
    taesd = world.vae.first_stage_model
    y = decode_latents(taesd, encode_images(taesd, x))
    out["vae_psnr"] = float(10 * np.log10(1.0 / ((y - x) ** 2).mean()))
    out["detector_on_vae"] = E.detector_accuracy(y, [s.caption for s in scenes], 1)
    out["detector_on_renders"] = E.detector_accuracy(x, [s.caption for s in scenes], 1)
    log(f"VAE: PSNR {out['vae_psnr']:.1f} dB, {out['detector_on_vae']}")
    return out
