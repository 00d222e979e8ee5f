"""Reward models inside a running ComfyUI: the ``reward_models`` folder, VRAM management through
ComfyUI's model patcher, progress and interrupt, captions. Imported only by the nodes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from .base import RewardModel
from .checkpoint import OFFICIAL_FILES, RewardModelError, WEIGHT_SUFFIXES
from .loader import load_reward_model
from .preprocess import RewardInputError, as_rgb_bchw, check_finite_images, check_finite_scores

FOLDER = "reward_models"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def register_model_folder(folder: str) -> None:
    """models/<folder> for weight files, keeping any paths extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, folder)
    paths, exts = folder_paths.folder_names_and_paths.get(folder, ([], set()))
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[folder] = (paths, set(exts) | set(WEIGHT_SUFFIXES))


def register_reward_folder() -> None:
    register_model_folder(FOLDER)


def managed(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    """A patcher so ComfyUI's model management loads and offloads ``module`` like its own models."""
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def progress_hook(total: int, show: bool = True):
    """``on_batch(done, total)`` for the libraries: a progress bar, and Cancel between batches."""
    bar = comfy.utils.ProgressBar(total) if show else None

    def on_batch(done, total):
        if bar is not None:
            bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()
    return on_batch


def reward_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def clip_files() -> list[str]:
    """CLIP candidates for the aesthetic head: the clip_vision folder, then reward_models."""
    return folder_paths.get_filename_list("clip_vision") + [
        f for f in reward_files() if "clip" in f.lower()]


@dataclass
class RewardHandle:
    """What flows between nodes as REWARD_MODEL: the model and the patcher ComfyUI loads it with."""
    model: RewardModel
    patcher: comfy.model_patcher.ModelPatcher
    name: str

    def load(self) -> RewardModel:
        mm.load_models_gpu([self.patcher])
        return self.model


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


def load_reward(name: str, reward_type: str = "auto", precision: str = "auto", clip_vision=None,
                clip_name: str | None = None) -> RewardHandle:
    path = folder_paths.get_full_path(FOLDER, name) if name else None
    if path is None:
        folders = folder_paths.get_folder_paths(FOLDER)
        raise RewardModelError(
            f"reward model file {name!r} not found. Put it in {' or '.join(folders)} (or add a "
            f"'{FOLDER}' entry to extra_model_paths.yaml) and refresh. Expected files: "
            + "; ".join(f"{k}: {v}" for k, v in OFFICIAL_FILES.items()))
    clip_path = None
    if clip_vision is None and clip_name:
        clip_path = folder_paths.get_full_path("clip_vision", clip_name) or folder_paths.get_full_path(FOLDER, clip_name)
        if clip_path is None:
            raise RewardModelError(f"CLIP model {clip_name!r} not found in the clip_vision or {FOLDER} folders")
    load_device = mm.get_torch_device()
    offload = mm.unet_offload_device()
    model = load_reward_model(path, reward_type, clip_vision=clip_vision, clip_vision_path=clip_path,
                              device=offload, dtype=_dtype(precision, load_device))
    patcher = managed(model)
    return RewardHandle(model, patcher, os.path.basename(name))


def split_prompts(prompt: str, per_line: bool) -> list[str]:
    """The prompt text as the nodes' prompts: the whole text for every image, or one line per
    image. Per line, an empty line would shift every later prompt onto the wrong image, so it is
    refused by number (trailing empty lines excepted: an editor's last newline)."""
    if not per_line:
        return [prompt]
    lines = [line.strip() for line in prompt.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise RewardInputError("one_prompt_per_line is on but there is no prompt: write one prompt per line, the "
                               "first line for the first image of the batch, or turn one_prompt_per_line off")
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise RewardInputError(f"line {empty[0]} is empty{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}: "
                               "with one_prompt_per_line each line is the prompt of one image, in batch order; "
                               "write that image's prompt on it or remove the line")
    return lines


def score_images(handle: RewardHandle, images: torch.Tensor, prompts: list[str],
                 batch_size: int = 8) -> torch.Tensor:
    """Scores (B,) on the CPU, with a progress bar and interrupt between batches. Images with NaN
    or inf pixels are refused by position (``RewardInputError``), as are non-finite scores."""
    check_finite_images(images)
    model = handle.load()
    with torch.no_grad():
        scores = model.score(images.to(model.device), prompts, batch_size=batch_size,
                             on_batch=progress_hook(images.shape[0])).cpu()
    check_finite_scores(scores, model.dtype)
    return scores


def rank(scores: torch.Tensor, top_k: int) -> list[int]:
    """Indices of the top_k scores, best first (ties keep batch order; a NaN ranks last, where
    ``torch.sort`` would put it first)."""
    key = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = torch.sort(key, descending=True, stable=True).indices.tolist()
    return order[:max(1, min(top_k, len(order)))]


def summary(handle: RewardHandle, scores: torch.Tensor, prompts: list[str]) -> str:
    lines = [f"{handle.model.label} ({handle.name}), {len(scores)} image(s)"]
    for i, s in enumerate(scores.tolist()):
        prompt = prompts[i] if len(prompts) > 1 else None
        lines.append(f"#{i}: {s:.4f}" + (f"  [{prompt[:40]}]" if prompt else ""))
    if len(scores) > 1:
        lines.append(f"mean {scores.mean():.4f}, std {scores.std():.4f}, best #{int(scores.argmax())}")
    return "\n".join(lines)


def caption(images: torch.Tensor, scores: torch.Tensor, label: str) -> torch.Tensor:
    """The images, as RGB (grayscale repeated, alpha dropped, as for scoring), with
    '<label>: <score>' written in a bar across the top."""
    rgb = as_rgb_bchw(images).movedim(1, -1)  # (B, H, W, 3): also one image without a batch axis
    out = []
    for img, s in zip(rgb, scores.tolist()):
        arr = (img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
        draw = ImageDraw.Draw(pil)
        # bounded by the width too: a 300,000 × 1 strip would ask FreeType for an 18,750 px font
        size = max(10, min(pil.height // 16, pil.width // 8))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        text = f"{label}: {s:.3f}"
        draw.rectangle([0, 0, pil.width, size + 6], fill=(0, 0, 0))
        draw.text((4, 2), text, fill=(255, 255, 255), font=font)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    return torch.stack(out).to(images.device)
