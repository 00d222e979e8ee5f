"""The training objectives, each one step of work run inside ComfyUI's sampling context.

Every objective is called by ``StepSampler`` with the CFG guider as ``model`` (``model(x, σ)``
returns the CFG x0 prediction with gradients), the sampler's σ schedule (the N-step DDPM grid,
ComfyUI's ``ddim_uniform``), the raw noise and the process_latent_in'd latent. It returns the loss
(a scalar tensor with a graph) and metrics. Notation follows the papers:

* classic ReFL (ImageReward): from noise, no-grad DDPM steps down to a random stop index in the
  late window, one step with gradients predicting x0, decode, reward;
  loss = refl_weight · mean(ReLU(λ − s·(R + o))).
* ImageReFL: the real image's latent noised to the start index, no-grad DDPM steps to a random
  t_f, one gradient step to x0, decode, reward; plus the ordinary diffusion loss on the noised
  real latent; loss = loss_scale · [mse_weight · MSE − mean(s·(R + o))].
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

# reward(images (B, 3, H, W) in [0, 1], prompts) -> s·(R + o), tensor (B,)
RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


@dataclass
class StepContext:
    model: Callable                 # the guider: model(x, sigma_batch, **extra_args) -> x0 (CFG)
    sigmas: torch.Tensor            # N + 1 values, last 0
    extra_args: dict
    model_sampling: object
    decode: Callable[[torch.Tensor], torch.Tensor]   # x0 (model space) -> images in [0, 1], BCHW
    generator: torch.Generator
    frozen_weights: Callable = contextlib.nullcontext  # no-grad calls: the LoRA merged once (LoraSet.merged)


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, sp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One DDPM (posterior, η = 1) step from σ=s to σ=sp in ComfyUI's parameterisation
    (x = x0 + σ·ε): mean x0 + (sp²/s²)(x − x0), std sp·√(s² − sp²)/s; at sp = 0 it returns x0."""
    if float(sp) == 0.0:
        return x0
    mean = x0 + (sp ** 2 / s ** 2) * (x - x0)
    std = sp * torch.sqrt(s ** 2 - sp ** 2) / s
    return mean + std * noise


def _sigma(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return s.expand(x.shape[0]).to(x)


def denoise_no_grad(ctx: StepContext, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """DDPM steps from index ``start`` to ``stop`` (exclusive of the step at ``stop``), no graph."""
    with torch.no_grad(), ctx.frozen_weights():
        for i in range(start, stop):
            s, sp = ctx.sigmas[i], ctx.sigmas[i + 1]
            x0 = ctx.model(x, _sigma(x, s), **ctx.extra_args)
            noise = torch.randn(x.shape, generator=ctx.generator).to(x)
            x = ddpm_step(x, x0, s, sp, noise)
    return x


def randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def refl_loss(rewards: torch.Tensor, lam: float, weight: float) -> torch.Tensor:
    """Classic ReFL: weight · mean(ReLU(λ − r)) on the (scaled) reward."""
    return weight * torch.relu(lam - rewards).mean()


def imagerefl_loss(mse: torch.Tensor, rewards: torch.Tensor, loss_scale: float, mse_weight: float) -> torch.Tensor:
    """ImageReFL: loss_scale · [mse_weight · MSE − mean(s·(R + o))]."""
    return loss_scale * (mse_weight * mse - rewards.mean())


def eps_mse(x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ordinary ε-prediction MSE written with x0 predictions: ε̂ − ε = (x0 − x̂0)/σ."""
    sig = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return (((x0 - x0_pred) / sig) ** 2).mean()


def classic_refl_step(ctx: StepContext, noise: torch.Tensor, prompts: list[str], reward: RewardFn, cfg) -> tuple[torch.Tensor, dict]:
    ms = ctx.model_sampling
    sigma0 = float(ctx.sigmas[0])
    max_denoise = math.isclose(float(ms.sigma_max), sigma0, rel_tol=1e-5) or sigma0 > float(ms.sigma_max)
    x = ms.noise_scaling(ctx.sigmas[0], noise, torch.zeros_like(noise), max_denoise)
    stop = randint(ctx.generator, cfg.refl_stop_min, cfg.refl_stop_max)
    x = denoise_no_grad(ctx, x, 0, stop)
    x0 = ctx.model(x.detach(), _sigma(x, ctx.sigmas[stop]), **ctx.extra_args)
    r = reward(ctx.decode(x0), prompts)
    loss = refl_loss(r, cfg.refl_lambda, cfg.refl_weight)
    return loss, {"reward": r.mean().item(), "refl_loss": loss.item(), "stop": stop}


def imagerefl_step(ctx: StepContext, noise: torch.Tensor, latent: torch.Tensor, prompts: list[str], reward: RewardFn,
                   cfg, guider) -> tuple[torch.Tensor, dict]:
    ms = ctx.model_sampling
    start = cfg.imagerefl_start
    x = ms.noise_scaling(ctx.sigmas[start], noise, latent, False)
    t_f = randint(ctx.generator, cfg.imagerefl_tf_min, cfg.imagerefl_tf_max)
    x = denoise_no_grad(ctx, x, start, t_f)
    x0 = ctx.model(x.detach(), _sigma(x, ctx.sigmas[t_f]), **ctx.extra_args)
    r = reward(ctx.decode(x0), prompts)
    # diffusion loss: the conditional prediction (no CFG) on the real latent noised at a random
    # training σ, as the ordinary noise-prediction objective samples t uniformly
    t = randint(ctx.generator, 0, len(ms.sigmas) - 1)
    sig = torch.full((latent.shape[0],), float(ms.sigmas[t])).to(latent)
    eps = torch.randn(latent.shape, generator=ctx.generator).to(latent)
    cfg_before = guider.cfg
    guider.cfg = 1.0  # CFG 1 → ComfyUI evaluates only the conditional branch
    try:
        x0_pred = ctx.model(ms.noise_scaling(sig, eps, latent, False), sig, **ctx.extra_args)
    finally:
        guider.cfg = cfg_before
    mse = eps_mse(x0_pred, latent, sig)
    loss = imagerefl_loss(mse, r, cfg.loss_scale, cfg.mse_weight)
    return loss, {"reward": r.mean().item(), "mse": mse.item(), "imagerefl_loss": loss.item(), "t_f": t_f}
