"""Batch diversity from embeddings (N × D), grouped by prompt.

* ``cosine_diversity``: per prompt 1 − mean pairwise cosine similarity of the embeddings, averaged
  over prompts — ImageReFL's protocol (DINO ViT-S/16 CLS embeddings, 5 images per prompt).
  Computed in O(N·D) without the N × N matrix: for unit vectors u_i,
  Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − n, so 1,000s of embeddings take milliseconds.
* ``vendi_score``: exp of the Shannon entropy of the eigenvalues of K/n, K the cosine kernel
  (Friedman & Dieng 2023). Ranges from 1 (all identical) to n (all orthogonal). The non-zero
  eigenvalues of K/n = U Uᵀ/n equal those of Uᵀ U/n, so it costs O(n·D² + D³) for n > D.
* ``mean_pairwise_distance``: mean over pairs of any distance between features (L2 or cosine),
  for perceptual feature extractors the user supplies (LPIPS-, DreamSim-style features).

Groups: ``groups`` gives each embedding's prompt id (any hashables, or ints), or
``per_group=n`` splits the batch into consecutive runs of n. Groups may differ in size; the mean
over prompts is unweighted (every prompt counts once), as in ImageReFL. Every group needs at
least two items.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch


class DiversityError(ValueError):
    """Input a diversity metric cannot score, with what to do about it."""


@dataclass
class DiversityReport:
    value: float                      # mean over prompts
    per_group: list[float]            # one value per prompt, in order of first appearance
    group_sizes: list[int]
    metric: str
    extra: dict = field(default_factory=dict)

    def text(self, labels: Sequence[str] | None = None) -> str:
        lines = [f"{self.metric}: {self.value:.4f} (mean over {len(self.per_group)} prompt(s))"]
        for i, (v, n) in enumerate(zip(self.per_group, self.group_sizes)):
            name = labels[i] if labels and i < len(labels) else f"prompt {i}"
            lines.append(f"  {name[:50]}: {v:.4f} ({n} images)")
        return "\n".join(lines)


def group_ids(n: int, groups: Sequence[Hashable] | torch.Tensor | None = None,
              per_group: int | None = None) -> torch.Tensor:
    """Dense group index (0..G−1, in order of first appearance) for each of n items."""
    if groups is not None and per_group:
        raise DiversityError("give either groups or per_group, not both")
    if per_group:
        if per_group < 2:
            raise DiversityError(f"images per prompt must be at least 2 (got {per_group})")
        if n % per_group:
            raise DiversityError(
                f"the batch has {n} images, not a multiple of {per_group} images per prompt; "
                "make the batch size a multiple, or set images per prompt to 0 for one group")
        return torch.arange(n) // per_group
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    groups = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(groups) != n:
        raise DiversityError(f"{len(groups)} group ids for {n} embeddings")
    index: dict = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups], dtype=torch.long)


def _check(emb: torch.Tensor) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise DiversityError(f"embeddings must be a 2-D tensor (N × D), got "
                             f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
    if emb.shape[0] < 2:
        raise DiversityError(f"diversity needs at least 2 images, got {emb.shape[0]}")
    if not torch.isfinite(emb).all():
        raise DiversityError("the embeddings contain NaN or infinite values (is an input image NaN?)")
    return emb.double()


def _sizes(gid: torch.Tensor) -> torch.Tensor:
    sizes = torch.bincount(gid)
    if (sizes < 2).any():
        bad = torch.nonzero(sizes < 2).flatten().tolist()
        raise DiversityError(f"prompt group(s) {bad[:5]} have a single image; diversity needs at least 2 "
                             "images per prompt (raise the batch size or the images per prompt)")
    return sizes


def _unit(emb: torch.Tensor) -> torch.Tensor:
    norms = emb.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise DiversityError("an embedding is all zeros: its direction (cosine) is undefined "
                             "(a blank image with the pixel embedder?)")
    return emb / norms


def cosine_diversity(emb: torch.Tensor, groups=None, *, per_group: int | None = None) -> DiversityReport:
    """1 − mean pairwise cosine per prompt, averaged over prompts. In [0, 2]; 0 = identical
    directions, 1 = orthogonal on average."""
    u = _unit(_check(emb))
    gid = group_ids(u.shape[0], groups, per_group)
    sizes = _sizes(gid)
    sums = torch.zeros(len(sizes), u.shape[1], dtype=u.dtype).index_add_(0, gid, u)
    n = sizes.double()
    mean_cos = ((sums * sums).sum(1) - n) / (n * (n - 1))
    per = (1.0 - mean_cos).clamp(0.0, 2.0)
    return DiversityReport(per.mean().item(), per.tolist(), sizes.tolist(), "1 - mean cosine")


def _vendi_batch(u: torch.Tensor) -> torch.Tensor:
    """Vendi of each of G groups of n unit vectors, u: (G, n, D)."""
    n, dim = u.shape[1], u.shape[2]
    small = (u.transpose(1, 2) @ u if n > dim else u @ u.transpose(1, 2)) / n
    lam = torch.linalg.eigvalsh(small).clamp(min=0.0)
    ent = torch.where(lam > 1e-12, lam * lam.clamp(min=1e-300).log(), torch.zeros_like(lam)).sum(-1)
    return torch.exp(-ent)


def vendi_score(emb: torch.Tensor, groups=None, *, per_group: int | None = None) -> DiversityReport:
    """Vendi score with the cosine kernel, per prompt, averaged over prompts. In [1, n].
    Groups of equal size are computed together (one batched eigendecomposition)."""
    u = _unit(_check(emb))
    gid = group_ids(u.shape[0], groups, per_group)
    sizes = _sizes(gid)
    order = torch.argsort(gid, stable=True)
    members = torch.split(order, sizes.tolist())
    per = torch.empty(len(sizes), dtype=u.dtype)
    for size in sizes.unique().tolist():
        which = torch.nonzero(sizes == size).flatten()
        idx = torch.stack([members[g] for g in which.tolist()])
        per[which] = _vendi_batch(u[idx])
    return DiversityReport(per.mean().item(), per.tolist(), sizes.tolist(), "Vendi (cosine)")


def mean_pairwise_distance(features: torch.Tensor, groups=None, *, per_group: int | None = None,
                           metric: str = "l2") -> DiversityReport:
    """Mean distance over pairs within each prompt, averaged over prompts. ``metric``: l2 or cosine
    (1 − cos). Features are flattened per item, so spatial feature maps work too."""
    if metric not in ("l2", "cosine"):
        raise DiversityError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    f = _check(features.reshape(features.shape[0], -1) if isinstance(features, torch.Tensor) else features)
    if metric == "cosine":
        return cosine_diversity(f, groups, per_group=per_group)
    gid = group_ids(f.shape[0], groups, per_group)
    sizes = _sizes(gid)
    per = []
    for g in range(len(sizes)):
        x = f[gid == g]
        d = torch.cdist(x, x)
        n = x.shape[0]
        per.append((d.sum() / (n * (n - 1))).item())
    return DiversityReport(sum(per) / len(per), per, sizes.tolist(), "mean pairwise L2")
