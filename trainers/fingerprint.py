"""One fingerprint of a training run, shared by the background jobs (it is part of a job's id:
queueing the same graph again finds the same job) and the command line (``--resume`` refuses a run
whose fingerprint differs from the one stored with the checkpoint).

A run is defined by its settings other than how long it runs and how often it saves
(``RESUMABLE_CHANGES``), the weights it trains on and with (UNet and its patches, VAE, text
encoder, reward model: content digests, so the same files give the same value in any process), and
its data: the prompts when the objective samples from prompts, the images and captions when it
trains on images. Each part is digested separately, so a refusal can say which one changed.

No ComfyUI import: the objects are only read (``.model.diffusion_model``, ``.first_stage_model``…).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields

from .config import RESUMABLE_CHANGES, TrainConfig

# the parts, in the order they are hashed, and how a message names each one (PLURAL: the labels
# that take "differ", not "differs", alone)
PARTS = {
    "config": "the training settings",
    "model": "the model (UNet weights or the patches on it)",
    "vae": "the VAE",
    "clip": "the text encoder",
    "reward": "the reward model",
    "prompts": "the prompts",
    "images": "the training images or their captions",
}
PLURAL = ("config", "prompts", "images")


# parameters ComfyUI creates without initialising them when a file lacks them, so their values are
# whatever memory held: SD1.5 files (and SDXL's CLIP-L) have no text projection, which their
# conditioning never uses. Digesting one would give the same file another value in every process.
UNINITIALISED = ("text_projection",)


def weights_digest(module) -> str:
    """A content digest of a few of a model's weights: the same file gives the same value across
    processes and server restarts, where object ids and patch uuids do not."""
    if module is None:
        return "none"
    params = [p for name, p in module.named_parameters() if not any(s in name for s in UNINITIALISED)]
    picks = params[:3] + params[-3:]
    h = hashlib.sha256(f"{type(module).__name__}:{len(params)}".encode())
    for p in picks:
        h.update(p.detach().flatten()[:512].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model) -> dict:
    """A MODEL (ModelPatcher): its UNet's weights and the weight patches (LoRAs) on it."""
    patches = getattr(model, "patches", {}) or {}
    strengths = sorted((k, tuple(round(float(p[0]), 6) for p in v)) for k, v in patches.items())
    return {"weights": weights_digest(model.model.diffusion_model), "patches": len(patches),
            "strengths": hashlib.sha256(repr(strengths).encode()).hexdigest()[:12]}


def images_identity(buckets) -> list:
    """Aspect buckets of examples (``data.load_examples``): size, caption and pixels of each."""
    out = []
    for size, examples in sorted((buckets or {}).items()):
        for ex in examples:
            small = ex.image[::8, ::8].float().cpu().contiguous().numpy().tobytes()
            out.append([list(size), ex.caption, hashlib.sha256(small).hexdigest()[:12]])
    return out


def reward_identity(reward_model) -> dict:
    """A RewardModel: its kind and a digest of its weights (not its file name)."""
    return {"kind": getattr(reward_model, "kind", type(reward_model).__name__),
            "weights": weights_digest(reward_model)}


def uses_prompts(config: TrainConfig) -> bool:
    return config.objective in ("refl", "sqdf") or bool(config.refl_every)


def uses_images(config: TrainConfig) -> bool:
    return config.objective == "imagerefl"


def run_identity(config: TrainConfig, *, model, vae, clip, reward_model, prompts, images) -> dict:
    """The parts that define a run (``PARTS``), as plain JSON values. Prompts and images the
    objective does not use are left out, so they cannot make two equal runs differ."""
    defining = {k: v for k, v in json.loads(config.to_json()).items() if k not in RESUMABLE_CHANGES}
    for f in fields(TrainConfig):  # 2 and 2.0 are one setting (a JSON file may hold either)
        if isinstance(defining.get(f.name), int) and not isinstance(defining[f.name], bool) \
                and (f.default is None or isinstance(f.default, float)):
            defining[f.name] = float(defining[f.name])
    return {
        "config": defining,
        "model": model_identity(model),
        "vae": weights_digest(getattr(vae, "first_stage_model", None)),
        "clip": weights_digest(getattr(clip, "cond_stage_model", None)),
        "reward": reward_identity(reward_model),
        "prompts": list(prompts or []) if uses_prompts(config) else [],
        "images": images_identity(images) if uses_images(config) else [],
    }


def hash_parts(*parts) -> str:
    """The fingerprint of values in order: 10 hex digits."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


def fingerprint(identity: dict) -> str:
    return hash_parts(*(identity[name] for name in PARTS))


def record(identity: dict) -> dict:
    """What a run stores (JSON): the fingerprint, one digest per part, and the counts a message
    can quote."""
    return {"fingerprint": fingerprint(identity),
            "parts": {name: hash_parts(identity[name]) for name in PARTS},
            "counts": {"prompts": len(identity["prompts"]), "images": len(identity["images"])}}


def differ(labels: list[str]) -> str:
    """``differences``'s labels as a clause: "the reward model differs", "the VAE, the prompts differ"."""
    plural = len(labels) > 1 or any(labels[0].startswith(PARTS[name]) for name in PLURAL)
    return f"{', '.join(labels)} differ{'' if plural else 's'}"


def differences(saved: dict, identity: dict) -> list[str]:
    """The parts of ``identity`` that differ from a stored ``record``, named for a message."""
    now = record(identity)
    out = []
    for name, label in PARTS.items():
        if saved.get("parts", {}).get(name) == now["parts"][name]:
            continue
        then, count = saved.get("counts", {}).get(name), now["counts"].get(name)
        if name in ("prompts", "images") and then is not None and then != count:
            label += f" ({then} then, {count} now)"
        out.append(label)
    return out
