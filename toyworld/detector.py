"""The toy world's detector: what an image contains, read procedurally (a miniature GenEval).

``detect(image)`` finds the background colour (the border's median), the pixels that differ from
it, the connected regions of each palette colour among them, and for each region its colour, its
shape, its centre and its size. The shape comes from the region's outline as seen from its
centre: r(θ), the farthest pixel in each of 48 directions. A triangle's outline repeats three
times around (a strong third harmonic of r(θ)), a square's four times, a circle's not at all —
whatever the rotation, and still when a VAE has softened the corners (thresholds in
``TRIANGLE_H3`` / ``SQUARE_H4``). On rendered scenes it reads back what was drawn
(tests/test_toyworld_scenes.py); on generated images it is what "the model drew a red circle"
means.

Then:

* ``alignment(caption, detection)``: the fraction of the caption's (colour, shape) pairs found,
  and whether the relation holds; ``matches`` is all pairs found (the GenEval-style pass/fail).
* ``coverage(detections)``: over many samples of one caption, the normalised entropy of what the
  caption leaves free (background, position of the first shape on a 3×3 grid, size in three bins,
  rotation in four bins): 1 = spread evenly, 0 = always the same. Mode collapse shows here.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scenes import BACKGROUNDS, COLOURS, RADIUS_RANGE, SCALE, SIZE, parse_caption, relation_of, Shape

FOREGROUND_DISTANCE = 70.0     # RGB distance from the background that counts as a shape
MIN_AREA = int(12 * SCALE ** 2)  # pixels; smaller regions are specks, not shapes
TRIANGLE_H3 = 0.045           # r(θ)'s third harmonic (relative to its mean) above this: a triangle
SQUARE_H4 = 0.028             # else its fourth harmonic above this: a square; else a circle
MIN_FILL = 0.25               # thinner regions are anti-aliased rims between two colours, not shapes
ANGLE_BINS = 48

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)


@dataclass(frozen=True)
class Found:
    kind: str
    colour: str
    x: float
    y: float
    radius: float           # circumradius estimate, pixels
    area: int
    fill: float             # area / (π r²)

    def as_shape(self) -> Shape:
        return Shape(self.kind, self.colour, self.x, self.y, self.radius)


@dataclass(frozen=True)
class Detection:
    background: str
    shapes: tuple[Found, ...]
    touches_edge: bool      # some shape reaches the image border
    clutter: float          # fraction of foreground pixels outside every detected shape


def _as_uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    return a[..., :3]


def outline_harmonics(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float) -> tuple[float, float]:
    """The third and fourth Fourier harmonics of a region's outline r(θ) (the farthest pixel from
    the centre per direction), relative to its mean radius."""
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    bins = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    r = np.zeros(ANGLE_BINS)
    np.maximum.at(r, bins, np.hypot(dx, dy))
    empty = r == 0
    if empty.any():  # a small region leaves directions without a pixel: take their neighbours'
        idx = np.arange(ANGLE_BINS)
        r = np.interp(idx, idx[~empty], r[~empty], period=ANGLE_BINS)
    f = np.abs(np.fft.rfft(r)) / (r.mean() * ANGLE_BINS)
    return float(f[3]), float(f[4])


def _shape_of(h3: float, h4: float) -> str:
    if h3 > TRIANGLE_H3 and h3 > h4:
        return "triangle"
    return "square" if h4 > SQUARE_H4 else "circle"


def detect(image) -> Detection:
    """What one image (H, W, 3; uint8, or float in [0, 1]) contains."""
    a = _as_uint8(image).astype(np.float32)
    h, w = a.shape[:2]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    background = _BG_NAMES[int(np.argmin(((_BG - bg) ** 2).sum(1)))]
    fg = np.sqrt(((a - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    nearest = np.argmin(((a[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    found, covered = [], np.zeros_like(fg)
    for ci, name in enumerate(_NAMES):
        labels, n = ndimage.label(fg & (nearest == ci))
        for lab in range(1, n + 1):
            ys, xs = np.nonzero(labels == lab)
            area = len(xs)
            if area < MIN_AREA:
                continue
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            d = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
            radius = float(d.max()) + 0.5          # to the far edge of the farthest pixel
            fill = area / (math.pi * radius ** 2)
            if fill < MIN_FILL:
                covered |= labels == lab
                continue
            kind = _shape_of(*outline_harmonics(xs, ys, cx, cy))
            found.append(Found(kind, name, float(cx), float(cy), radius, area, float(fill)))
            covered |= labels == lab
    found.sort(key=lambda f: -f.area)
    edge = bool(fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
    total = int(fg.sum())
    # a shape's anti-aliased rim (mixed colours, one pixel wide) belongs to it
    covered = ndimage.binary_dilation(covered)
    clutter = float((fg & ~covered).sum()) / total if total else 0.0
    return Detection(background, tuple(found), edge, clutter)


def detect_batch(images) -> list[Detection]:
    """(N, H, W, 3) → one Detection per image."""
    return [detect(im) for im in np.asarray(images)]


# ------------------------------------------------------------------------------ text alignment
@dataclass(frozen=True)
class Alignment:
    found: int              # caption pairs found
    wanted: int             # caption pairs
    relation: bool | None   # two shapes: the relation holds (None: not applicable or a shape missing)
    extra: int              # detected shapes the caption does not name

    @property
    def fraction(self) -> float:
        return self.found / self.wanted

    @property
    def matches(self) -> bool:
        return self.found == self.wanted


def alignment(caption: str, det: Detection) -> Alignment:
    pairs, relation = parse_caption(caption)
    pool = list(det.shapes)
    hits: list[Found | None] = []
    for colour, kind in pairs:
        pick = next((f for f in pool if f.colour == colour and f.kind == kind), None)
        hits.append(pick)
        if pick is not None:
            pool.remove(pick)
    rel = None
    if relation is not None and all(hits):
        rel = relation_of(hits[0].as_shape(), hits[1].as_shape()) == relation
    return Alignment(sum(h is not None for h in hits), len(pairs), rel, len(pool))


# ------------------------------------------------------------------------------ coverage
def _entropy(values: list, bins: int) -> float:
    counts = np.array(list(Counter(values).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(bins)) if bins > 1 else 0.0


def size_bin(radius: float) -> int:
    lo, hi = RADIUS_RANGE
    return int(np.clip((radius - lo) / (hi - lo) * 3, 0, 2))


def coverage(detections: list[Detection]) -> dict[str, float]:
    """Normalised entropies (0 … 1) of the free attributes over samples of one caption, and their
    mean. Samples with no shape count for the background only."""
    bgs = [d.background for d in detections]
    firsts = [d.shapes[0] for d in detections if d.shapes]
    out = {"background": _entropy(bgs, len(BACKGROUNDS))}
    if firsts:
        out["position"] = _entropy([(min(int(f.x * 3 / SIZE), 2), min(int(f.y * 3 / SIZE), 2)) for f in firsts], 9)
        out["size"] = _entropy([size_bin(f.radius) for f in firsts], 3)
    else:
        out["position"] = out["size"] = 0.0
    out["mean"] = float(np.mean([out["background"], out["position"], out["size"]]))
    return out
