"""One training configuration, shared by the trainer node, the CLI and the background jobs: plain
values, validated, serialisable to JSON. Defaults follow the papers (see README "Training"); every
field carries its help text (``field(metadata={"help": ...})``), which the CLI shows in ``--help``.

**One way to build one**: ``TrainConfig.resolve(preset, *overrides, base=...)``. Precedence, lowest
first (a later source wins, field by field; a source sets only the fields it names):

1. TrainConfig's defaults (below);
2. ``base``: values that stand in for the defaults (the node's widgets left at their defaults);
3. the preset's fields (``presets.PRESETS``; "custom" sets none);
4. the explicit settings, in the order given: the node's widgets the user changed, then its
   ``config_json``; the CLI's ``--config`` file, then its options.

So a preset is a starting point: what the user sets explicitly wins over it, and the most specific
source (the advanced JSON box, a command-line option) wins over the broader one.
"""
from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .presets import PRESETS

OBJECTIVES = ("refl", "imagerefl", "sqdf")
KL_MODES = ("per_dim", "exact")
PRECISIONS = ("fp32", "bf16", "fp16")
UNET_COPIES = ("auto", "private", "shared")
MAX_MEMORY_BUDGET_GB = 2 ** 20  # 1 PiB: far beyond any device, and finite in bytes (1e308 GiB is not)


class ConfigError(ValueError):
    """A training setting that cannot work, with what to do about it."""


def setting(default, help: str):
    """A field with its help text (shown by the CLI's --help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    objective: str = setting("imagerefl", "imagerefl: real images + captions with the diffusion loss (ImageReFL); "
                                          "refl: classic ReFL from prompts; sqdf: soft-Q fine-tuning from prompts")
    steps: int = setting(4000, "optimizer steps (a resumed run may change it)")
    batch_size: int = setting(8, "images per micro-batch (per process under torchrun)")
    grad_accum: int = setting(4, "micro-batches per optimizer step (ImageReFL: 8 × 4 = 32)")
    lr: float = setting(3e-4, "AdamW learning rate of the LoRA weights (ImageReFL's 3e-4; classic ReFL used 1e-5 "
                              "for a full fine-tune)")
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    grad_clip: float = setting(1.0, "largest gradient norm (clipped above it); 0 = no clipping")
    seed: int = setting(0, "seeds every random draw of the run: LoRA init, noise, timesteps, batches")
    # LoRA on the attention projections of the UNet
    rank: int = setting(8, "LoRA rank: the inner size of each low-rank update (at most the smallest adapted "
                           "layer's min(in, out), e.g. 320 on SD1.5)")
    alpha: float = setting(8.0, "LoRA alpha (the update is scaled by alpha / rank)")
    targets: list[str] = setting(["to_q", "to_k", "to_v", "to_out.0"],
                                 "endings of the diffusion model's linear layer names that get a LoRA; \"auto\": "
                                 "every linear layer of a transformer's blocks. This default (the UNet's attention, "
                                 "as in the papers) means \"auto\" on a model without such layers (Flux, SD3.5, "
                                 "Z-Image)")
    # schedule: N DDPM steps (ComfyUI: sampler ddpm, scheduler ddim_uniform)
    num_steps: int = setting(40, "steps of the DDPM (η = 1) sampling schedule (ddim_uniform)")
    cfg: float = setting(7.5, "classifier-free guidance scale while sampling")
    refl_stop_min: int = setting(30, "classic ReFL: the random stop index is drawn from [min, max]")
    refl_stop_max: int = setting(39, "classic ReFL: upper end of the stop index window")
    imagerefl_start: int = setting(30, "ImageReFL: the real latent is noised to this index of the schedule "
                                       "(30 of 40: t ≈ 226)")
    imagerefl_tf_min: int = setting(30, "ImageReFL: then denoised without gradients to a random t_f in [min, max]")
    imagerefl_tf_max: int = setting(39, "ImageReFL: upper end of the t_f window")
    # loss weights: total = loss_scale·[mse_weight·MSE − s·(R + o)] (+ ReFL regulariser)
    loss_scale: float = setting(1e-3, "total loss = loss_scale · [mse_weight · MSE − s · (R + o)]")
    mse_weight: float = setting(1e-2, "weight of ImageReFL's diffusion (MSE) loss inside loss_scale")
    refl_every: int = setting(0, "ImageReFL: a classic ReFL step every n-th step as a regulariser (0 = never; "
                                 "needs prompts)")
    refl_lambda: float = setting(2.0, "classic ReFL loss: refl_weight · ReLU(λ − s · (R + o)); this is λ")
    refl_weight: float = setting(1e-3, "classic ReFL loss weight")
    reward_scale: float | None = setting(None, "s in s · (R + o); unset: the reward model's own")
    reward_offset: float | None = setting(None, "o in s · (R + o); unset: the reward model's own")
    # SQDF (arXiv 2512.04559; its aesthetic preset: γ 0.9, α 2, lr 1e-3, rank 4, DDIM-η1 50 steps, CFG 5)
    sqdf_gamma: float = setting(0.9, "SQDF discount γ: a transition's reward is weighted by γ^(steps remaining)")
    sqdf_alpha: float = setting(2.0, "SQDF KL weight α (to the base model)")
    sqdf_kl: str = setting("per_dim", "per_dim: the reference code's mean/σ² (= 2/D · exact); exact: ‖Δμ‖²/2σ²")
    sqdf_collect: int = setting(64, "SQDF: fresh trajectories sampled per optimizer step (per process under torchrun)")
    sqdf_buffer: int = setting(1024, "SQDF: replay buffer capacity in trajectories (first in, first out)")
    sqdf_window: int = setting(1024, "SQDF: sample from the most recent this many trajectories")
    sqdf_prioritised: bool = setting(False, "SQDF: draw (trajectory, step) with probability ∝ max(r, 0) · "
                                            "γ^(steps remaining) instead of uniformly")
    sqdf_use_buffer: bool = setting(True, "SQDF: learn from the replay buffer; off: only this step's "
                                          "trajectories (on-policy, the paper's ablation)")
    sqdf_lcm_lora: str = setting("", "SQDF: an LCM-LoRA file of the same base for the consistency jump to x̂0 "
                                     "(empty: the base model's one-step prediction)")
    # memory
    precision: str = setting("fp32", "fp32, bf16 (recent GPUs) or fp16 (with loss scaling)")
    grad_checkpointing: bool = setting(False, "recompute UNet activations in the backward pass: much less "
                                              "memory, ~30% slower")
    decode_checkpointing: bool = setting(True, "decode the images for the reward one at a time, recomputing the "
                                               "VAE decoder's activations block by block in the backward pass: the "
                                               "decode's memory is one decoder block's of one image instead of the "
                                               "whole batch's (same gradients; the decoder runs three times)")
    memory_budget_gb: float = setting(0.0, "device memory (GiB) the run must fit: the trainer node estimates a "
                                           "step's peak and refuses a run above it before it starts; 0 = the "
                                           "GPU's own memory (no check on the CPU); at most 1048576 (1 PiB)")
    unet_copy: str = setting("auto", "trainer node: what a job trains on. private: its own copy of the UNet (one "
                                     "more UNet in device memory; other prompts may sample the model meanwhile); "
                                     "shared: the graph's own UNet, with the LoRA taken off again when the job ends "
                                     "(no copy; mode wait only: the queue waits for the node, so nothing else "
                                     "samples it); auto: private when the memory budget holds the step's "
                                     "estimated peak plus the copy, else shared in mode wait (mode background is "
                                     "refused); with no budget (the CPU) private. The CLI always trains on its "
                                     "own model")
    width: int = setting(512, "training width in pixels (ImageReFL: aspect buckets of about width × height)")
    height: int = setting(512, "training height in pixels")
    save_every: int = setting(100, "checkpoint every n optimizer steps, and at the end (a resumed run may "
                                   "change it)")

    @classmethod
    def resolve(cls, preset: str | None = None, *overrides, base=None) -> "TrainConfig":
        """The one way to build a TrainConfig from several sources (the precedence in the module
        doc): TrainConfig's defaults < ``base`` < the preset < each of ``overrides`` in order.

        ``preset``: a name in ``PRESETS`` (None, "" or "custom" set nothing). ``base`` and each
        override: a ``(where, settings)`` pair, or a plain mapping; ``where`` names the source in
        messages (e.g. "--config run.json"). Each source's names and types are checked (the
        message names the source); the merged result is validated. Raises ConfigError saying what to fix."""
        if preset and preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        layers = [] if base is None else [base]
        layers.append((f"preset {preset!r}", PRESETS[preset] if preset else {}))
        layers.extend(overrides)
        merged: dict[str, Any] = {}
        for layer in layers:
            where, values = ("settings", layer) if isinstance(layer, Mapping) else layer
            merged.update(check_settings(values, where))
        return cls(**merged).validate()

    @property
    def needs_prompts(self) -> bool:
        """Classic ReFL and SQDF sample from prompts; so does ImageReFL's ReFL regulariser."""
        return self.objective in ("refl", "sqdf") or bool(self.refl_every)

    @property
    def needs_images(self) -> bool:
        """ImageReFL trains on real images with captions."""
        return self.objective == "imagerefl"

    def check_inputs(self, *, has_prompts: bool, has_images: bool, give_prompts: str = "give at least one prompt",
                     give_images: str = "give images with captions") -> "TrainConfig":
        """Refuse a run that lacks the data its objective trains on. ``give_prompts`` /
        ``give_images`` say how to supply them where the caller asks for them (a node input, a
        CLI option)."""
        if self.needs_prompts and not has_prompts:
            who = {"sqdf": "SQDF", "refl": "classic ReFL"}.get(
                self.objective, f"the ReFL regulariser (refl_every = {self.refl_every})")
            raise ConfigError(f"{who} samples from prompts: {give_prompts}")
        if self.needs_images and not has_images:
            raise ConfigError(f"ImageReFL trains on real images: {give_images}")
        return self

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        for f in fields(self):  # NaN passes every comparison below; infinity is no setting either
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{f.name} must be a finite number, got {value!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_steps", "save_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a whole number ≥ 1, got {getattr(self, name)!r}")
        need(isinstance(self.rank, int) and self.rank >= 1, f"LoRA rank must be ≥ 1, got {self.rank!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"learning rate must be > 0, got {self.lr!r}")
        need(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha!r}")
        need(self.grad_clip >= 0 and self.weight_decay >= 0, "grad_clip and weight_decay must be ≥ 0")
        need(self.targets and all(isinstance(t, str) and t for t in self.targets),
             "targets: give module name endings such as to_q, to_k, to_v, to_out.0")
        n = self.num_steps
        if self.objective == "refl" or self.refl_every:
            need(0 <= self.refl_stop_min <= self.refl_stop_max < n,
                 f"ReFL stop window [{self.refl_stop_min}, {self.refl_stop_max}] must lie in [0, {n - 1}]")
        if self.objective == "imagerefl":
            need(0 <= self.imagerefl_start <= self.imagerefl_tf_min <= self.imagerefl_tf_max < n,
                 f"ImageReFL needs 0 ≤ start ({self.imagerefl_start}) ≤ t_f window [{self.imagerefl_tf_min}, "
                 f"{self.imagerefl_tf_max}] < {n}")
        need(self.refl_every >= 0, "refl_every must be ≥ 0")
        if self.objective == "sqdf":
            need(0 < self.sqdf_gamma <= 1, f"sqdf_gamma (discount) must be in (0, 1], got {self.sqdf_gamma!r}")
            need(self.sqdf_alpha >= 0, f"sqdf_alpha (KL weight) must be ≥ 0, got {self.sqdf_alpha!r}")
            need(self.sqdf_kl in KL_MODES, f"sqdf_kl must be one of {KL_MODES}, got {self.sqdf_kl!r}")
            for name in ("sqdf_collect", "sqdf_buffer", "sqdf_window"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                     f"{name} must be a whole number ≥ 1, got {getattr(self, name)!r}")
            need(self.sqdf_buffer >= self.sqdf_collect,
                 f"the replay buffer ({self.sqdf_buffer}) must hold at least one step's trajectories ({self.sqdf_collect})")
        need(0 <= self.memory_budget_gb <= MAX_MEMORY_BUDGET_GB,
             f"memory_budget_gb must be ≥ 0 (0 = the GPU's own memory) and at most {MAX_MEMORY_BUDGET_GB} (1 PiB), "
             f"got {self.memory_budget_gb!r}: give the device's memory in GiB, e.g. 24")
        need(self.unet_copy in UNET_COPIES,
             f"unet_copy must be one of {', '.join(UNET_COPIES)} (auto: decided from the memory budget), "
             f"got {self.unet_copy!r}")
        need(self.width % 8 == 0 and self.height % 8 == 0 and self.width >= 8 and self.height >= 8,
             "width and height must be multiples of 8")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data).validate()


# settings a resumed run may change: how long it runs and how often it saves
# (memory_budget_gb and unet_copy decide whether and where the run trains, not what it trains)
RESUMABLE_CHANGES = ("steps", "save_every", "memory_budget_gb", "unet_copy")


def resume_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """The settings that differ between a checkpoint's config and a run that wants to resume it
    (other than ``RESUMABLE_CHANGES``): resuming across them would silently train something else."""
    a, b = asdict(saved), asdict(new)
    return [f"{k}: {a[k]!r} → {b[k]!r}" for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]


_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}
EXAMPLE = '{"cfg": 5.0}'


def check_settings(values: Mapping, where: str = "settings") -> dict:
    """``values`` (setting name → value, e.g. parsed JSON) checked against TrainConfig's fields:
    unknown names are refused (with the nearest known name), each value must have its field's type
    (JSON "0.001" is a string, not a number). Returns a copy with whole numbers as int and numbers
    as float where the field wants them (JSON has one number type)."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, by_name, 1))
                 else name for name in unknown]
        raise ConfigError(f"{where}: unknown training settings: {', '.join(hints)}; the settings are listed by "
                          "python scripts/train.py --help")
    out = {}
    for name, value in values.items():
        f = by_name[name]
        default = f.default if f.default is not MISSING else f.default_factory()
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = number and math.isfinite(value) and float(value).is_integer(), "a whole number"
            value = int(value) if ok else value
        elif isinstance(default, float) or default is None:
            ok = number or (default is None and value is None)
            want = "a number" + (" or null" if default is None else "")
            value = float(value) if number else value
        elif isinstance(default, list):
            ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
            value = list(value) if ok else value
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            hint = " (write numbers without quotes)" if isinstance(value, str) and "number" in want else ""
            raise ConfigError(f'{where}: "{name}" must be {want}, got {json.dumps(value)}{hint}')
        out[name] = value
    return out


def settings_from_json(text: str, where: str) -> dict:
    """A JSON object of settings (a --config file's text, the node's config_json), checked by
    ``check_settings``; any other JSON is one ConfigError that says how to write it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                          f"write it like {EXAMPLE}") from None
    except RecursionError:  # Python's parser recurses per level: [[[[…]]]] 100,000 deep exhausts it
        raise ConfigError(f"{where} is nested too deeply to read: settings are one flat JSON object like "
                          f"{EXAMPLE}") from None
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise ConfigError(f"{where} must be a JSON object of settings like {EXAMPLE}, not {kind}: write setting "
                          "names and their values inside { }")
    return check_settings(data, where)
