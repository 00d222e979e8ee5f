"""Differentiable image preprocessing shared by the CLIP/BLIP-family rewards.

The reference packages preprocess PIL images (torchvision ``Resize(224, BICUBIC)``, ``CenterCrop``,
``ToTensor``, CLIP mean/std). Training needs gradients to reach the pixels, so RewardTune does the
same steps on tensors: the sizes and crop offsets follow torchvision's formulas exactly, and the
resize is torch's antialiased bicubic (PIL's kernel, a = -0.5). At the model's input size (224²)
the result is identical to the PIL path; at other sizes it differs from PIL only by PIL's rounding
to uint8 after resizing (about 1/255 per pixel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardInputError(ValueError):
    """Images or prompts a reward model cannot score, with what to do about it."""


def as_rgb_bchw(images: torch.Tensor, layout: str = "BHWC") -> torch.Tensor:
    """Return float images (B, 3, H, W) in [0, 1] from ComfyUI IMAGE (B, H, W, C) or (B, C, H, W).

    Grayscale (1 channel) is repeated to RGB; an alpha channel (2 or 4 channels) is dropped, as
    ComfyUI keeps transparency in a separate MASK.
    """
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"expected an image tensor, got {type(images).__name__}")
    if layout not in ("BHWC", "BCHW"):
        raise RewardInputError(f"layout must be 'BHWC' (ComfyUI IMAGE) or 'BCHW', got {layout!r}")
    given = tuple(images.shape)  # messages quote the shape as it came, not as rearranged here
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise RewardInputError(
            f"expected images shaped (batch, height, width, channels), got shape {given}")
    if images.numel() == 0:
        what = "the image batch is empty" if images.shape[0] == 0 else "the images have no pixels"
        raise RewardInputError(f"{what} (shape {given}): connect a node that outputs at least one image")
    if layout == "BHWC":
        images = images.movedim(-1, 1)
    channels = images.shape[1]
    if channels in (1, 2):
        images = images[:, :1].expand(-1, 3, -1, -1)
    elif channels in (3, 4):
        images = images[:, :3]
    else:
        axis = "last" if layout == "BHWC" else "second"
        raise RewardInputError(
            f"images have {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA). Shape {given}, channels on "
            f"the {axis} axis ({layout} layout).")
    if not images.is_floating_point():
        images = images.float() / 255.0
    return images


def _positions(idx: list[int]) -> str:
    more = f" and {len(idx) - 8} more" if len(idx) > 8 else ""
    return ", ".join(f"#{i}" for i in idx[:8]) + more


# where non-finite pixels come from, and what to do: said by every check of an image input
NON_FINITE_CAUSE = ("They come from upstream, usually an fp16 overflow in the model or the VAE decode: decode in fp32 "
                    "(a VAE loaded in fp32, or ComfyUI's --fp32-vae), lower the CFG, or leave those images out of the "
                    "batch")


def non_finite_images(images: torch.Tensor, where: str = "of the batch") -> str | None:
    """The images of a batch with NaN or inf pixels, by position, as the start of a sentence
    ("image #1 of the batch has NaN"), or None when every pixel is finite."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim < 2 \
            or images.numel() == 0:  # nothing to check; as_rgb_bchw says what is wrong with an empty batch
        return None
    flat = images.detach().reshape(images.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if not bool(bad.any()):
        return None
    idx = bad.nonzero().flatten().tolist()
    kinds = [k for k, has in (("NaN", bool(torch.isnan(flat).any())), ("inf", bool(torch.isinf(flat).any()))) if has]
    one = len(idx) == 1
    return f"image{'' if one else 's'} {_positions(idx)} {where} ha{'s' if one else 've'} {' and '.join(kinds)}"


def check_finite_images(images: torch.Tensor) -> None:
    """Refuse images with NaN or inf pixels, naming them by batch position. A reward scores them
    NaN and a NaN sorts first, so a best-of-N would keep the broken image as the best."""
    bad = non_finite_images(images)
    if bad:
        raise RewardInputError(f"{bad} (non-finite) pixels: no reward can rank them. {NON_FINITE_CAUSE}")


def check_finite_scores(scores: torch.Tensor, dtype: torch.dtype) -> None:
    """Finite images that scored NaN or inf: the reward model itself overflowed."""
    from .checkpoint import RewardModelError
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        raise RewardModelError(
            f"the reward model gave non-finite scores for image(s) {_positions(bad.nonzero().flatten().tolist())} "
            f"although their pixels are finite: it overflows in {str(dtype).replace('torch.', '')}; set precision "
            "to fp32 in Load Reward Model")


# Beyond this aspect ratio the resize works on a centre crop of the long side (see resize_center_crop).
MAX_RESIZE_RATIO = 8


def kernel_margin(scale: float) -> int:
    """Source pixels an antialiased bicubic output pixel reaches past its own footprint, plus one:
    the kernel spans 2 pixels of the finer grid either side (a = -0.5), i.e. 2·max(1, 1/scale)
    source pixels when resizing by ``scale``."""
    return math.ceil(2 * max(1.0, 1.0 / scale)) + 1


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), then a centred ``size``² crop (BCHW).

    The work is bounded by the output: an image longer than ``MAX_RESIZE_RATIO`` times its short
    side is first cut to a centred stretch of that ratio (with the kernel's reach to spare) along
    its long side, so a 1 × 300,000 strip is not scaled to 224 × 67,200,000 pixels to keep 224².
    Up to that ratio nothing changes (the torchvision formulas below); beyond it the result is the
    same crop of the same scaling up to sub-pixel rounding of the crop's offset."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    if long > MAX_RESIZE_RATIO * short:
        keep = min(long, max(math.ceil(MAX_RESIZE_RATIO * short), short + 2 * kernel_margin(size / short)))
        start = (long - keep) // 2
        images = images[..., start:start + keep, :] if h > w else images[..., start:start + keep]
        h, w = images.shape[-2:]
        long = keep
    # torchvision: the long side is truncated, not rounded
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=True)
        # PIL clamps to the 8-bit range after resampling; bicubic overshoots without it
        images = images.clamp(0.0, 1.0)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def clip_pixels(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[0, 1] BCHW RGB → the normalised ``size``² input of a CLIP/BLIP image encoder."""
    x = resize_center_crop(images, size)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
