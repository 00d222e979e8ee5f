"""One training configuration, shared by the trainer node and the CLI: plain values, validated,
serialisable to JSON. Defaults follow the papers (see README "Training")."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

OBJECTIVES = ("refl", "imagerefl", "sqdf")
KL_MODES = ("per_dim", "exact")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A training setting that cannot work, with what to do about it."""


@dataclass
class TrainConfig:
    objective: str = "imagerefl"
    steps: int = 4000                     # optimizer steps
    batch_size: int = 8
    grad_accum: int = 4                   # micro-batches per optimizer step (ImageReFL: 8 × 4 = 32)
    lr: float = 3e-4                      # ImageReFL's Adam lr; classic ReFL used 1e-5 (full fine-tune)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0                # max grad norm; 0 = off
    seed: int = 0
    # LoRA on the attention projections of the UNet
    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # schedule: N DDPM steps (ComfyUI: sampler ddpm, scheduler ddim_uniform)
    num_steps: int = 40
    cfg: float = 7.5
    refl_stop_min: int = 30               # classic ReFL: random stop index in [min, max]
    refl_stop_max: int = 39
    imagerefl_start: int = 30             # ImageReFL: real latent noised to index 30 of 40 (t≈226)
    imagerefl_tf_min: int = 30            # … denoised (no grad) to a random t_f in [min, max]
    imagerefl_tf_max: int = 39
    # loss weights: total = loss_scale·[mse_weight·MSE − s·(R + o)] (+ ReFL regulariser)
    loss_scale: float = 1e-3
    mse_weight: float = 1e-2
    refl_every: int = 0                   # ImageReFL: a classic ReFL step every m-th step (0 = never)
    refl_lambda: float = 2.0              # classic ReFL loss: refl_weight·ReLU(λ − s·(R + o))
    refl_weight: float = 1e-3
    reward_scale: float | None = None     # None: the reward model's own s and o
    reward_offset: float | None = None
    # SQDF (arXiv 2512.04559; its aesthetic preset: γ 0.9, α 2, lr 1e-3, rank 4, DDIM-η1 50 steps, CFG 5)
    sqdf_gamma: float = 0.9               # discount γ^(steps remaining after the sampled transition)
    sqdf_alpha: float = 2.0               # KL weight α
    sqdf_kl: str = "per_dim"              # per_dim: the reference code's mean/σ² (= 2/D · exact); exact: ‖Δμ‖²/2σ²
    sqdf_collect: int = 64                # fresh trajectories per optimizer step
    sqdf_buffer: int = 1024               # replay buffer capacity (trajectories; FIFO)
    sqdf_window: int = 1024               # sample from the most recent this many
    sqdf_prioritised: bool = False        # P(trajectory, step) ∝ max(r, 0)·γ^(remaining)
    sqdf_use_buffer: bool = True          # False: on-policy (only this step's trajectories; the paper's ablation)
    sqdf_lcm_lora: str = ""               # an LCM-LoRA file of the same base for the x̂0 jump ("" = fallback)
    # memory
    precision: str = "fp32"
    grad_checkpointing: bool = False
    width: int = 512
    height: int = 512
    save_every: int = 100                 # checkpoint every n optimizer steps (and at the end)

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
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
RESUMABLE_CHANGES = ("steps", "save_every")


def resume_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """The settings that differ between a checkpoint's config and a run that wants to resume it
    (other than ``RESUMABLE_CHANGES``): resuming across them would silently train something else."""
    a, b = asdict(saved), asdict(new)
    return [f"{k}: {a[k]!r} → {b[k]!r}" for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
