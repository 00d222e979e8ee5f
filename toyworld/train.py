"""Training the toy world's networks from nothing, on the CPU: the VAE, the diffusion model, the
learned reward. Each stage is one plain loop; ``build.py`` runs them in order with the recipe's
settings and writes the files.

Every random number comes from generators seeded by the recipe, so a stage run twice on the same
machine gives the same weights; threads are fixed by the caller (``torch.set_num_threads``).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import models as M
from . import scenes as S

Log = Callable[[str], None]


def _cosine(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _to_bchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ the VAE
def vae_loss(x: torch.Tensor, y: torch.Tensor, fg_weight: float, edge_weight: float) -> torch.Tensor:
    """Reconstruction loss that does not let the background win: L1 + L2 with the pixels that differ
    from the picture's background (its border's median) weighted 1 + ``fg_weight``, plus an L1 on
    the horizontal and vertical differences (the edges that make a square a square)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    bg = border.median(-1).values[..., None, None]
    w = 1.0 + fg_weight * ((x - bg).abs().sum(1, keepdim=True) > 0.15).float()
    err = y - x
    loss = ((err.abs() + err ** 2) * w).mean() / w.mean()
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return loss + edge_weight * ((dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean())


def train_vae(recipe: dict, seed: int, log: Log = print):
    """The world's TAESD: the designed encoder (``models.design_encoder_``, standardised on the
    world's pictures), and the decoder trained to turn its quarter-resolution latents back into
    the pictures, on fresh pictures each step: crops of ``crop`` pixels for the first
    ``crop_fraction`` of the steps (a quarter of the work per picture), whole pictures after. The
    decoder learns on noised latents (``latent_noise``), so the near misses a diffusion model
    makes decode to clean shapes too."""
    r = recipe
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    taesd = M.build_taesd(seed)
    sample = _to_bchw(S.render_batch([S.sample_scene(rng) for _ in range(2000)]))
    pooled = F.avg_pool2d(sample, 4)
    M.design_encoder_(taesd, pooled.mean(dim=(0, 2, 3)), pooled.std(dim=(0, 2, 3)))
    enc = M.Pruned(taesd.taesd_encoder, M.ENCODER_IDENTITY_BLOCKS).to(memory_format=torch.channels_last)
    dec = M.Pruned(taesd.taesd_decoder, M.DECODER_IDENTITY_BLOCKS).to(memory_format=torch.channels_last)
    taesd.taesd_encoder.requires_grad_(False)
    params = list(dec.parameters())
    opt = torch.optim.Adam(params, lr=r["lr"], betas=(0.9, 0.99))
    t0, total = time.perf_counter(), r["steps"]
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = r["lr"] * _cosine(step, total, 50)
        crop = r["crop"] if step < r["crop_fraction"] * total else S.SIZE
        batch = r["crop_batch"] if crop < S.SIZE else r["batch"]
        x = _to_bchw(S.render_batch([S.sample_scene(rng) for _ in range(batch)]))
        if crop < S.SIZE:
            offsets = rng.integers(0, (S.SIZE - crop) // 8 + 1, size=(batch, 2)) * 8
            x = torch.stack([x[b, :, i:i + crop, j:j + crop] for b, (i, j) in enumerate(offsets)])
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            z = enc(x)
            z = z + r["latent_noise"] * torch.randn(z.shape, generator=gen).to(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dec(z)
        loss = vae_loss(x, y.float(), r["fg_weight"], r["edge_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == total:
            log(f"VAE decoder step {step + 1}/{total}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    taesd.requires_grad_(False).eval()
    return taesd


@torch.no_grad()
def encode_images(taesd, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Model-space latents (B, 16, H/8, W/8) of pictures (B, H, W, 3) in [0, 1], through the
    trained encoder without its identity blocks (the same numbers as ``taesd.taesd_encoder``)."""
    enc = M.Pruned(taesd.taesd_encoder, M.ENCODER_IDENTITY_BLOCKS)
    return torch.cat([enc(_to_bchw(images[i:i + batch])).float() for i in range(0, len(images), batch)]).contiguous()


@torch.no_grad()
def decode_latents(taesd, latents: torch.Tensor, batch: int = 128) -> np.ndarray:
    """Pictures (B, H, W, 3) in [0, 1] from model-space latents."""
    dec = M.Pruned(taesd.taesd_decoder, M.DECODER_IDENTITY_BLOCKS)
    out = [dec(latents[i:i + batch].contiguous(memory_format=torch.channels_last)).float().clamp(0, 1)
           for i in range(0, len(latents), batch)]
    return torch.cat(out).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------ the diffusion model
class _FirstColumns(torch.nn.Module):
    """A Linear applied to the first ``width`` input features only. CLIP-L fills 768 of the MMDiT's
    4096 context (and 2048 pooled) features; the rest are zero in every caption, and so are their
    weights: skipping them gives the same product (up to summation order) at a fraction of the
    cost — the context embedder was a third of a training step. Training only; the file keeps
    the full-width weights ComfyUI expects."""

    def __init__(self, linear: torch.nn.Linear, width: int):
        super().__init__()
        self.linear, self.width = linear, width

    def forward(self, x):
        return F.linear(x[..., :self.width], self.linear.weight[:, :self.width], self.linear.bias)


def train_diffusion(dm, latents: torch.Tensor, caption_index: torch.Tensor, context: torch.Tensor,
                    pooled: torch.Tensor, empty: int, recipe: dict, seed: int, log: Log = print):
    """Rectified flow, as SD3 was trained and as ComfyUI samples it: x_σ = (1 − σ)·x0 + σ·ε, the
    model predicts v = ε − x0 at timestep 1000·σ, σ drawn as SD3's shifted uniform
    (σ = s·t / (1 + (s − 1)·t), s = ComfyUI's shift 3 for SD3). Captions are dropped to the empty
    caption ``cond_drop`` of the time (classifier-free guidance).

    ``context`` / ``pooled``: the CLIP-L features of each caption (C, 77, 768) / (C, 768), padded to
    SD3's widths here; ``caption_index``: each latent's caption."""
    r = recipe
    dm.requires_grad_(True).train()
    full_width = dm.context_embedder
    dm.context_embedder = _FirstColumns(full_width, context.shape[-1])
    # ComfyUI keeps the position embedding as a buffer (SD3 ships it fixed); here it is learned —
    # the fixed sin-cos table over a 4 × 4 grid hardly tells the 16 image tokens apart — and
    # saved as the buffer the loader reads
    pos = torch.nn.Parameter(dm._buffers.pop("pos_embed"))
    dm.register_parameter("pos_embed", pos)
    # the padded columns' weights are zero and get no gradient: AdamW's decay keeps them zero
    opt = torch.optim.AdamW(dm.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    shift, total, n = r["shift"], r["steps"], len(latents)
    t0, running = time.perf_counter(), []
    # an exponential moving average of the weights is what gets saved (as DiT and SD did): an
    # under-trained small model's last iterate samples much worse than its average
    decay = r.get("ema", 0.0)
    ema = [p.detach().clone() for p in dm.parameters()] if decay else None
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = r["lr"] * _cosine(step, total, 100)
        idx = torch.randint(0, n, (r["batch"],), generator=gen)
        x0 = latents[idx]
        cap = caption_index[idx].clone()
        cap[torch.rand(r["batch"], generator=gen) < r["cond_drop"]] = empty
        ctx = context[cap]
        y = F.pad(pooled[cap], (0, M.POOLED_WIDTH - pooled.shape[-1]))
        t = torch.rand(r["batch"], generator=gen)
        sigma = shift * t / (1 + (shift - 1) * t)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = dm((1 - s) * x0 + s * eps, sigma * 1000, context=ctx, y=y)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                d = min(decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in dm.parameters()], 1 - d)
        running.append(loss.item())
        if (step + 1) % 500 == 0 or step + 1 == total:
            log(f"diffusion step {step + 1}/{total}: loss {np.mean(running[-500:]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(dm.parameters(), ema):
                p.copy_(e)
    dm.context_embedder = full_width
    del dm._parameters["pos_embed"]
    dm.register_buffer("pos_embed", pos.detach())
    dm.requires_grad_(False).eval()
    return dm
