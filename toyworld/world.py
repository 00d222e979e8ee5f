"""The built world on disk, and loading it the way a user's files are loaded.

The world's trained weights are committed (``toyworld/weights/world.safetensors.xz``, a few MB:
weights.py) together with the recipe hash they were built from. Its files — the checkpoint
ComfyUI loads, the reward folder — live in a cache folder outside the clone named by that hash
(``$RT_CACHE_DIR/toyworld-<hash>``, ``RT_CACHE_DIR`` defaulting to ``~/.cache/rewardtune``, where
scripts/setup.sh also keeps ComfyUI), so both README commands and the tests share one copy.

    folder = ensure_world()              # from the committed weights (seconds), or built (~15 min)
    link_models(folder, models_root)     # its files into a ComfyUI models tree
    world = load(folder)                 # (MODEL, CLIP, VAE) by ComfyUI's checkpoint loader + the reward
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from .build import CHECKPOINT, PACKED, RECIPE, REWARD, recipe_hash


def cache_root() -> str:
    return os.environ.get("RT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rewardtune"))


def world_dir(recipe: dict = RECIPE) -> str:
    return os.path.join(cache_root(), f"toyworld-{recipe_hash(recipe)}")


def checkpoint_path(folder: str) -> str:
    return os.path.join(folder, "models", "checkpoints", CHECKPOINT)


def reward_path(folder: str) -> str:
    return os.path.join(folder, "models", "reward_models", REWARD)


def manifest(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def is_built(folder: str) -> bool:
    return all(os.path.exists(p) for p in (checkpoint_path(folder), os.path.join(reward_path(folder), "model.safetensors"),
                                           os.path.join(folder, "manifest.json")))


COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", PACKED)


class WorldError(RuntimeError):
    """The committed weights do not belong to this recipe, and building was not allowed."""


def committed_manifest(path: str = COMMITTED) -> dict | None:
    if not os.path.exists(path):
        return None
    from .weights import load_packed
    return json.loads(load_packed(path)[1]["manifest"])


def ensure_world(recipe: dict = RECIPE, log=print, allow_build: bool = True) -> str:
    """The world's folder for this recipe: already there; else written from the committed weights
    when they were built from this recipe (seconds); else, with ``allow_build``, trained from
    nothing (~15 min on 2 cores). Written into a temporary folder beside it and renamed when
    complete, so an interrupted write leaves nothing that looks built."""
    folder = world_dir(recipe)
    if is_built(folder):
        return folder
    from .build import build_world, materialise, write_manifest
    from .weights import load_packed
    want = recipe_hash(recipe)
    committed = committed_manifest()
    tmp = folder + ".writing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if committed is not None and committed["hash"] == want:
        log(f"[toyworld] writing the toy world from its committed weights into {folder}")
        materialise(tmp, load_packed(COMMITTED)[0], committed, log, evaluate=False)
        shutil.copyfile(COMMITTED, os.path.join(tmp, PACKED))
        write_manifest(tmp, committed)
    elif allow_build:
        why = ("no weights are committed" if committed is None else
               f"the committed weights were built from recipe {committed['hash']}, this code's is {want}")
        log(f"[toyworld] building the toy world into {folder} ({why}; once per machine and recipe)")
        build_world(tmp, recipe, log=lambda m: log(f"[toyworld] {m}"))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WorldError(
            f"the committed toy-world weights ({COMMITTED}) were built from recipe "
            f"{committed['hash'] if committed else '(none)'}, but this code's recipe is {want}: toyworld/'s training "
            "code or RECIPE changed. Rebuild (`python scripts/toyworld.py build --out DIR`, ~15 min) and commit "
            f"DIR/{PACKED} as {os.path.relpath(COMMITTED, os.path.dirname(os.path.dirname(COMMITTED)))}")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def link_models(folder: str, models_root: str) -> dict:
    """The world's checkpoint and reward into a ComfyUI models tree (symbolic links; the files stay
    in the cache). Returns the names the loaders list: ``checkpoint``, ``reward`` (the folder's
    model.safetensors, as Load Reward Model lists a PickScore folder)."""
    links = {os.path.join(models_root, "checkpoints", CHECKPOINT): checkpoint_path(folder),
             os.path.join(models_root, "reward_models", REWARD): reward_path(folder)}
    for link, target in links.items():
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link) if not os.path.isdir(link) or os.path.islink(link) else shutil.rmtree(link)
        os.symlink(target, link)
    return {"checkpoint": CHECKPOINT, "reward": f"{REWARD}/model.safetensors"}


@dataclass
class World:
    model: object       # MODEL (ModelPatcher)
    clip: object        # CLIP
    vae: object         # VAE
    reward: object      # rewards.RewardModel (the learned reward, PickScore layout)
    folder: str


def load(folder: str) -> World:
    """The world through the loaders a user's files go through: ComfyUI's checkpoint loader
    (CheckpointLoaderSimple's call) and RewardTune's Load Reward Model."""
    import comfy.sd
    from ..rewards import load_reward_model
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint_path(folder), output_vae=True,
                                                             output_clip=True)[:3]
    reward = load_reward_model(os.path.join(reward_path(folder), "model.safetensors"))
    return World(model, clip, vae, reward, folder)
