"""The one interface every reward model has: ``score(images, prompts) -> tensor[B]``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .checkpoint import RewardModelError
from .preprocess import CLIP_MEAN, CLIP_STD, RewardInputError, as_rgb_bchw, clip_pixels

Prompts = str | Sequence[str] | None


def match_prompts(prompts: Prompts, n: int, needs_prompt: bool) -> list[str]:
    """One prompt for all images, or exactly one per image."""
    if prompts is None:
        if needs_prompt:
            raise RewardInputError("this reward scores an image against its prompt: give a prompt")
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise RewardInputError("prompts must be strings")
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise RewardInputError(
            f"got {len(prompts)} prompts for {n} images: give one prompt for all images, "
            "or exactly one per image")
    return prompts


class PreferenceMLP(nn.Module):
    """The head of ImageReward and of the LAION aesthetic predictor: five linear layers, no
    activation between them (both originals comment theirs out). Dropout slots are kept as
    identities so the parameter names (layers.0/2/4/6/7) match the official files."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
            nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_with_weights(factory: Callable[[], nn.Module], sd: dict[str, torch.Tensor], name: str,
                       ignore: Sequence[str] = ()) -> nn.Module:
    """Construct a module without initialising it (meta device), then take the file's tensors.

    Initialising a 1B-parameter CLIP only to overwrite it costs ~15 s on a CPU; this skips it.
    Non-persistent buffers (position ids, causal masks) are rebuilt on the CPU. Loading is
    strict: a missing or unexpected key names the keys instead of silently scoring with
    random weights.
    """
    with torch.device("meta"):
        module = factory()
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore))}
    try:
        result = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise RewardModelError(f"the file does not match the {name} architecture: {e}") from e
    persistent = set(module.state_dict())
    missing = [k for k in result.missing_keys if k in persistent]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected weights "
                         f"(e.g. {', '.join(result.unexpected_keys[:3])})")
        raise RewardModelError(f"the file does not match the {name} architecture: " + "; ".join(parts))
    for mod_name, mod in module.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, buf_name, _rebuild_buffer(buf_name, buf, f"{mod_name}.{buf_name}"))
    return module.eval().requires_grad_(False)


def _rebuild_buffer(name: str, buf: torch.Tensor, full: str) -> torch.Tensor:
    if name == "position_ids":
        return torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    if name == "attn_mask" and buf.ndim == 2:  # open_clip's additive causal mask
        return torch.full(buf.shape, float("-inf")).triu_(1)
    raise RewardModelError(f"internal: do not know how to rebuild buffer {full}")


class ParamModule(nn.Module):
    """A module whose device and dtype are those of its weights (CPU/float32 without weights).
    ComfyUI's ModelPatcher assigns ``model.device`` when it moves a model; the value is read from
    the weights instead, so the assignment is accepted and ignored."""

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @device.setter
    def device(self, _value) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32


class RewardModel(ParamModule):
    """A differentiable reward. Subclasses implement ``_score_pixels``.

    ``score`` takes ComfyUI IMAGE tensors (B, H, W, C) in [0, 1] (or BCHW with
    ``layout="BCHW"``), any size, grayscale/RGB/RGBA, and returns float32 scores (B,) on the
    images' device. Gradients flow to the images. ``training_reward`` applies the reward's
    scale and offset, s·(R + o), so rewards of different ranges train alike.
    """

    kind: str = "reward"
    needs_prompt: bool = True
    input_size: int = 224
    mean = CLIP_MEAN
    std = CLIP_STD
    #: s and o in s·(R + o) (ImageReFL §4). Defaults are per reward; see README "Rewards".
    scale: float = 1.0
    offset: float = 0.0

    def __init__(self):
        super().__init__()
        self.label = self.kind

    def preprocess(self, images: torch.Tensor, layout: str = "BHWC") -> torch.Tensor:
        x = as_rgb_bchw(images, layout).to(self.device, torch.float32)
        return clip_pixels(x, self.input_size, self.mean, self.std).to(self.dtype)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Prompts = None, *, layout: str = "BHWC",
              batch_size: int | None = None, on_batch=None) -> torch.Tensor:
        """Scores (B,) float32. ``on_batch(done, total)`` is called after each chunk of
        ``batch_size`` images (progress; a host may raise from it to interrupt)."""
        out_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        x = as_rgb_bchw(images, layout)
        prompts = match_prompts(prompts, x.shape[0], self.needs_prompt)
        step = batch_size or x.shape[0]
        if step < 1:
            raise RewardInputError(f"batch_size must be at least 1, got {batch_size}")
        scores = []
        for i in range(0, x.shape[0], step):
            pixels = self.preprocess(x[i:i + step], "BCHW")
            scores.append(self._score_pixels(pixels, prompts[i:i + step]).float().reshape(-1))
            if on_batch is not None:
                on_batch(min(i + step, x.shape[0]), x.shape[0])
        return torch.cat(scores).to(out_device)

    def _apply(self, fn, *a, **kw):
        # a device/dtype change invalidates text features cached by the CLIP rewards
        cache = self.__dict__.get("text_features")
        if cache is not None:
            cache.clear()
        return super()._apply(fn, *a, **kw)

    def training_reward(self, images: torch.Tensor, prompts: Prompts = None, *, scale: float | None = None,
                        offset: float | None = None, **kw) -> torch.Tensor:
        """s·(R + o) with the reward's own s and o, or ``scale`` / ``offset`` where given (the
        trainer's reward_scale / reward_offset settings)."""
        s = self.scale if scale is None else scale
        o = self.offset if offset is None else offset
        return s * (self.score(images, prompts, **kw) + o)

    def forward(self, images: torch.Tensor, prompts: Prompts = None, **kw) -> torch.Tensor:
        return self.score(images, prompts, **kw)
