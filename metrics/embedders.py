"""Image embedders for diversity, from local files: DINO ViT (ImageReFL's ViT-S/16), CLIP image
towers (a file, or ComfyUI's own CLIP_VISION), and a model-free pixel embedder for quick looks."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..rewards.base import ParamModule, build_with_weights
from ..rewards.checkpoint import RewardModelError, count_indices, read_folder_config, read_state_dict
from ..rewards.preprocess import CLIP_MEAN, CLIP_STD, as_rgb_bchw, clip_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Embedder(ParamModule):
    """``embed(images)`` → (N, D) float32 on the CPU. Images: ComfyUI IMAGE (B, H, W, C) in [0, 1]."""

    name = "embedder"
    size, mean, std = 224, CLIP_MEAN, CLIP_STD

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 16, on_batch=None) -> torch.Tensor:
        x = as_rgb_bchw(images)
        out = []
        for i in range(0, x.shape[0], batch_size):
            px = clip_pixels(x[i:i + batch_size].to(self.device, torch.float32), self.size, self.mean, self.std)
            out.append(self.features(px.to(self.dtype)).float().cpu())
            if on_batch is not None:
                on_batch(min(i + batch_size, x.shape[0]), x.shape[0])
        return torch.cat(out)


class PixelEmbedder(Embedder):
    """No model: the image downscaled to ``size``² (area average), minus its mean, as a vector.
    Cosine diversity on it is 1 − mean pixel correlation: layout/colour variety, not semantics."""

    name = "pixels"
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, size: int = 32):
        super().__init__()
        self.size = size

    @torch.no_grad()
    def embed(self, images, batch_size: int = 64, on_batch=None):
        x = as_rgb_bchw(images).float()
        x = F.adaptive_avg_pool2d(x, (self.size, self.size)).flatten(1)
        return (x - x.mean(1, keepdim=True)).cpu()


class DinoEmbedder(Embedder):
    """DINO ViT CLS embedding (the final LayerNorm's output at the class token)."""

    name = "dino"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, vit: nn.Module, size: int):
        super().__init__()
        self.vit, self.size = vit, size

    def features(self, pixels):
        return self.vit(pixels)


class HFVitEmbedder(Embedder):
    """A transformers ViTModel (e.g. the facebook/dino-vits16 folder): the final LayerNorm's CLS."""

    name = "dino"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit, self.size = vit, vit.config.image_size

    def features(self, pixels):
        return self.vit(pixel_values=pixels).last_hidden_state[:, 0]


class ClipEmbedder(Embedder):
    """Projected CLIP image embedding (transformers' CLIP vision tower or ComfyUI's CLIP_VISION)."""

    name = "clip"

    def __init__(self, tower: nn.Module, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.tower, self.size, self.mean, self.std = tower, size, tuple(mean), tuple(std)

    def features(self, pixels):
        return self.tower(pixels)


def dino_from_state_dict(sd) -> DinoEmbedder:
    """The original DINO release layout (dino_deitsmall16_pretrain.pth: cls_token, pos_embed,
    patch_embed.proj, blocks.N.*, norm), built as timm's VisionTransformer (DINO's own model is
    timm's ViT with LayerNorm eps 1e-6)."""
    from timm.models.vision_transformer import VisionTransformer
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # a training head, if saved
    try:
        width = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        size = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5)) * patch
        cfg = dict(img_size=size, patch_size=patch, embed_dim=width,
                   depth=count_indices(sd, r"blocks\.(\d+)\."), num_heads=width // 64,
                   mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width, qkv_bias=True, num_classes=0)
    except KeyError as e:
        raise RewardModelError(f"not a DINO ViT file: it lacks {e.args[0]}") from e
    vit = build_with_weights(lambda: VisionTransformer(**cfg), sd, "DINO ViT")
    return DinoEmbedder(vit, size)


def load_embedder(path: str | None = None, clip_vision=None) -> Embedder:
    """An embedder from ComfyUI's CLIP_VISION, a DINO or CLIP file, or (neither) the pixel one."""
    if clip_vision is not None:
        from ..rewards.clip_rewards import ComfyClipVisionEmbedder
        return ClipEmbedder(ComfyClipVisionEmbedder(clip_vision), clip_vision.image_size,
                            clip_vision.image_mean, clip_vision.image_std).eval()
    if path is None:
        return PixelEmbedder()
    config = read_folder_config(path)
    if config is not None and config.get("model_type") in ("vit", "dinov2"):
        # an HF folder: transformers reads it (and maps older key names) itself, offline
        from transformers import AutoModel
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        try:
            vit = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        except Exception as e:
            raise RewardModelError(f"cannot load the ViT folder {folder}: {e}") from e
        return HFVitEmbedder(vit.eval().requires_grad_(False))
    sd = read_state_dict(path)
    if "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
        return dino_from_state_dict(sd).eval()
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        from ..rewards.clip_rewards import clip_vision_embedder
        tower = clip_vision_embedder(sd, read_folder_config(path))
        return ClipEmbedder(tower, tower.vision_model.config.image_size).eval()
    raise RewardModelError(
        f"{os.path.basename(path)} is neither a DINO ViT (dino_deitsmall16_pretrain.pth) nor a CLIP "
        "vision model (e.g. clip_vision/clip-vit-large-patch14.safetensors)")
