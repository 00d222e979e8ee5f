"""``load_reward_model``: one entry point from a file (or folder) to a ``RewardModel``."""
from __future__ import annotations

import os

import torch

from .base import RewardModel
from .checkpoint import (OFFICIAL_FILES, RewardModelError, detect_reward_type, read_folder_config,
                         read_state_dict)

REWARD_TYPES = ("imagereward", "hpsv2", "hpsv2.1", "pickscore", "aesthetic")


def _label_hps(path: str) -> str:
    name = os.path.basename(path).lower().replace("_", ".").replace("-", ".")
    return "hpsv2.1" if "2.1" in name else "hpsv2"


def load_reward_model(path: str, reward_type: str = "auto", *, clip_vision_path: str | None = None,
                      clip_vision=None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> RewardModel:
    """Load an official reward checkpoint.

    ``reward_type`` is ``auto`` (read from the file's keys) or one of ``REWARD_TYPES``. The
    aesthetic predictor is an MLP on CLIP ViT-L/14 image embeddings: give the CLIP file as
    ``clip_vision_path`` or ComfyUI's CLIP_VISION object as ``clip_vision``.
    """
    if reward_type != "auto" and reward_type not in REWARD_TYPES:
        raise RewardModelError(f"unknown reward type {reward_type!r}; use auto or one of {', '.join(REWARD_TYPES)}")
    sd = read_state_dict(path)
    found = detect_reward_type(sd)
    if found == "clip_vision":
        raise RewardModelError(
            f"{os.path.basename(path)} looks like a CLIP vision model, not a reward head. For the "
            "aesthetic predictor, load the MLP head (sac+logos+ava1-l14-linearMSE.pth) and pick this "
            "file as its CLIP model")
    wanted = found if reward_type == "auto" else reward_type
    if found != ("hpsv2" if wanted.startswith("hpsv2") else wanted):  # hpsv2.1 is the hpsv2 architecture
        raise RewardModelError(
            f"{os.path.basename(path)} looks like a {found} model, not {wanted}. "
            f"Set the reward type to auto or {found}, or pick {OFFICIAL_FILES[wanted]}")
    folder = os.path.dirname(path) if os.path.isfile(path) else path

    if found == "imagereward":
        from .imagereward import load_imagereward
        model = load_imagereward(sd, folder)
    elif found == "hpsv2":
        from .clip_rewards import load_hpsv2
        model = load_hpsv2(sd, wanted if reward_type != "auto" else _label_hps(path))
    elif found == "pickscore":
        from .clip_rewards import load_pickscore
        model = load_pickscore(sd, read_folder_config(path))
    else:  # aesthetic
        from .clip_rewards import ComfyClipVisionEmbedder, clip_vision_embedder, load_aesthetic
        if clip_vision is not None:
            encoder = ComfyClipVisionEmbedder(clip_vision)
            model = load_aesthetic(sd, encoder, clip_vision.image_size, clip_vision.image_mean,
                                   clip_vision.image_std)
        elif clip_vision_path:
            clip_sd = read_state_dict(clip_vision_path)
            if "vision_model.embeddings.patch_embedding.weight" not in clip_sd:
                raise RewardModelError(
                    f"{os.path.basename(clip_vision_path)} is not a CLIP model in transformers layout "
                    "(vision_model.*); the aesthetic predictor needs OpenAI CLIP ViT-L/14, e.g. "
                    "clip-vit-large-patch14.safetensors")
            encoder = clip_vision_embedder(clip_sd, read_folder_config(clip_vision_path))
            model = load_aesthetic(sd, encoder, encoder.vision_model.config.image_size)
        else:
            raise RewardModelError(
                "the aesthetic predictor scores CLIP ViT-L/14 image embeddings: connect a CLIP_VISION "
                "(Load CLIP Vision with clip-vit-large-patch14) or pick a CLIP file for it")
        width = model.mlp.layers[0].weight.shape[1]
        with torch.no_grad():
            probe = model.image_encoder(torch.zeros(1, 3, model.input_size, model.input_size,
                                                    dtype=model.dtype, device=model.device))
        if probe.shape[-1] != width:
            raise RewardModelError(
                f"the aesthetic head expects {width}-dim CLIP embeddings but the CLIP model gives "
                f"{probe.shape[-1]}: use CLIP ViT-L/14 (768-dim) for sac+logos+ava1-l14")
    model.source = path
    return model.to(device=device, dtype=dtype)
