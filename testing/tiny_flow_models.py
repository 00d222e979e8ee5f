"""Tiny random-weight flow-matching transformers (Flux, SD3.5, Z-Image / Lumina 2), built through ComfyUI's own classes.

ComfyUI detects a diffusion model's family from the key names and tensor shapes of its state dict
(``comfy/model_detection.py``), then picks the first config in ``comfy/supported_models.py`` that
matches. The smallest configs it still detects:

* **Flux** (``comfy.supported_models.Flux`` / ``FluxSchnell``): the head size is fixed at 128 by
  ``axes_dim`` [16, 56, 56], so ``hidden_size`` 128 with one head; one double and one single block;
  ``context_in_dim`` and ``vec_in_dim`` are read from the weights (32 here); ``guidance_in`` present
  makes it Flux dev (guidance-embedded, ``ModelSamplingFlux``), absent Flux schnell (plain flow,
  shift 1). ~1.0M / ~0.98M parameters.
* **SD3 / SD3.5** (MMDiT, ``comfy.supported_models.SD3``): ``hidden_size`` = 64 · depth, so depth 2
  (hidden 128, two heads of 64); SD3.5's RMS q/k norm; pooled (``y_embedder``) and context widths
  read from the weights (32 here). ~1.1M parameters.
* **Z-Image / Lumina 2** (``comfy.supported_models.ZImage`` / ``Lumina2``, one model class,
  ``NextDiT``): detection fixes the width (3840 for Z-Image, 2304 for Lumina 2) and ComfyUI always
  builds two noise-refiner and two context-refiner blocks, so even with zero main layers the
  smallest detectable files are 718M (Z-Image) and 337M (Lumina 2) parameters: minutes per test run
  on a CPU. The tests check that those shapes are detected (``detectable_shapes``, meta tensors, no
  memory) and run combined generation on a truly tiny model built from the same ``ZImage`` config
  class with a small width (``tiny_zimage_patcher``): same model class, sampling object, latent
  format and LoRA key map; only the loader's detection is skipped.

Text encoders of these families are large (T5-XXL 4.7B, Qwen3-4B, CLIP-G 695M): conditioning is
made directly as tensors of the shapes the encoders produce (``flow_conditioning``).

Files are written in the layout of the families' released diffusion-model files (what
``UNETLoader`` reads from ``models/diffusion_models``): no prefix, Flux's q/k norms as ``.scale``.
LoRAs are written in the diffusers/PEFT layout most trainers produce
(``transformer.<diffusers module>.lora_A.weight``), which ComfyUI maps onto (slices of) its fused
weights.

Importing this module imports ComfyUI (``comfy``): set up ComfyUI's arguments first.
"""
from __future__ import annotations

import math
import os

import torch

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from .tiny_models import WrittenModel, _atomic_save, init_weights_

FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, hidden_size=128, num_heads=1, depth=1,
    depth_single_blocks=1, context_in_dim=32, vec_in_dim=32, mlp_ratio=4.0, axes_dim=[16, 56, 56], theta=10000,
    qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
)
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embed": False}
SD35 = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
    num_patches=64, pos_embed_max_size=8, qk_norm="rms", pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
# The smallest Z-Image / Lumina 2 that detection still maps to those families (see module notes).
ZIMAGE_DETECTABLE = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=32, n_layers=0, qk_norm=True,
    n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
)
LUMINA2_DETECTABLE = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=32, n_layers=0, qk_norm=True,
    n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
    ffn_dim_multiplier=4.0,
)
# Z-Image's block structure (z_image_modulation, time scale 1000, 2+2 refiners, one main layer, head size
# 128 with its rope axes) at width 256, two heads: z_image_modulation needs a width of at least 256.
ZIMAGE_TINY = {**ZIMAGE_DETECTABLE, "dim": 256, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2,
               "ffn_dim_multiplier": 1.0, "multiple_of": 32}

FAMILIES = {
    "flux_dev": (comfy.supported_models.Flux, FLUX_DEV),
    "flux_schnell": (comfy.supported_models.FluxSchnell, FLUX_SCHNELL),
    "sd35": (comfy.supported_models.SD3, SD35),
    "zimage": (comfy.supported_models.ZImage, ZIMAGE_TINY),
}


def init_flow_weights_(module: torch.nn.Module, seed: int, out_scale: float = 0.1) -> None:
    """Deterministic init of every parameter and floating buffer (ComfyUI's ops leave them empty).

    Matrices ~ N(0, 1/fan_in), the output layer ``out_scale`` times smaller so trajectories stay
    finite; norm scales 1; biases, embeddings and pad tokens small.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items(), key=lambda kv: kv[0]):
            if not t.is_floating_point():
                continue
            if name.endswith((".scale", "norm.weight")) or "_norm" in name and name.endswith(".weight"):
                t.fill_(1.0)
            elif t.ndim >= 2 and name.endswith("weight"):
                std = 1.0 / math.sqrt(max(t[0].numel(), 1))
                if name.startswith("final_layer.linear"):
                    std *= out_scale
                t.copy_(torch.randn(t.shape, generator=g) * std)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def build_flow_model(family: str, seed: int = 0):
    """A comfy ``BaseModel`` of the family (see ``FAMILIES``), every weight initialised."""
    config_cls, unet_config = FAMILIES[family]
    model = config_cls(dict(unet_config)).get_model({})
    init_flow_weights_(model.diffusion_model, seed)
    return model


def released_layout(family: str, diffusion_sd: dict) -> dict:
    """The diffusion model's state dict as the family's released files name it (what UNETLoader reads)."""
    if family.startswith("flux"):  # BFL files name the q/k RMSNorm weights ``.scale``
        return {(k[:-len(".weight")] + ".scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
                for k, v in diffusion_sd.items()}
    return dict(diffusion_sd)


def write_flow_unet(path: str, family: str, seed: int = 0) -> WrittenModel:
    """A detectable diffusion-model file (for ``models/diffusion_models``) of a tiny random model of the family."""
    model = build_flow_model(family, seed)
    sd = released_layout(family, model.diffusion_model.state_dict())
    _atomic_save(sd, path, dtype=torch.float32)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))


def tiny_zimage_patcher(seed: int = 0):
    """A ComfyUI MODEL of the Z-Image config class with a 128-wide NextDiT (not detectable at this size)."""
    model = build_flow_model("zimage", seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_flow_vae(seed: int = 0, latent_channels: int = 16):
    """A ComfyUI VAE for the 16-channel latents of these families: a random-weight TAESD with 16 latent
    channels (the TAEF1 / TAESD3 layout), built by ``comfy.sd.VAE`` from its state dict."""
    import comfy.sd
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_weights_(taesd, seed, out_scale=1.0)
    sd = {k: v for k, v in taesd.state_dict().items() if k not in ("vae_scale", "vae_shift")}
    return comfy.sd.VAE(sd=sd)


def detectable_shapes(config_cls, unet_config: dict) -> dict:
    """The state dict (meta tensors: shapes only, no memory) of a model built from ``unet_config``."""
    with torch.device("meta"):
        model = config_cls(dict(unet_config)).get_model({}, device="meta")
    return released_layout("", model.diffusion_model.state_dict())


def detect(state_dict: dict):
    """The model config ComfyUI's own detection picks for a diffusion-model state dict (no prefix)."""
    return comfy.model_detection.model_config_from_unet(state_dict, "")


def flow_conditioning(model, seed: int, batch: int = 1, tokens: int = 8, guidance: float | None = None):
    """A CONDITIONING with random text-encoder output shaped for ``model``'s family (a BaseModel or MODEL).

    Flux: T5 tokens (B, T, context_in_dim) + CLIP-L pooled (B, vec_in_dim), and ``guidance`` for
    Flux dev (as the FluxGuidance node sets it); SD3.5: CLIP-L/G+T5 tokens (B, T, context width) +
    pooled (B, adm_in_channels); Z-Image / Lumina 2: LLM hidden states (B, T, cap_feat_dim).
    """
    model = getattr(model, "model", model)
    cfg = model.model_config.unet_config
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if "context_in_dim" in cfg:  # Flux
        ctx, pooled = cfg["context_in_dim"], cfg.get("vec_in_dim")
    elif "context_embedder_config" in cfg:  # MMDiT
        ctx, pooled = cfg["context_embedder_config"]["params"]["in_features"], cfg.get("adm_in_channels")
    else:  # NextDiT
        ctx, pooled = cfg["cap_feat_dim"], None
    tokens_t = torch.randn(batch, tokens, ctx, generator=g)
    if pooled:
        extra["pooled_output"] = torch.randn(batch, pooled, generator=g)
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[tokens_t, extra]]


def diffusers_lora_state_dict(model, seed: int, rank: int = 4, scale: float = 0.5) -> dict:
    """A random LoRA in the diffusers/PEFT layout (``transformer.<module>.lora_A/B.weight`` + ``.alpha``).

    The module names are the ones ComfyUI's own LoRA key map accepts under ``transformer.`` for the
    model's family (``comfy.lora.model_lora_keys_unet``): diffusers' split ``to_q``/``to_k``/``to_v``
    land on slices of ComfyUI's fused qkv weights. Only the transformer blocks' linear layers.
    """
    model = getattr(model, "model", model)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    weights = model.state_dict()
    blocks = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.", "transformer.layers.",
              "transformer.noise_refiner.", "transformer.context_refiner.")
    targets = {}
    for lora_key in sorted(k for k in key_map if k.startswith(blocks)):
        target = key_map[lora_key]
        # a slice of a fused weight is (name, (dim, offset, length)[, function])
        name, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        w = weights.get(name)
        if w is not None and w.ndim == 2:
            targets.setdefault((name, offset), lora_key)
    sliced = {name for name, offset in targets if offset is not None}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for (name, offset), lora_key in sorted(targets.items(), key=lambda kv: kv[1]):
        if offset is None and name in sliced:  # diffusers trainers target the split q/k/v/mlp, not the fused whole
            continue
        w = weights[name]
        out_f = offset[2] if offset is not None else w.shape[0]
        in_f = w.shape[1]
        sd[f"{lora_key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{lora_key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * scale / math.sqrt(rank)
        sd[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    if not sd:
        raise RuntimeError(f"no transformer-block LoRA keys for {type(model).__name__}")
    return sd


def write_flow_lora(path: str, model, seed: int = 0, rank: int = 4, scale: float = 0.5) -> WrittenModel:
    sd = diffusers_lora_state_dict(model, seed, rank=rank, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_save(sd, path, dtype=torch.float32)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))


# SD3.5 as an all-in-one checkpoint, the file ``CheckpointLoaderSimple`` reads (as the
# ``sd3.5_large_fp8_scaled`` release is): the MMDiT under ``model.diffusion_model.``, a random
# CLIP-L under ``text_encoders.clip_l.`` and a 16-channel TAESD under ``first_stage_model.``.
# ComfyUI builds SD3's text encoder from the encoders a checkpoint holds: with CLIP-L alone it pads
# the tokens to 4096 and the pooled output to 2048 (CLIP-G's share zero), so the MMDiT takes those
# widths and the Combined KSampler, the sweep and every template run on the real text path.
SD35_CHECKPOINT = {**SD35, "adm_in_channels": 2048,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": 4096, "out_features": 128}}}


def write_sd35_checkpoint(path: str, seed: int = 0, lora_path: str | None = None) -> WrittenModel:
    """A detectable SD3.5 checkpoint (1.7M-parameter MMDiT + random CLIP-L + TAESD); with
    ``lora_path`` also a random LoRA for it in the diffusers layout."""
    import comfy.taesd.taesd
    from .tiny_models import _clip_l_state_dict, init_weights_
    model = comfy.supported_models.SD3(dict(SD35_CHECKPOINT)).get_model({})
    init_flow_weights_(model.diffusion_model, seed)
    sd = {f"model.{k}": v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    for k, v in _clip_l_state_dict(seed + 1).items():
        sd["text_encoders.clip_l." + k[len("cond_stage_model."):]] = v
    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    init_weights_(taesd, seed + 2, out_scale=1.0)
    sd.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items() if k not in ("vae_scale", "vae_shift")})
    _atomic_save(sd, path)
    if lora_path:
        write_flow_lora(lora_path, model, seed=seed + 3)
    return WrittenModel(path, sum(v.numel() for v in sd.values()))
