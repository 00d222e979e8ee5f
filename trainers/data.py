"""Training data: an image folder with .txt captions (or a ComfyUI IMAGE batch), aspect-ratio
buckets, prompt lists for ReFL, and a seeded bucket-aware batch sampler. No ComfyUI import."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..rewards.preprocess import MAX_RESIZE_RATIO, NON_FINITE_CAUSE, kernel_margin, non_finite_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_AREA_TOLERANCE = 0.15  # a bucket's pixel count may differ this much from width*height


class DatasetError(ValueError):
    """Training data that cannot be used: what is wrong, where, and what to do about it."""


@dataclass(eq=False)  # tensors have no single truth value: compare examples by identity
class Example:
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    caption: str
    source: str          # file path or "graph[i]"


# ------------------------------------------------------------------------------ allowed folders
ALLOW_PATHS_ENV = "REWARDTUNE_ALLOW_PATHS"


def allowed_roots(input_dir: str) -> list[str]:
    """The folders a server may read training data from: ComfyUI's input folder (first: relative
    paths start there), then those listed in $REWARDTUNE_ALLOW_PATHS (separated by os.pathsep,
    ':' on Linux/macOS, ';' on Windows), an opt-in for people on their own machine."""
    extra = [os.path.expanduser(p.strip()) for p in os.environ.get(ALLOW_PATHS_ENV, "").split(os.pathsep)]
    return [input_dir] + [p for p in extra if os.path.isabs(p)]


def _inside(real: str, roots: Sequence[str]) -> bool:
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def check_no_nul(path, what: str) -> None:
    """No file or folder name holds a NUL character; os.path would refuse one with "embedded null byte"."""
    if "\0" in str(path):
        raise DatasetError(f"{what} {str(path).strip()!r} contains a NUL character (\\x00), which no file or folder "
                           "name can hold: type the path again (a pasted path can carry control characters)")


def confine(path: str, roots: Sequence[str], what: str) -> str:
    """``path`` resolved (``..`` and symlinks included; a relative path starts in ``roots[0]``) if it
    lies inside one of ``roots``. Otherwise one refusal, decided before anything is read and worded
    the same whether the path exists or not, so it tells nothing about the disk."""
    check_no_nul(path, what)
    p = os.path.expanduser(str(path).strip())
    real = os.path.realpath(p if os.path.isabs(p) else os.path.join(roots[0], p))
    if _inside(real, roots):
        return real
    raise DatasetError(
        f"{what} {str(path).strip()!r} is outside ComfyUI's input folder: training data is read only from the "
        "input folder and its subfolders. Put it there and give its path relative to the input folder (e.g. "
        f"my_dataset), or, on your own machine, allow more folders with the environment variable {ALLOW_PATHS_ENV} "
        f"(e.g. {ALLOW_PATHS_ENV}=/data:/home/me/sets) when starting ComfyUI")


# ------------------------------------------------------------------------------ image folder
def _read_caption(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: Notepad's BOM is not part of the caption
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption file {path!r} is not UTF-8 text ({e.reason}): re-save it as UTF-8") from e
    caption = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not caption:
        raise DatasetError(f"caption file {path!r} is empty: write the image's caption in it, "
                           "or remove the image and its .txt file")
    return caption


def read_image_folder(folder: str, roots: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(image_path, caption) pairs for every image in ``folder`` (not recursive, sorted by name),
    each captioned by the .txt file of the same name. With ``roots`` (the server: ``allowed_roots``)
    the folder, and every file read from it, must lie inside one of them (``confine``)."""
    check_no_nul(folder, "dataset folder")
    folder = confine(folder, roots, "dataset folder") if roots else os.path.expanduser(str(folder))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise DatasetError(f"dataset folder {folder!r} {what}: give the path of a folder holding "
                           "images with a .txt caption of the same name next to each")
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    # dotfiles are skipped: macOS "._x.png" metadata files look like images but are not
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    if not images:
        txt = sum(n.lower().endswith(".txt") for n in names)
        hint = f" (it has {txt} .txt file(s) but no images)" if txt else ""
        raise DatasetError(f"dataset folder {folder!r} has no images{hint}: looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)}; put the training images next to their captions")
    pairs, missing = [], []
    for name in images:
        path = os.path.join(folder, name)
        txt = os.path.splitext(path)[0] + ".txt"
        for f in (path, txt) if roots else ():
            if os.path.lexists(f) and not _inside(os.path.realpath(f), roots):
                raise DatasetError(f"{os.path.basename(f)} in the dataset folder is a link to a file outside the "
                                   f"allowed folders: copy the file itself into the folder (or see {ALLOW_PATHS_ENV})")
        if os.path.isfile(txt):
            pairs.append((path, _read_caption(txt)))
        else:
            missing.append(f"{name} (expected {txt})")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{len(missing)} image(s) in {folder!r} have no caption: {'; '.join(missing[:5])}{more}. "
                           "Add a .txt file with the same name holding each caption, or remove those images")
    return pairs


def _decode(path: str) -> torch.Tensor:
    """An image file as (H, W, 3) float32 in [0, 1], EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: convert("RGB") would clip at 255
                grey = np.asarray(im, dtype=np.float32) / 65535.0
                return torch.from_numpy(grey).clamp(0, 1)[..., None].expand(-1, -1, 3).contiguous()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # composite on white: the colour under fully transparent pixels is arbitrary
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path!r} ({type(e).__name__}: {e}): "
                           "remove it from the dataset or re-save it as PNG/JPEG") from e
    return torch.from_numpy(rgb.copy())


# ------------------------------------------------------------------------------ buckets
def bucket_sizes(width: int, height: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Sorted unique (h, w) buckets of about width*height pixels, sides multiples of ``step`` (64 for
    SD1.5/SDXL: the latent must survive the UNet's downsamplings), aspect ratio within
    [1/max_ratio, max_ratio]; (height, width) is always one."""
    if width <= 0 or height <= 0:
        raise DatasetError(f"training size {width}x{height} is not positive: set width and height to e.g. 512")
    area = width * height
    sizes = {(height, width)}
    for w in range(step, int(math.sqrt(area * max_ratio)) + step + 1, step):
        h = max(step, round(area / w / step) * step)
        if 1 / max_ratio <= w / h <= max_ratio and abs(w * h - area) <= _AREA_TOLERANCE * area:
            sizes.update({(h, w), (w, h)})  # symmetric: portrait and landscape get the same choices
    return sorted(sizes)


def _closest_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    # log ratio: 2:1 and 1:2 are equally far from 1:1
    return min(buckets, key=lambda b: abs(math.log(w / h) - math.log(b[1] / b[0])))


def fit_to_bucket(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (antialiased bicubic) to cover ``size`` = (h, w), then centre-crop to it. HWC -> HWC.

    The work is bounded by ``size``: along an axis where the image holds more than
    ``MAX_RESIZE_RATIO`` times what the crop shows (a 1 × 1,000,000 strip into a 64 × 128 bucket
    would otherwise be scaled to 64 × 64,000,000), it is first cut to a centred stretch of that
    many times, with the kernel's reach to spare, at the same scale. Other images are resized as
    they are."""
    th, tw = size
    h, w = image.shape[:2]
    scale = max(th / h, tw / w)
    x = image.movedim(-1, 0)[None].float()
    for axis, n, target in ((2, h, th), (3, w, tw)):
        shown = target / scale  # source pixels the crop keeps along this axis
        keep = max(math.ceil(MAX_RESIZE_RATIO * shown), math.ceil(shown) + 2 * kernel_margin(scale))
        if n > keep:
            x = x.narrow(axis, (n - keep) // 2, keep)
    h, w = x.shape[-2:]
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[0, :, top:top + th, left:left + tw].movedim(0, -1).contiguous()


def _bucketize(items, width: int, height: int, bucketing: bool, step: int) -> dict[tuple[int, int], list[Example]]:
    """items: iterable of (HWC tensor, caption, source); a generator keeps one full-size image in memory."""
    buckets = bucket_sizes(width, height, step) if bucketing else [(height, width)]
    out: dict[tuple[int, int], list[Example]] = {}
    for img, caption, source in items:
        size = _closest_bucket(img.shape[0], img.shape[1], buckets)
        out.setdefault(size, []).append(Example(fit_to_bucket(img, size), caption, source))
    return dict(sorted(out.items()))


def load_examples(pairs_or_folder, width: int, height: int, bucketing: bool = True,
                  bucket_step: int = 64, roots: Sequence[str] | None = None) -> dict[tuple[int, int], list[Example]]:
    """Decode a folder (or (path, caption) pairs) into {(h, w): [Example, ...]}, each image in the
    bucket closest to its aspect ratio (all at (height, width) without bucketing). ``roots``: see
    ``read_image_folder`` (None, as in the CLI: any folder the user names)."""
    pairs = read_image_folder(pairs_or_folder, roots) if isinstance(pairs_or_folder, (str, os.PathLike)) \
        else list(pairs_or_folder)
    if not pairs:
        raise DatasetError("the dataset is empty: give at least one image with a caption")
    return _bucketize(((_decode(str(p)), c, str(p)) for p, c in pairs), width, height, bucketing, bucket_step)


def examples_from_graph(images: torch.Tensor, captions, width: int, height: int, bucketing: bool = True,
                        bucket_step: int = 64) -> dict[tuple[int, int], list[Example]]:
    """The same from a ComfyUI IMAGE batch (B, H, W, C) with one caption for all or one per image."""
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise DatasetError(f"the image input is empty or not an IMAGE batch (shape {shape}): "
                           "connect at least one image")
    bad = non_finite_images(images, "of the training images")
    if bad:  # refused here, before a job exists: a run on them fails at once with a NaN loss
        raise DatasetError(f"{bad} (non-finite) pixels: nothing can be trained on them. {NON_FINITE_CAUSE}")
    captions = [captions] if isinstance(captions, str) else list(captions)
    b = images.shape[0]
    if len(captions) not in (1, b):
        raise DatasetError(f"{b} images but {len(captions)} captions: give one caption for all images "
                           f"or exactly {b}, one per image")
    captions = [" ".join(str(c).split()) for c in captions] * (b if len(captions) == 1 else 1)
    for i, c in enumerate(captions):
        if not c:
            raise DatasetError(f"caption {i} is empty: write a caption for every image")
    rgb = images[..., :3] if images.shape[-1] >= 3 else images[..., :1].expand(-1, -1, -1, 3)
    items = ((rgb[i].float().cpu().clamp(0, 1), captions[i], f"graph[{i}]") for i in range(b))
    return _bucketize(items, width, height, bucketing, bucket_step)


# ------------------------------------------------------------------------------ prompts
def parse_prompts(text_or_path: str, roots: Sequence[str] | None = None) -> list[str]:
    """Prompts, one per non-empty line ('#' starts a comment line), from a .txt file path or a
    multiline string. With ``roots`` a file must lie inside one of them (``confine``; a relative
    path starts in ``roots[0]``); without, any path (the CLI)."""
    text, where = str(text_or_path), "the prompt text"
    candidate = os.path.expanduser(text.strip())
    if "\n" not in candidate and candidate.lower().endswith(".txt"):
        check_no_nul(candidate, "prompt file")
        if roots:
            candidate = confine(candidate, roots, "prompt file")
        if not os.path.isfile(candidate):  # a one-line prompt ending in .txt is surely a mistyped path
            raise DatasetError(f"prompt file {candidate!r} does not exist: fix the path, "
                               "or type the prompts one per line instead")
        try:
            with open(candidate, encoding="utf-8-sig") as f:
                text, where = f.read(), f"prompt file {candidate!r}"
        except UnicodeDecodeError as e:
            raise DatasetError(f"prompt file {candidate!r} is not UTF-8 text: re-save it as UTF-8") from e
    prompts = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise DatasetError(f"{where} has no prompts: write one prompt per line (lines starting with # are comments)")
    return prompts


# ------------------------------------------------------------------------------ sampling
class BatchSampler:
    """Batches drawn with replacement from one bucket at a time, the bucket picked with probability
    proportional to its size. All randomness comes from ``generator``, so its state checkpoints it.

    Several processes (torchrun, ``world_size`` > 1): every process holds the same generator and
    draws the global batch, world_size × batch_size picks from one bucket, and keeps rows
    rank·batch_size … of it: the processes' batches never overlap (disjoint rows of one draw) and
    together are what one process with the global batch draws."""

    def __init__(self, buckets: dict[tuple[int, int], list[Example]], batch_size: int, generator: torch.Generator,
                 world_size: int = 1, rank: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.world_size, self.rank = world_size, rank
        if batch_size < 1:
            raise DatasetError(f"batch size {batch_size} must be at least 1")
        self.buckets = [(size, list(ex)) for size, ex in sorted(buckets.items()) if ex]
        if not self.buckets:
            raise DatasetError("no training examples: the dataset is empty")
        self.batch_size = batch_size
        self.generator = generator
        self._weights = torch.tensor([len(ex) for _, ex in self.buckets], dtype=torch.float64)

    def next(self) -> list[Example]:
        k = int(torch.multinomial(self._weights, 1, generator=self.generator))
        examples = self.buckets[k][1]
        idx = torch.randint(len(examples), (self.batch_size * self.world_size,), generator=self.generator)
        mine = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return [examples[i] for i in mine.tolist()]

    __next__ = next

    def __iter__(self):
        return self
