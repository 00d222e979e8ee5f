"""The training objectives: one signature, ``step(ctx, batch, reward, config) -> (loss, metrics)``,
run by the engine inside ComfyUI's sampling context (``steps.StepContext``: the CFG guider as
``ctx.model``, whose ``model(x, σ)`` returns the CFG x0 prediction with gradients, and the
sampler's σ schedule, the N-step DDPM grid of ComfyUI's ``ddim_uniform``; ``steps.Batch``: the
prompts, the sampler's noise, the real latents). The loss is a scalar tensor with a graph.
Notation follows the papers:

* classic ReFL (ImageReward): from noise, no-grad DDPM steps down to a random stop index in the
  late window, one step with gradients predicting x0, decode, reward;
  loss = refl_weight · mean(ReLU(λ − s·(R + o))).
* ImageReFL: the real image's latent noised to the start index, no-grad DDPM steps to a random
  t_f, one gradient step to x0, decode, reward; plus the ordinary diffusion loss on the noised
  real latent; loss = loss_scale · [mse_weight · MSE − mean(s·(R + o))].
* SQDF: ``sqdf.update`` (and ``sqdf.collect``, which fills its replay buffer).
"""
from __future__ import annotations

from typing import Callable

import torch

from .steps import Batch, StepContext, cfg_scale, ddpm_step, denoise_no_grad, randint, sigma_batch

__all__ = ["classic_refl_step", "imagerefl_step", "refl_loss", "imagerefl_loss", "eps_mse",
           "ddpm_step"]  # ddpm_step: from steps.py, here too for benchmarks/bench_train.py

# reward(images (B, 3, H, W) in [0, 1], prompts) -> s·(R + o), tensor (B,)
RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


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


def _reward_at(ctx: StepContext, x: torch.Tensor, index: int, prompts: list[str], reward: RewardFn) -> torch.Tensor:
    """The one step with gradients: x0 predicted from x (detached) at schedule index ``index``,
    decoded, rewarded."""
    x0 = ctx.model(x.detach(), sigma_batch(x, ctx.sigmas[index]), **ctx.extra_args)
    return reward(ctx.decode(x0), prompts)


def classic_refl_step(ctx: StepContext, batch: Batch, reward: RewardFn, config) -> tuple[torch.Tensor, dict]:
    x = ctx.steps.initial_noise(ctx.model_sampling, ctx.sigmas, batch.noise)
    stop = randint(ctx.generator, config.refl_stop_min, config.refl_stop_max)
    r = _reward_at(ctx, denoise_no_grad(ctx, x, 0, stop), stop, batch.prompts, reward)
    loss = refl_loss(r, config.refl_lambda, config.refl_weight)
    return loss, {"reward": r.mean().item(), "refl_loss": loss.item(), "stop": stop}


def imagerefl_step(ctx: StepContext, batch: Batch, reward: RewardFn, config) -> tuple[torch.Tensor, dict]:
    ms, latent, start = ctx.model_sampling, batch.latents, config.imagerefl_start
    x = ctx.steps.noised(ms, ctx.sigmas[start], batch.noise, latent)
    t_f = randint(ctx.generator, config.imagerefl_tf_min, config.imagerefl_tf_max)
    r = _reward_at(ctx, denoise_no_grad(ctx, x, start, t_f), t_f, batch.prompts, reward)
    # diffusion loss: the conditional prediction (no CFG) on the real latent noised at a random
    # training σ, as the ordinary noise-prediction objective samples t uniformly
    t = randint(ctx.generator, 0, len(ms.sigmas) - 1)
    sig = torch.full((latent.shape[0],), float(ms.sigmas[t])).to(latent)
    eps = torch.randn(latent.shape, generator=ctx.generator).to(latent)
    with cfg_scale(ctx.model, 1.0):
        x0_pred = ctx.model(ctx.steps.noised(ms, sig, eps, latent), sig, **ctx.extra_args)
    mse = eps_mse(x0_pred, latent, sig)
    loss = imagerefl_loss(mse, r, config.loss_scale, config.mse_weight)
    return loss, {"reward": r.mean().item(), "mse": mse.item(), "imagerefl_loss": loss.item(), "t_f": t_f}
