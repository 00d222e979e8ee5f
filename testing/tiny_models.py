"""Tiny random-weight models built through ComfyUI's own classes, for tests, the demo and benchmarks.

Two kinds:

* **Detectable checkpoints** (``write_sd15_checkpoint``, ``write_sdxl_checkpoint``): the smallest
  UNets ComfyUI's model detection still recognises as SD1.5 / SDXL, saved as ``.safetensors`` in the
  checkpoint key layout, so they go through ``CheckpointLoaderSimple`` exactly like a user's file.
  The SD1.5 one carries a random CLIP-L text encoder (its config is fixed; ComfyUI ships the
  tokenizer) and a random TAESD as its VAE, so a normal text-to-image workflow runs on it.
* **Truly tiny models** (``tiny_model_patcher``): a small-channel UNet in a ``BaseModel`` behind a
  ``ModelPatcher``, same sampling code path, for fast bulk tests; conditioning tensors are made
  directly (``tiny_conditioning``).

Every weight is initialised from a seeded generator (ComfyUI's ops leave weights uninitialised),
with a small output layer so sampling trajectories stay finite.

Importing this module imports ComfyUI (``comfy``): set up ComfyUI's arguments first.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.supported_models_base

# The smallest UNet configs that ComfyUI's detector (comfy.model_detection) still maps to SD1.5/SDXL.
SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_spatial_transformer=True, legacy=False, num_heads=8, num_head_channels=-1,
)
SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 0, 0, 0, 0, 0, 0],
    transformer_depth_middle=-1, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    use_temporal_attention=False, use_spatial_transformer=True, legacy=False, num_heads=-1, num_head_channels=64,
    num_classes="sequential",
)
# A truly tiny UNet (~0.5M parameters) for the bulk of the tests.
TINY_UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=32,
    use_linear_in_transformer=True, adm_in_channels=None, use_temporal_attention=False,
    use_spatial_transformer=True, legacy=False, num_heads=2, num_head_channels=-1,
)
TINY_CONTEXT_DIM = 32


class TinySD(comfy.supported_models_base.BASE):
    """A model config of the SD1.5 family (eps prediction, SD1.5 latent format) with a tiny UNet."""
    unet_config = {}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.SD15
    memory_usage_factor = 1.0


class TinySDUnitScale(TinySD):
    """Same, with a latent format whose scale factor is 1 (so chains of samplers compare exactly)."""

    class latent_format(comfy.latent_formats.SD15):  # noqa: N801 (comfy instantiates the class)
        def __init__(self):
            super().__init__(scale_factor=1.0)


def init_weights_(module: torch.nn.Module, seed: int, out_scale: float = 0.1) -> None:
    """Deterministic init of every parameter (ComfyUI's ops leave them empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 1.0 / math.sqrt(max(fan_in, 1))
                if name.startswith(("out.", "diffusion_model.out.")):
                    std *= out_scale
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("weight"):  # 1-d non-norm weights (e.g. scales)
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def build_unet_model(model_config_cls, unet_config: dict, seed: int):
    """A comfy ``BaseModel`` with the given UNet config, every weight initialised."""
    cfg = model_config_cls(unet_config)
    model = cfg.get_model({})
    init_weights_(model.diffusion_model, seed)
    return model


def tiny_model_patcher(seed: int = 0, unit_scale: bool = False, unet_config: dict | None = None):
    """A ComfyUI MODEL (ModelPatcher) with a ~0.5M-parameter UNet, on ComfyUI's current device."""
    model = build_unet_model(TinySDUnitScale if unit_scale else TinySD, dict(unet_config or TINY_UNET), seed)
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def tiny_conditioning(seed: int, batch: int = 1, tokens: int = 8, dim: int = TINY_CONTEXT_DIM, pooled: int | None = None):
    """A CONDITIONING list as CLIPTextEncode makes it, with a random embedding."""
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if pooled:
        extra["pooled_output"] = torch.randn(batch, pooled, generator=g)
    return [[torch.randn(batch, tokens, dim, generator=g), extra]]


def lora_state_dict(model, seed: int, rank: int = 4, scale: float = 0.5, targets=("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")) -> dict:
    """A random LoRA for ``model`` (a BaseModel) in ComfyUI's key layout (``diffusion_model.<module>.lora_up.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in sorted(model.diffusion_model.named_modules(), key=lambda kv: kv[0]):
        if not name.endswith(tuple(targets)) or not hasattr(module, "weight") or module.weight is None:
            continue
        w = module.weight
        if w.ndim != 2:
            continue
        out_f, in_f = w.shape
        key = f"diffusion_model.{name}"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale / math.sqrt(rank)
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    if not sd:
        raise RuntimeError("no LoRA target modules found in the model")
    return sd


def _clip_l_state_dict(seed: int) -> dict:
    import comfy.sd1_clip
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    init_weights_(clip, seed)
    sd = {}
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        sd[f"cond_stage_model.{k}"] = v
    # a sane embedding scale keeps the random encoder's activations finite
    return sd


def _taesd_state_dict(seed: int) -> dict:
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_weights_(taesd, seed, out_scale=1.0)
    sd = {}
    for k, v in taesd.state_dict().items():
        if k in ("vae_scale", "vae_shift"):
            continue
        sd[f"first_stage_model.{k}"] = v
    return sd


def _unet_checkpoint_sd(model_config_cls, unet_config, seed):
    model = build_unet_model(model_config_cls, unet_config, seed)
    return {f"model.{k}": v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}, model


def _atomic_save(sd: dict, path: str, dtype=torch.float16):
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)


@dataclass
class WrittenModel:
    path: str
    parameters: int


def write_sd15_checkpoint(path: str, seed: int = 0, with_clip: bool = True, with_vae: bool = True) -> WrittenModel:
    """A detectable SD1.5-architecture checkpoint (25.8M-parameter UNet [+ random CLIP-L, TAESD VAE])."""
    sd, _ = _unet_checkpoint_sd(comfy.supported_models.SD15, SD15_UNET, seed)
    if with_clip:
        sd.update(_clip_l_state_dict(seed + 1))
    if with_vae:
        sd.update(_taesd_state_dict(seed + 2))
    _atomic_save(sd, path)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))


def write_sdxl_checkpoint(path: str, seed: int = 0, with_vae: bool = True) -> WrittenModel:
    """A detectable SDXL-architecture checkpoint (UNet only + TAESD VAE; no text encoders: CLIP-G is 695M)."""
    sd, _ = _unet_checkpoint_sd(comfy.supported_models.SDXL, SDXL_UNET, seed)
    if with_vae:
        sd.update(_taesd_state_dict(seed + 2))
    _atomic_save(sd, path)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))


def write_sd15_lora(path: str, seed: int = 0, rank: int = 4, scale: float = 0.5) -> WrittenModel:
    """A random LoRA for the detectable SD1.5 UNet, loadable by LoraLoader / LoraLoaderModelOnly."""
    model = build_unet_model(comfy.supported_models.SD15, SD15_UNET, 0)
    sd = lora_state_dict(model, seed, rank=rank, scale=scale)
    _atomic_save(sd, path, dtype=torch.float32)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))
