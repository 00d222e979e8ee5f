"""Diversity embedders inside a running ComfyUI: their folder, model management, progress."""
from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..rewards.checkpoint import RewardModelError, WEIGHT_SUFFIXES
from .embedders import Embedder, PixelEmbedder, load_embedder

FOLDER = "diversity_models"
PIXELS = "pixels (no model)"


def register_folder() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | set(WEIGHT_SUFFIXES))


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
        bar = comfy.utils.ProgressBar(images.shape[0]) if progress else None

        def on_batch(done, total):
            if bar is not None:
                bar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        return self.embedder.embed(images, batch_size=batch_size, on_batch=on_batch)


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
    patcher = comfy.model_patcher.ModelPatcher(embedder, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return EmbedderHandle(embedder, patcher, "CLIP_VISION" if clip_vision is not None else os.path.basename(name))
