"""The toy world's data: procedural scenes of simple shapes, their captions, and their pictures.

A scene is a background colour and one to three shapes (circle, square, triangle) in five colours,
each with a size, a position and a rotation. Its caption comes from a small grammar:

    "a red circle"
    "a red circle above a blue square"          (above / below / to the left of / to the right of)
    "a red circle, a blue square and a yellow triangle"

The background, the sizes, the exact positions and the rotations are not in the caption: they are
what a model is free to vary across seeds (its diversity), and what the hidden true preference
(``preference.py``) has a taste about.

Held out: three (colour, shape) pairs (``HELD_OUT_PAIRS``) never occur in a training scene, so
captions that name them (``held_out_captions``) test composition the model never saw.

Everything is deterministic from a seed (numpy's PCG64), and pictures are drawn at 4× and reduced
with a box filter, so edges are anti-aliased like a photo's and not like a pixel mask's.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64                     # pixels, square
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle")
COLOURS = {                   # name -> RGB
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {               # neutral, so a shape's colour always stands out
    "white": (242, 242, 238),
    "light grey": (185, 185, 185),
    "dark grey": (80, 80, 80),
    "black": (22, 22, 26),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("blue", "circle"), ("yellow", "square")})

SCALE = SIZE / 64            # the world was drawn at 64 pixels: lengths below scale with SIZE
RADIUS_RANGE = (7.0 * SCALE, 15.0 * SCALE)   # circumradius (a shape spans 14–30 px at 64)
MARGIN = 1.0 * SCALE          # a shape keeps this many pixels from the edge and from other shapes
COUNT_WEIGHTS = (0.5, 0.42, 0.08)  # one, two, three shapes


@dataclass(frozen=True)
class Shape:
    kind: str                 # circle / square / triangle
    colour: str
    x: float                  # centre, pixels from the left
    y: float                  # centre, pixels from the top
    radius: float             # circumradius, pixels
    angle: float = 0.0        # degrees (a square repeats every 90°, a triangle every 120°)

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.kind

    def polygon(self, scale: float = 1.0) -> list[tuple[float, float]]:
        """Vertices (square, triangle) in pixels × ``scale``; a circle has none."""
        n = {"square": 4, "triangle": 3}[self.kind]
        start = math.radians(self.angle) + (math.pi / 4 if n == 4 else -math.pi / 2)
        return [((self.x + self.radius * math.cos(start + 2 * math.pi * i / n)) * scale,
                 (self.y + self.radius * math.sin(start + 2 * math.pi * i / n)) * scale) for i in range(n)]


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    relation: str | None = None   # two shapes: how the first stands to the second
    caption: str = field(default="", compare=False)


# ------------------------------------------------------------------------------ captions
def phrase(colour: str, kind: str) -> str:
    return f"a {colour} {kind}"


def caption_of(pairs: list[tuple[str, str]], relation: str | None = None) -> str:
    """The caption of (colour, shape) pairs in order (two pairs: with their relation)."""
    parts = [phrase(c, k) for c, k in pairs]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        if relation is None:
            raise ValueError("two shapes need a relation")
        return f"{parts[0]} {relation} {parts[1]}"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """The (colour, shape) pairs a caption names, in order, and its relation (two shapes)."""
    text = caption.strip().lower()
    relation = next((r for r in RELATIONS if f" {r} " in text), None)
    if relation is not None:
        chunks = text.split(f" {relation} ")
    else:
        chunks = [c for part in text.split(" and ") for c in part.split(", ")]
    pairs = []
    for chunk in chunks:
        words = chunk.split()
        if len(words) != 3 or words[0] != "a":
            raise ValueError(f"not a toy-world caption: {caption!r}")
        colour, kind = words[1], words[2]
        if colour not in COLOURS or kind not in SHAPES:
            raise ValueError(f"not a toy-world caption: {caption!r} (unknown {colour!r} or {kind!r})")
        pairs.append((colour, kind))
    return pairs, relation


ALL_PAIRS = tuple((c, k) for c in COLOURS for k in SHAPES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)


def held_out_captions() -> list[str]:
    """Evaluation captions that name a held-out pair: each held-out pair alone, and with a seen
    pair of another colour and shape in each relation (fixed order, no randomness)."""
    out = []
    for pair in sorted(HELD_OUT_PAIRS):
        out.append(caption_of([pair]))
    for i, pair in enumerate(sorted(HELD_OUT_PAIRS)):
        others = [p for p in TRAIN_PAIRS if p[0] != pair[0] and p[1] != pair[1]]
        for j, relation in enumerate(RELATIONS):
            other = others[(3 * i + j) % len(others)]
            first, second = (pair, other) if j % 2 == 0 else (other, pair)
            out.append(caption_of([first, second], relation))
    return out


def seen_captions() -> list[str]:
    """Evaluation captions of the training distribution's kind (every seen pair alone, and a
    fixed set of two-shape captions), for comparison with the held-out ones."""
    out = [caption_of([p]) for p in TRAIN_PAIRS]
    pairs = [(a, b) for a, b in itertools.permutations(TRAIN_PAIRS, 2) if a[0] != b[0] and a[1] != b[1]]
    for j in range(12):
        a, b = pairs[(37 * j) % len(pairs)]
        out.append(caption_of([a, b], RELATIONS[j % len(RELATIONS)]))
    return out


# ------------------------------------------------------------------------------ sampling scenes
def _fits(shape: Shape, others: list[Shape]) -> bool:
    r = shape.radius + MARGIN
    if not (r <= shape.x <= SIZE - r and r <= shape.y <= SIZE - r):
        return False
    return all(math.hypot(shape.x - o.x, shape.y - o.y) > shape.radius + o.radius + MARGIN for o in others)


RELATION_MARGIN = 3.0 * SCALE  # pixels: a drawn relation is unambiguous by at least this much


def _relation_holds(first: Shape, second: Shape, relation: str, margin: float = 0.0) -> bool:
    """The first shape stands ``relation`` the second: the offset between their centres points
    mostly that way (more along that axis than across it, by ``margin`` pixels)."""
    dx, dy = second.x - first.x, second.y - first.y
    return {"above": dy > abs(dx) + margin, "below": -dy > abs(dx) + margin,
            "to the left of": dx > abs(dy) + margin, "to the right of": -dx > abs(dy) + margin}[relation]


def relation_of(first: Shape, second: Shape) -> str | None:
    return next((r for r in RELATIONS if _relation_holds(first, second, r)), None)


def sample_scene(rng: np.random.Generator, pairs: list[tuple[str, str]] | None = None,
                 relation: str | None = None, background: str | None = None,
                 allowed_pairs=TRAIN_PAIRS) -> Scene:
    """A random scene. ``pairs`` / ``relation`` / ``background`` fix what the caption says (or the
    background); the rest is drawn. Without ``pairs``: one to three distinct pairs from
    ``allowed_pairs`` (the training pairs by default), two with a random relation."""
    if pairs is None:
        n = int(rng.choice(3, p=COUNT_WEIGHTS)) + 1
        idx = rng.choice(len(allowed_pairs), size=n, replace=False)
        pairs = [allowed_pairs[i] for i in idx]
        if n == 2:
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    if len(pairs) == 2 and relation is None:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    if background is None:
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    for _ in range(1000):
        shapes: list[Shape] = []
        for colour, kind in pairs:
            for _ in range(200):
                radius = float(rng.uniform(*RADIUS_RANGE)) * (1.0 if len(pairs) == 1 else 0.85)
                s = Shape(kind, colour, float(rng.uniform(0, SIZE)), float(rng.uniform(0, SIZE)), radius,
                          float(rng.uniform(0, 360)))
                if _fits(s, shapes):
                    shapes.append(s)
                    break
            else:
                break
        if len(shapes) == len(pairs) and (relation is None or _relation_holds(shapes[0], shapes[1], relation, RELATION_MARGIN)):
            return Scene(background, tuple(shapes), relation if len(pairs) == 2 else None,
                         caption_of(list(pairs), relation if len(pairs) == 2 else None))
    raise RuntimeError(f"could not place {pairs} ({relation}) on a {SIZE}-pixel canvas")


def sample_scenes(seed: int, n: int, **kw) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


# ------------------------------------------------------------------------------ pictures
def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as an RGB uint8 array (size, size, 3), anti-aliased."""
    big = size * SUPERSAMPLE
    k = big / SIZE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([(s.x - s.radius) * k, (s.y - s.radius) * k, (s.x + s.radius) * k, (s.y + s.radius) * k],
                         fill=fill)
        else:
            draw.polygon(s.polygon(k), fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1], ComfyUI's IMAGE layout."""
    return np.stack([render(s) for s in scenes]).astype(np.float32) / 255.0
