"""The papers' trade-offs, measured in the toy world through the pack's own code.

Every training run is ``trainers.engine.train`` (the loop the trainer node and the CLI run) on the
world's checkpoint as ComfyUI loads it, against the learned reward as Load Reward Model loads it;
every picture is sampled by ``sampling.combined.combined_sample`` (the Combined KSampler's
function, equal to KSampler at k = N); the figures are the learned reward, the hidden true
preference, the detector's text alignment and coverage, and the pack's diversity metrics.

    runs = Reproduction(world, plan).run()       # plan: FULL or REDUCED

``scripts/reproduce.py`` runs it and writes docs/reproduction.md; tests/test_reproduction.py runs
the reduced plan and asserts its machinery (every run trains, is measured, and the report's
verdicts follow the figures).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..trainers.config import TrainConfig
from ..trainers.data import examples_from_graph
from ..trainers.engine import train
from . import evaluate as E
from . import scenes as S

# The training settings every objective shares in the toy world (scaled from the papers' 40/50-step
# SD settings to the world's 20-step schedule: ReFL's stop window 30–39 of 40 → 14–19 of 20,
# ImageReFL's start 30 → 14); the same learning rate, rank, batch and steps for every method.
COMMON = dict(num_steps=20, cfg=5.0, batch_size=8, grad_accum=1, lr=1e-3, rank=8, alpha=8.0, targets=["auto"],
              refl_stop_min=14, refl_stop_max=19, imagerefl_start=14, imagerefl_tf_min=14, imagerefl_tf_max=19,
              decode_checkpointing=False, weight_decay=1e-4, grad_clip=1.0, width=S.SIZE, height=S.SIZE)
# SQDF at the world's size: 8 fresh trajectories a step into a 256-trajectory buffer (the paper: 64
# into 1024), its aesthetic preset's γ 0.9 and α 2.
SQDF = dict(objective="sqdf", sqdf_gamma=0.9, sqdf_alpha=2.0, sqdf_collect=8, sqdf_buffer=256, sqdf_window=256)

RUNS = {
    "ReFL": dict(objective="refl"),
    "ImageReFL": dict(objective="imagerefl"),
    "SQDF": dict(SQDF),
    "SQDF α=0.5": dict(SQDF, sqdf_alpha=0.5),
    "SQDF α=8": dict(SQDF, sqdf_alpha=8.0),
    "SQDF γ=1": dict(SQDF, sqdf_gamma=1.0),
    "SQDF no buffer": dict(SQDF, sqdf_use_buffer=False),
}


@dataclass
class Plan:
    name: str
    seeds: tuple[int, ...]
    steps: int                          # optimizer steps per training run
    runs: tuple[str, ...]
    eval_captions: int                  # captions measured (seen kind, not trained on)
    eval_seeds: int                     # pictures per caption
    switch_steps: tuple[int, ...]       # combined generation's k (of COMMON num_steps)
    blend_powers: tuple[float, ...]     # ReFL AIG's p
    combined_for: tuple[str, ...]       # tuned models combined with the base
    train_prompts: int = 48
    real_images: int = 256              # ImageReFL's real pictures (with captions)


FULL = Plan("full", seeds=(0, 1, 2), steps=60, runs=tuple(RUNS), eval_captions=8, eval_seeds=8,
            switch_steps=(0, 6, 10, 12, 14, 16, 20), blend_powers=(0.5, 1.0, 2.0, 4.0),
            combined_for=("ReFL", "ImageReFL"))
REDUCED = Plan("reduced", seeds=(0,), steps=40, runs=("ReFL", "SQDF"), eval_captions=4, eval_seeds=8,
               switch_steps=(0, 12, 20), blend_powers=(1.0,), combined_for=("ReFL",), train_prompts=32,
               real_images=64)


def eval_captions(n: int) -> list[str]:
    """Captions of the seen kind (no held-out pair), fixed: half one shape, half two."""
    singles = [S.caption_of([p]) for p in S.TRAIN_PAIRS]
    twos = [c for c in S.seen_captions() if " a " in c[2:]]
    out = []
    for i in range(n):
        pool = singles if i % 2 == 0 else twos
        out.append(pool[(5 * i + 3) % len(pool)])
    return out


def train_prompts(n: int, exclude: set[str]) -> list[str]:
    """Training captions drawn from the world's distribution (seeded), none of them evaluated on."""
    rng = np.random.default_rng(1234)
    out: list[str] = []
    while len(out) < n:
        c = S.sample_scene(rng).caption
        if c not in exclude and c not in out:
            out.append(c)
    return out


@dataclass
class Result:
    label: str
    seed: int | None
    figures: E.Figures
    k: int | None = None
    power: float | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.label + (f" k={self.k}" if self.k is not None else "") + (f" p={self.power:g}" if self.power is not None else "")

    def row(self) -> dict:
        r = {"label": self.label, "seed": self.seed, "k": self.k, "power": self.power, "seconds": self.seconds,
             **self.figures.row()}
        if self.history:
            last = self.history[-max(1, len(self.history) // 4):]
            for key in ("kl", "reward", "collect_reward"):
                vals = [h[key] for h in last if key in h]
                if vals:
                    r[f"train_{key}"] = float(np.mean(vals))
        return r


class Reproduction:
    def __init__(self, world, plan: Plan, log=print, lora_dir: str | None = None):
        self.world, self.plan, self.log = world, plan, log
        self.conds = E.ConditioningCache(world.clip)
        self.captions = eval_captions(plan.eval_captions)
        self.prompts = train_prompts(plan.train_prompts, set(self.captions))
        self.lora_dir = lora_dir                 # where each run's LoRA file is kept (None: not kept)
        self.results: list[Result] = []
        self.reward_scale = self.reward_offset = None
        self.grids: dict[str, np.ndarray] = {}   # label -> pictures of the first seed (for the report)

    # ---------------------------------------------------------------- pieces
    def measure(self, tuned, label, seed, k=None, power=None, history=None, seconds=0.0) -> Result:
        p, w = self.plan, self.world
        images = E.sample(w.model, tuned, self.conds, w.vae, self.captions, p.eval_seeds,
                          switch_step=k if k is not None else (0 if tuned is not None else None),
                          mode="blend" if power is not None else "switch", blend_power=power or 1.0)
        res = Result(label, seed, E.measure(images, self.captions, p.eval_seeds, w.reward), k, power,
                     history or [], seconds)
        if seed in (None, p.seeds[0]):
            self.grids[res.key] = images
        self.results.append(res)
        self.log(f"  {label:<22} seed {seed} k={k} p={power}: proxy {res.figures.proxy:7.2f}  true "
                 f"{res.figures.true:5.2f}  aligned {res.figures.aligned:4.2f}  diversity {res.figures.diversity:5.3f}  "
                 f"coverage {res.figures.coverage:4.2f}")
        return res

    def real_images(self, n: int, seed: int):
        scenes = S.sample_scenes(10_000 + seed, n)
        scenes = [s for s in scenes if s.caption not in set(self.captions)]
        return examples_from_graph(torch.from_numpy(S.render_batch(scenes)), [s.caption for s in scenes],
                                   S.SIZE, S.SIZE, bucketing=False)

    def config(self, name: str, seed: int) -> TrainConfig:
        settings = {**COMMON, **RUNS[name], "steps": self.plan.steps, "seed": seed, "save_every": self.plan.steps,
                    "reward_scale": self.reward_scale, "reward_offset": self.reward_offset}
        return TrainConfig.resolve(None, ("toy world", settings))

    def train(self, name: str, seed: int):
        w, cfg = self.world, self.config(name, seed)
        from ..trainers.engine import reward_from_model
        images = self.real_images(self.plan.real_images, seed) if cfg.needs_images else None
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = train(w.model, w.vae, reward_from_model(w.reward, cfg.reward_scale, cfg.reward_offset), cfg,
                           encode=self.conds, prompts=self.prompts if cfg.needs_prompts else None, images=images,
                           out_dir=out)
            # the tuned MODEL as a user gets it: the saved LoRA file applied as weight patches, as
            # LoraLoader (and the trainer node's output) does. The engine's own result.model carries
            # the LoRA as training wrappers, which combined sampling rightly refuses to swap.
            import comfy.sd
            from safetensors.torch import load_file
            tuned, _ = comfy.sd.load_lora_for_models(w.model, None, load_file(result.lora_path), 1.0, 0.0)
            result = dataclasses.replace(result, model=tuned)
            if self.lora_dir:
                os.makedirs(self.lora_dir, exist_ok=True)
                keep = os.path.join(self.lora_dir, f"{name.replace(' ', '_').replace('=', '')}-seed{seed}.safetensors")
                shutil.copyfile(result.lora_path, keep)
        return result, time.perf_counter() - t0

    # ---------------------------------------------------------------- the whole plan
    def run(self) -> list[Result]:
        p = self.plan
        self.log(f"[reproduce] {p.name} plan: {len(p.seeds)} seed(s), {p.steps} steps a run, "
                 f"{len(self.captions)} captions × {p.eval_seeds} pictures")
        base = self.measure(None, "base", None)
        # the learned reward standardised on the base model's pictures (ImageReFL trained on the
        # standardised ImageReward): s = 1/std, o = −mean in s·(R + o); the pictures are the ones
        # just measured (measure keeps them), not sampled a second time
        with torch.no_grad():
            per_image = [c for c in self.captions for _ in range(p.eval_seeds)]
            scores = self.world.reward.score(torch.from_numpy(self.grids[base.key]), per_image).float()
        self.reward_scale = float(1.0 / max(scores.std().item(), 1e-6))
        self.reward_offset = float(-scores.mean().item())
        self.log(f"[reproduce] reward standardised on the base: s = {self.reward_scale:.4f}, o = {self.reward_offset:.2f}")
        del base
        for seed in p.seeds:
            for name in p.runs:
                result, seconds = self.train(name, seed)
                self.measure(result.model, name, seed, history=result.history, seconds=seconds)
                if name in p.combined_for:
                    for k in p.switch_steps:
                        if 0 < k < COMMON["num_steps"]:
                            self.measure(result.model, f"{name} combined", seed, k=k)
                    for power in p.blend_powers:
                        self.measure(result.model, f"{name} blend", seed, power=power)
                del result
        return self.results


# ------------------------------------------------------------------------------ summaries
def select(results: list[Result], label: str, k=None, power=None) -> list[Result]:
    return [r for r in results if r.label == label and r.k == k and r.power == power]
