"""Named starting points for a training config. The trainer node and the CLI apply the user's own
settings on top (steps, learning rate, rank, batch …), then any JSON overrides."""
from __future__ import annotations

from dataclasses import replace

from .config import TrainConfig

PRESETS: dict[str, dict] = {
    # ImageReFL §4: 40-step DDPM grid, start index 30, t_f in 30–39, 1e-3·[1e-2·MSE − R], batch 8 × 4
    "ImageReFL (paper, SD1.5)": dict(objective="imagerefl"),
    # ImageReFL with a classic ReFL step every 4th step as the regulariser
    "ImageReFL + ReFL regulariser": dict(objective="imagerefl", refl_every=4),
    # classic ReFL (ImageReward paper): stop index in the last quarter of 40 steps, ReLU(λ − R)
    "ReFL (ImageReward paper)": dict(objective="refl"),
    # a short look at whether a reward moves at all: 20 steps, the same late windows, small batches
    "Quick look (20-step schedule, batch 2)": dict(num_steps=20, refl_stop_min=15, refl_stop_max=19,
                                                    imagerefl_start=15, imagerefl_tf_min=15, imagerefl_tf_max=19,
                                                    batch_size=2, grad_accum=1, save_every=25),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(TrainConfig(**PRESETS[name]), **overrides)
