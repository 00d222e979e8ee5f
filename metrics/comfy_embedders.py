"""Diversity embedders inside a running ComfyUI: their folder, model management, progress."""
from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..rewards.checkpoint import RewardModelError
from ..rewards.comfy_rewards import managed, progress_hook, register_model_folder
from .embedders import Embedder, PixelEmbedder, load_embedder

FOLDER = "diversity_models"
PIXELS = "pixels (no model)"


def register_folder() -> None:
    register_model_folder(FOLDER)


def embedder_files() -> list[str]:
    return [PIXELS] + folder_paths.get_filename_list(FOLDER) + folder_paths.get_filename_list("clip_vision")


@dataclass
class EmbedderHandle:
    embedder: Embedder
    patcher: comfy.model_patcher.ModelPatcher | None
    name: str

    def embed(self, images, batch_size: int = 16, progress: bool = False):
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher])
        return self.embedder.embed(images, batch_size=batch_size, on_batch=progress_hook(images.shape[0], progress))


PIXEL_HANDLE = EmbedderHandle(PixelEmbedder(), None, "pixels")


def load(name: str, clip_vision=None) -> EmbedderHandle:
    if clip_vision is None and name == PIXELS:
        return PIXEL_HANDLE
    path = None
    if clip_vision is None:
        path = folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path("clip_vision", name)
        if path is None:
            raise RewardModelError(
                f"embedder file {name!r} not found in {folder_paths.get_folder_paths(FOLDER)} or the clip_vision "
                "folders. Put DINO ViT-S/16 (dino_deitsmall16_pretrain.pth) in models/diversity_models, or use a "
                "CLIP vision file, or choose 'pixels (no model)'")
    embedder = load_embedder(path, clip_vision)
    return EmbedderHandle(embedder, managed(embedder), "CLIP_VISION" if clip_vision is not None else os.path.basename(name))
