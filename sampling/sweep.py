"""Quality–diversity sweep: the papers' trade-off figure (reward against diversity, one point per
switch step k or blend power p) computed in ComfyUI with the Combined KSampler.

For every point, every prompt is sampled ``images_per_prompt`` times (one batch, the same seed
for every point: the points differ only by the handoff), decoded, scored by the reward and
embedded; diversity is per prompt 1 − mean pairwise cosine (and Vendi), averaged over prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..metrics.diversity import cosine_diversity, vendi_score
from ..metrics.plot import pareto_front
from .combined import CombinedSamplingError, combined_sample


@dataclass
class SweepPoint:
    mode: str                # "switch" or "blend"
    value: float             # k for switch, p for blend

    @property
    def label(self) -> str:
        return f"k={int(self.value)}" if self.mode == "switch" else f"AIG p={self.value:g}"


def parse_points(switch_steps: str, blend_powers: str, steps: int) -> list[SweepPoint]:
    """'0, 20, 30, 40' and '0.5, 1, 2' → sweep points; clear errors for anything else."""
    points = []
    for text, mode in ((switch_steps, "switch"), (blend_powers, "blend")):
        for item in [t.strip() for t in (text or "").replace(";", ",").split(",") if t.strip()]:
            try:
                v = float(item)
            except ValueError:
                raise CombinedSamplingError(f"{item!r} in the {mode} list is not a number; write e.g. '0, 20, 30, 40'") from None
            if mode == "switch":
                if not (math.isfinite(v) and v == int(v) and 0 <= v <= steps):  # "1e400" parses as infinity
                    raise CombinedSamplingError(f"switch step {item} must be a whole number in [0, {steps}]")
            elif not (v > 0 and math.isfinite(v)):
                raise CombinedSamplingError(f"blend power {item} must be positive")
            points.append(SweepPoint(mode, v))
    if len(points) < 1:
        raise CombinedSamplingError("give at least one switch step (e.g. '0, 20, 30, 40') or blend power")
    return points


def parse_prompts(text: str) -> list[str]:
    """The sweep's prompts: one per non-empty line (each is swept on its own, so empty lines between
    them are only layout). None at all is refused: it would sweep the empty prompt."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise CombinedSamplingError("the sweep has no prompts: write at least one prompt, one per line")
    return prompts


def quality_diversity_sweep(base, tuned, vae, prompts: list[tuple[str, list, list]], points: list[SweepPoint], *,
                            score: Callable[[torch.Tensor, str], torch.Tensor],
                            embed: Callable[[torch.Tensor], torch.Tensor],
                            images_per_prompt: int, seed: int, steps: int, cfg_base: float, cfg_tuned: float,
                            sampler_name: str, scheduler: str, width: int, height: int,
                            on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per point: reward mean/std over all images, diversity and Vendi (mean over prompts)."""
    if images_per_prompt < 2:
        raise CombinedSamplingError("diversity needs at least 2 images per prompt")
    if not prompts:
        raise CombinedSamplingError("give at least one prompt (one per line)")
    fmt = base.model.latent_format
    channels, down = fmt.latent_channels, 8
    total, done = len(points) * len(prompts), 0
    rows = []
    for point in points:
        rewards, embeddings, groups = [], [], []
        for gi, (text, positive, negative) in enumerate(prompts):
            latent = {"samples": torch.zeros(images_per_prompt, channels, height // down, width // down)}
            out = combined_sample(
                base, tuned, positive, negative, latent, seed=seed, steps=steps, sampler_name=sampler_name,
                scheduler=scheduler, cfg_base=cfg_base, cfg_tuned=cfg_tuned,
                switch_step=int(point.value) if point.mode == "switch" else steps,
                mode=point.mode, blend_power=point.value if point.mode == "blend" else 1.0)
            images = vae.decode(out["samples"])
            images = images.reshape(-1, *images.shape[-3:])  # video VAEs add a time axis
            rewards.append(score(images, text).float().cpu())
            embeddings.append(embed(images).float().cpu())
            groups += [gi] * images.shape[0]
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        r = torch.cat(rewards)
        e = torch.cat(embeddings)
        div = cosine_diversity(e, groups)
        rows.append({"point": point.label, "mode": point.mode, "value": point.value,
                     "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
                     "diversity": div.value, "diversity_per_prompt": div.per_group,
                     "vendi": vendi_score(e, groups).value, "images": int(len(r))})
    for i in pareto_front([(row["diversity"], row["reward_mean"]) for row in rows]):
        rows[i]["pareto"] = True
    for row in rows:
        row.setdefault("pareto", False)
    return rows
