"""The toy world's three networks, in architectures ComfyUI's own loaders detect and build:

* **diffusion model**: an SD3.5-family MMDiT (``comfy.supported_models.SD3``: rectified flow,
  16-channel latents, ComfyUI's SD3 shift 3). Detection ties the width to the depth (64 · depth)
  and reads the patch size, context and pooled widths from the weights; ComfyUI's MMDiT computes
  its position grid for patch 2 only, so 64-pixel pictures (8 × 8 latents) are 16 image tokens.
* **text encoder**: CLIP-L (its config is fixed by ComfyUI), frozen, with seeded random weights
  (``clip_l_state_dict``): its first ``CLIP_ACTIVE_LAYERS`` layers mix each token with the ones
  before it (damped residual branches), the others are identities (zero output projections). So
  the penultimate layer — what SD3's CLIP-L path hands the MMDiT — is each token's word and
  position vector plus some of the tokens before it ("circle" after "red" differs from "circle"
  after "blue"), and a caption encodes in a sixth of CLIP-L's time when the identity layers are
  skipped (``encode_captions``, the same numbers CLIPTextEncode computes). It is no language
  model: only the caption grammar's words mean anything here.
* **VAE**: TAESD with 16 latent channels (the TAESD3 layout), trained on the world's pictures, with
  SD3's latent scale and shift folded in as TAESD3 files are loaded (``vae_scale`` 1.5305,
  ``vae_shift`` 0.0609), so its raw latents are the MMDiT's model-space latents. Its costly
  high-resolution residual blocks are left as identities (their last convolution is zero, so the
  block is a ReLU), and training runs the equivalent network without them (``Pruned``).

``checkpoint_state_dict`` puts the three into one all-in-one file for CheckpointLoaderSimple
(``model.diffusion_model.*``, ``text_encoders.clip_l.*``, ``first_stage_model.*``).

Importing this module imports ComfyUI (``comfy``): set up ComfyUI's arguments first.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import comfy.supported_models
import comfy.taesd.taesd

LATENT_CHANNELS = 16
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609     # comfy.latent_formats.SD3
CONTEXT_WIDTH, POOLED_WIDTH = 4096, 2048  # SD3's CLIP-L path pads to these widths
CLIP_WIDTH = 768


def mmdit_config(depth: int, latent_size: int = 8) -> dict:
    """The unet_config ComfyUI's detection derives from an MMDiT of this depth (hidden 64 · depth,
    patch 2) for ``latent_size``² latents."""
    grid = latent_size // 2
    return dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2, depth=depth,
                input_size=None, adm_in_channels=POOLED_WIDTH,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": CONTEXT_WIDTH, "out_features": 64 * depth}},
                num_patches=grid * grid, pos_embed_max_size=grid, qk_norm="rms", pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[])


def build_mmdit(depth: int, seed: int, latent_size: int = 8):
    """A comfy ``model_base.SD3`` with a freshly initialised MMDiT (trainable, fp32).

    Matrices ~ N(0, 1/fan_in); the adaLN modulations and the final layer start at zero, so every
    block starts as the identity and the first prediction is 0 (DiT's adaLN-Zero). The position
    embedding (a buffer ComfyUI loads from the file, not trained) is SD3's 2-D sin-cos table."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    model = comfy.supported_models.SD3(mmdit_config(depth, latent_size)).get_model({})
    dm = model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(dm.named_parameters(), key=lambda kv: kv[0]):
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
            elif name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.fill_(1.0)
            else:
                p.zero_()
        # CLIP-L fills only the first 768 of the 4096 context and 2048 pooled features (the rest is
        # CLIP-G's and T5's share, zero here): their weights get no gradient and stay zero
        dm.context_embedder.weight[:, CLIP_WIDTH:] = 0.0
        dm.y_embedder.mlp[0].weight[:, CLIP_WIDTH:] = 0.0
        grid = latent_size // 2
        dm.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(dm.hidden_size, grid)).float()[None])
        # an identity path from the patch embedding to the output: the first 64 hidden features are
        # the token's 2 × 2 × 16 latent values, and the final layer reads them back in unpatchify's
        # order ((row, column) major, channel minor), so the untrained model predicts v ≈ x. That is
        # the answer at σ = 1 (v = ε − x0, x ≈ ε), where a transformer this small otherwise has to
        # learn to copy 64 noise values through its blocks — the part of the schedule that decides
        # a picture's layout, and the one it learned worst (toyworld/README: what was tried)
        patch, channels = 2, LATENT_CHANNELS
        for pi in range(patch):
            for qj in range(patch):
                for c in range(channels):
                    o = (pi * patch + qj) * channels + c
                    dm.x_embedder.proj.weight[o] = 0.0
                    dm.x_embedder.proj.weight[o, c, pi, qj] = 1.0
                    dm.final_layer.linear.weight[o, o] = 1.0
    return model


# ------------------------------------------------------------------------------ the text encoder
CLIP_KEYS_PREFIX = "text_encoders.clip_l.transformer."
RESIDUAL_DAMPING = 0.25       # the active layers' attention and MLP output projections, × this
CLIP_ACTIVE_LAYERS = 2        # layers 0 and 1; the other ten are identities


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def clip_l_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """CLIP-L text-encoder weights (transformers' key names, under ``text_model.``): word vectors
    N(0, 1), position vectors N(0, 0.25), matrices N(0, 1/fan_in) with the residual branches' output
    projections × RESIDUAL_DAMPING in the active layers and zero in the others, LayerNorms 1 and 0,
    biases 0. Deterministic for a seed (one generator, keys in sorted order)."""
    import comfy.sd1_clip
    with torch.device("meta"):
        shapes = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32).transformer.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in sorted(shapes):
        if key.endswith("position_ids"):
            continue
        shape = shapes[key].shape
        if key.endswith("token_embedding.weight"):
            t = torch.randn(shape, generator=g)
        elif key.endswith("position_embedding.weight"):
            t = torch.randn(shape, generator=g) * 0.5
        elif ("layer_norm" in key or "layernorm" in key) and key.endswith("weight"):
            t = torch.ones(shape)
        elif key.endswith("weight") and len(shape) == 2:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if key.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")):
                layer = _layer_of(key)
                t = t * RESIDUAL_DAMPING if layer is not None and layer < CLIP_ACTIVE_LAYERS else torch.zeros(shape)
        else:
            t = torch.zeros(shape)
        sd[key] = t
    return sd


def encode_captions(clip, captions: list[str], batch_size: int = 64) -> dict[str, list]:
    """Each caption's CONDITIONING, as ``clip.encode_from_tokens_scheduled(clip.tokenize(c))`` gives
    it for the world's CLIP (``clip``: the loaded CLIP of the world's checkpoint), computed in
    batches through the CLIP-L module's active layers only: the identity layers add exact zeros,
    so skipping them changes nothing (tests/test_toyworld.py compares with CLIPTextEncode)."""
    clip_l = clip.cond_stage_model.clip_l
    layers = clip_l.transformer.text_model.encoder.layers
    full = list(layers)
    out = {}
    try:
        layers._modules = {str(i): m for i, m in enumerate(full[:CLIP_ACTIVE_LAYERS])}
        saved = clip_l.layer_idx
        clip_l.layer_idx = CLIP_ACTIVE_LAYERS - 1
        for i in range(0, len(captions), batch_size):
            chunk = captions[i:i + batch_size]
            tokens = [[t for t, _ in clip.tokenize(c)["l"][0]] for c in chunk]
            with torch.no_grad():
                z, pooled = clip_l(tokens)[:2]
            z = torch.nn.functional.pad(z.float().cpu(), (0, CONTEXT_WIDTH - z.shape[-1]))
            pooled = torch.nn.functional.pad(pooled.float().cpu(), (0, POOLED_WIDTH - pooled.shape[-1]))
            for j, c in enumerate(chunk):
                out[c] = [[z[j:j + 1], {"pooled_output": pooled[j:j + 1]}]]
    finally:
        layers._modules = {str(i): m for i, m in enumerate(full)}
        clip_l.layer_idx = saved
    return out


# ------------------------------------------------------------------------------ the VAE
# Block indices (in TAESD's nn.Sequential) whose residual branch stays zero (the block is a ReLU):
# every block of the designed encoder, the decoder's at the pictures' full resolution.
ENCODER_IDENTITY_BLOCKS = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
DECODER_IDENTITY_BLOCKS = (18,)
RGB_CHANNELS = 12             # latent channels 0–11: the picture at 1/4 resolution, 2 × 2 per latent cell


def design_encoder_(taesd, mean, std) -> None:
    """Set TAESD's encoder to a fixed linear map: the picture averaged over 4 × 4 pixel blocks (a
    quarter-resolution RGB picture), each 2 × 2 group of blocks stacked into one latent cell's
    channels 0–11, standardised per colour (``mean``, ``std``: 3 values); channels 12–15 zero.

    Why not a learned encoder: a latent that is a small picture is smooth — nearby latents are
    nearby pictures — so a diffusion model small enough for a CPU can learn it, while a learned
    autoencoder's latents decode to blobs from the small errors such a model makes (measured:
    docs/reproduction.md). The decoder, trained, turns the quarter-resolution picture back into
    sharp shapes. In TAESD's layers: the first convolution copies RGB; the two stride-2
    convolutions average 2 × 2 neighbourhoods (taps (1,1), (1,2), (2,1), (2,2) of the 3 × 3 kernel
    with padding 1); the third stacks 2 × 2 neighbours into channels; the last standardises. All
    values stay ≥ 0 until the last layer, so the ReLUs between change nothing."""
    enc = taesd.taesd_encoder
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()
        for k in range(3):
            enc[0].weight[k, k, 1, 1] = 1.0
            for conv in (enc[2], enc[6]):
                for a in (1, 2):
                    for b in (1, 2):
                        conv.weight[k, k, a, b] = 0.25
            for a in range(2):
                for b in range(2):
                    enc[10].weight[3 * (2 * a + b) + k, k, 1 + a, 1 + b] = 1.0
        for c in range(RGB_CHANNELS):
            k = c % 3
            enc[14].weight[c, c, 1, 1] = 1.0 / float(std[k])
            enc[14].bias[c] = -float(mean[k]) / float(std[k])


def build_taesd(seed: int) -> comfy.taesd.taesd.TAESD:
    """A TAESD3-layout VAE, He-initialised, each residual block's last convolution zero (so it
    starts as ReLU), SD3's scale and shift folded in; the identity blocks all zero. The encoder is
    set afterwards (``design_encoder_``)."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(taesd.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / p[0].numel()))
            else:
                p.zero_()
        for m in taesd.modules():
            if isinstance(m, comfy.taesd.taesd.Block):
                m.conv[-1].weight.zero_()
        for seq, idle in ((taesd.taesd_encoder, ENCODER_IDENTITY_BLOCKS), (taesd.taesd_decoder, DECODER_IDENTITY_BLOCKS)):
            for i in idle:
                for p in seq[i].parameters():
                    p.zero_()
        taesd.vae_scale.fill_(SD3_SCALE)
        taesd.vae_shift.fill_(SD3_SHIFT)
    return taesd


class Pruned(nn.Module):
    """A TAESD half (encoder or decoder) without its identity blocks: each is replaced by the
    ReLU it computes (a Block whose last convolution is zero returns ReLU(x)). Shares the
    trainable layers with the TAESD, so training this trains the TAESD; the identity blocks stay
    zero because nothing updates them."""

    def __init__(self, seq: nn.Sequential, identity: tuple[int, ...]):
        super().__init__()
        for i in identity:
            if not isinstance(seq[i], comfy.taesd.taesd.Block):
                raise ValueError(f"layer {i} of the TAESD half is not a residual block")
        self.layers = nn.Sequential(*[nn.ReLU() if i in identity else m for i, m in enumerate(seq)])

    def forward(self, x):
        return self.layers(x)


def trainable_vae_parameters(taesd) -> list[nn.Parameter]:
    enc = Pruned(taesd.taesd_encoder, ENCODER_IDENTITY_BLOCKS)
    dec = Pruned(taesd.taesd_decoder, DECODER_IDENTITY_BLOCKS)
    return list(enc.parameters()) + list(dec.parameters())


# ------------------------------------------------------------------------------ the file
def checkpoint_state_dict(model, clip_sd: dict, taesd) -> dict[str, torch.Tensor]:
    """The all-in-one checkpoint CheckpointLoaderSimple reads (SD3.5 release layout)."""
    sd = {f"model.{k}": v for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}
    sd.update({CLIP_KEYS_PREFIX + k: v for k, v in clip_sd.items()})
    sd.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()})
    return sd
