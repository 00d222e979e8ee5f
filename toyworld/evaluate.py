"""Measuring a model of the toy world: sample through ComfyUI (the pack's combined sampler, which
equals KSampler at k = N and k = 0), then read the pictures with the learned reward, the hidden
true preference, the detector and the pack's diversity metrics.

    images = sample(base, tuned, clip, vae, captions, seeds=range(8), steps=20, switch_step=20)
    figures = measure(images, captions_per_image, reward)

Importing this module imports ComfyUI (``comfy``): set up ComfyUI's arguments first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics.diversity import cosine_diversity, vendi_score
from ..metrics.embedders import PixelEmbedder
from ..sampling.combined import combined_sample
from . import detector as D
from . import preference as P
from . import scenes as S

# what the toy world samples with, unless a caller says otherwise: ComfyUI's euler on SD3's own
# shifted schedule ("simple"), CFG on both stages (the tuned stage too: a LoRA-tuned model still
# needs guidance here), 20 steps
STEPS, CFG, SAMPLER, SCHEDULER = 20, 5.0, "euler", "simple"


class ConditioningCache:
    """CLIPTextEncode's output per caption (the CLIP runs once per caption)."""

    def __init__(self, clip):
        self.clip, self.cache = clip, {}

    def __call__(self, text: str):
        if text not in self.cache:
            self.cache[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self.cache[text]


def sample(base, tuned, conds: ConditioningCache, vae, captions: list[str], seeds: int, *, steps: int = STEPS,
           switch_step: int | None = None, mode: str = "switch", blend_power: float = 1.0, cfg: float = CFG,
           cfg_tuned: float | None = None, sampler: str = SAMPLER, scheduler: str = SCHEDULER, seed: int = 0) -> np.ndarray:
    """``seeds`` pictures per caption, (len(captions) · seeds, H, W, 3) in [0, 1], caption-major.
    ``switch_step`` None or ≥ steps: the base model alone; 0: the tuned model alone; between: the
    base for the first k steps, the tuned model after (``mode`` "blend": ReFL AIG's blend with
    ``blend_power``). The noise of caption i is ComfyUI's for seed ``seed + i`` and a batch of
    ``seeds``, the same for every model and k, so differences come from the models alone."""
    k = steps if switch_step is None else switch_step
    neg = conds("")
    out = []
    for i, text in enumerate(captions):
        latent = {"samples": torch.zeros(seeds, 16, S.SIZE // 8, S.SIZE // 8)}
        res = combined_sample(base, tuned if tuned is not None else base, conds(text), neg, latent, seed=seed + i,
                              steps=steps, sampler_name=sampler, scheduler=scheduler, cfg_base=cfg,
                              cfg_tuned=cfg if cfg_tuned is None else cfg_tuned, switch_step=k, mode=mode,
                              blend_power=blend_power)
        with torch.no_grad():
            out.append(vae.decode(res["samples"]).float().cpu().numpy())
    return np.concatenate(out)


@dataclass
class Figures:
    proxy: float              # the learned reward (PickScore-style score), mean
    true: float               # the hidden true preference, mean
    aligned: float            # fraction of pictures with every caption pair found (GenEval-style)
    coverage: float           # the detector's coverage of what captions leave free, mean over captions
    diversity: float          # the pack's cosine diversity on pixel embeddings, mean over captions
    vendi: float              # the pack's Vendi score on the same embeddings, mean over captions
    clutter: float            # fraction of foreground pixels that are no clean shape, mean
    edge: float               # fraction of pictures with a shape touching the border

    def row(self) -> dict:
        return dict(self.__dict__)


def measure(images: np.ndarray, captions: list[str], seeds: int, reward) -> Figures:
    """The figures of pictures made by ``sample`` (``seeds`` per caption, caption-major)."""
    per_image = [c for c in captions for _ in range(seeds)]
    t = torch.from_numpy(images)
    with torch.no_grad():
        proxy = reward.score(t, per_image).float().numpy()
    dets = D.detect_batch(images)
    true = np.array([P.true_preference(c, d) for c, d in zip(per_image, dets)])
    aligned = np.array([D.alignment(c, d).matches for c, d in zip(per_image, dets)], dtype=np.float64)
    cover = [D.coverage(dets[i * seeds:(i + 1) * seeds])["mean"] for i in range(len(captions))]
    emb = PixelEmbedder().embed(t)
    groups = [i for i in range(len(captions)) for _ in range(seeds)]
    return Figures(proxy=float(proxy.mean()), true=float(true.mean()), aligned=float(aligned.mean()),
                   coverage=float(np.mean(cover)), diversity=cosine_diversity(emb, groups).value,
                   vendi=vendi_score(emb, groups).value, clutter=float(np.mean([d.clutter for d in dets])),
                   edge=float(np.mean([d.touches_edge for d in dets])))


def detector_accuracy(images: np.ndarray, captions: list[str], seeds: int) -> dict:
    """Per-picture text alignment: every pair found, the fraction of pairs found, and (two shapes)
    the relation right when both are found."""
    per_image = [c for c in captions for _ in range(seeds)]
    al = [D.alignment(c, d) for c, d in zip(per_image, D.detect_batch(images))]
    rel = [a.relation for a in al if a.relation is not None]
    return {"all_pairs": float(np.mean([a.matches for a in al])), "pair_recall": float(np.mean([a.fraction for a in al])),
            "relation": float(np.mean(rel)) if rel else None, "pictures": len(al)}
