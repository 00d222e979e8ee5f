"""Named training settings from the papers: each sets only the fields it lists; "custom" sets none.

A preset is a starting point, not a lock: ``TrainConfig.resolve`` puts it above TrainConfig's
defaults (and the node's widgets left at their defaults) and below every explicit setting (the
node's widgets the user changed and its config_json; the CLI's --config file and options). See
trainers/config.py for the full precedence. Plain data: no imports, so config.py can read it."""
from __future__ import annotations

CUSTOM = "custom (the settings below)"

PRESETS: dict[str, dict] = {
    CUSTOM: {},
    # ImageReFL §4: 40-step DDPM grid, start index 30, t_f in 30–39, 1e-3·[1e-2·MSE − R], batch 8 × 4
    "ImageReFL (paper, SD1.5)": dict(objective="imagerefl"),
    # ImageReFL with a classic ReFL step every 4th step as the regulariser
    "ImageReFL + ReFL regulariser": dict(objective="imagerefl", refl_every=4),
    # classic ReFL (ImageReward paper): stop index in the last quarter of 40 steps, ReLU(λ − R)
    "ReFL (ImageReward paper)": dict(objective="refl"),
    # SQDF's aesthetic-reward preset (paper §5): DDIM η=1, 50 steps, CFG 5, γ 0.9, α 2, lr 1e-3, rank 4,
    # 64 fresh trajectories per step, sample from the last 1024, AdamW wd 1e-4, clip 1.0
    "SQDF aesthetic (paper)": dict(objective="sqdf", num_steps=50, cfg=5.0, sqdf_gamma=0.9, sqdf_alpha=2.0, lr=1e-3,
                                   rank=4, alpha=4.0, batch_size=64, grad_accum=1, sqdf_collect=64, sqdf_buffer=1024,
                                   sqdf_window=1024, weight_decay=1e-4, grad_clip=1.0, steps=2000),
    # SQDF's HPS preset: γ 0.93, α 0.05, lr 5e-4, rank 32, batch 256, buffer 4096, 500 steps
    "SQDF HPS (paper)": dict(objective="sqdf", num_steps=50, cfg=5.0, sqdf_gamma=0.93, sqdf_alpha=0.05, lr=5e-4,
                             rank=32, alpha=32.0, batch_size=256, grad_accum=1, sqdf_collect=256, sqdf_buffer=4096,
                             sqdf_window=4096, weight_decay=1e-4, grad_clip=1.0, steps=500),
    # a short look at whether a reward moves at all: 20 steps, the same late windows, small batches
    "Quick look (20-step schedule, batch 2)": dict(num_steps=20, refl_stop_min=15, refl_stop_max=19,
                                                    imagerefl_start=15, imagerefl_tf_min=15, imagerefl_tf_max=19,
                                                    batch_size=2, grad_accum=1, save_every=25),
}
