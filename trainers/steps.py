"""The sampling pieces every objective shares, in one place: the context a training step runs in,
and the step functions of the model's sampling type.

ComfyUI gives every model the same σ-space view (``model_sampling``): ``noise_scaling`` puts a
latent at noise level σ, the guider returns an x0 prediction. What depends on how the model was
trained is kept in one object of step functions, chosen from the model's ``model_sampling`` by
``sampling_steps``:

* ``initial_noise``: the start of a trajectory from pure noise, as ComfyUI's samplers start;
* ``noised``: a real latent put at noise level σ;
* ``posterior`` / ``step``: one stochastic step from σ to σ' given the x0 prediction.

``DDPM`` (x = x0 + σ·ε, the DDPM posterior step, DDIM η = 1) is the only implementation today and
serves every model; a flow-matching model (``model_sampling`` CONST, x = (1 − σ)·x0 + σ·ε) needs
its own posterior and is the place to add one.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch


def sigma_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One noise level for every sample of ``x``: the (B,) σ a model call takes."""
    return sigma.expand(x.shape[0]).to(x)


@contextlib.contextmanager
def cfg_scale(guider, scale: float):
    """The guider's CFG scale set to ``scale`` for the block, restored on exit. At 1.0 ComfyUI
    evaluates only the conditional branch."""
    before = guider.cfg
    guider.cfg = scale
    try:
        yield
    finally:
        guider.cfg = before


def randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


class DDPM:
    """ε- and v-prediction models on a discrete schedule (SD1.5, SDXL): x = x0 + σ·ε in ComfyUI's
    parameterisation; one step is the DDPM posterior (DDIM with η = 1)."""

    @staticmethod
    def initial_noise(model_sampling, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x at ``sigmas[0]`` from pure noise, scaled as ComfyUI's samplers scale it (√(1 + σ²)
        when the schedule starts at the model's σ_max)."""
        sigma0, sigma_max = float(sigmas[0]), float(model_sampling.sigma_max)
        max_denoise = math.isclose(sigma_max, sigma0, rel_tol=1e-5) or sigma0 > sigma_max
        return model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)

    @staticmethod
    def noised(model_sampling, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """A real latent at noise level ``sigma``."""
        return model_sampling.noise_scaling(sigma, noise, latent, False)

    @staticmethod
    def posterior(x: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, sp: torch.Tensor):
        """Mean and std of the step from σ = s to σ = sp (scalars, or per sample (B,1,1,1)):
        mean = x0 + (sp²/s²)(x − x0), std = sp·√(s² − sp²)/s; at sp = 0 mean = x0, std = 0."""
        s, sp = s.to(x), sp.to(x)
        mean = x0 + (sp ** 2 / s ** 2) * (x - x0)
        std = sp * torch.sqrt((s ** 2 - sp ** 2).clamp_min(0)) / s
        return mean, std

    @classmethod
    def step(cls, x: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, sp: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """One stochastic step from σ = s to σ = sp: mean + std·noise."""
        mean, std = cls.posterior(x, x0, s, sp)
        return mean + std * noise


def sampling_steps(model_sampling) -> type[DDPM]:
    """The step functions for a model's sampling type (today: ``DDPM`` for every model)."""
    return DDPM


# the DDPM functions by their papers' names, for the tests and benchmarks
posterior = DDPM.posterior
ddpm_step = DDPM.step


@dataclass
class StepContext:
    """What a training step gets from ComfyUI's sampling context (see ``engine.StepSampler``)."""
    model: Callable                 # the CFG guider: model(x, sigma_batch, **extra_args) -> x0; model.cfg its scale
    sigmas: torch.Tensor            # the N-step schedule, N + 1 values, last 0
    extra_args: dict
    decode: Callable[[torch.Tensor], torch.Tensor]   # x0 (model space) -> images in [0, 1], BCHW
    generator: torch.Generator
    frozen_weights: Callable = contextlib.nullcontext  # no-grad calls: the LoRA merged once (LoraSet.merged)
    reference: Callable = contextlib.nullcontext       # the frozen reference: the LoRA off (LoraSet.disabled)
    consistency: object = None      # SQDF: the frozen consistency model for x̂0 (sqdf.ConsistencyModel)

    @property
    def model_sampling(self):
        return self.model.inner_model.model_sampling

    @property
    def steps(self) -> type[DDPM]:
        return sampling_steps(self.model_sampling)


@dataclass
class Batch:
    """One micro-batch. The engine draws the prompts and the real latents or replay pairs; inside
    the sampling context the step gets it with the sampler's noise and process_latent_in'd latents."""
    prompts: list[str]
    noise: torch.Tensor | None = None    # the sampler's noise, the shape of the batch's latents
    latents: torch.Tensor | None = None  # ImageReFL: the real images' latents (process_latent_in'd)
    pairs: list | None = None            # SQDF: the sampled (trajectory, schedule index) pairs


def denoise_no_grad(ctx: StepContext, x: torch.Tensor, start: int, stop: int,
                    visit: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Stochastic steps from schedule index ``start`` to ``stop`` with the current policy, no graph
    (``visit(x)`` sees every new x)."""
    with torch.no_grad(), ctx.frozen_weights():
        for i in range(start, stop):
            s, sp = ctx.sigmas[i], ctx.sigmas[i + 1]
            x0 = ctx.model(x, sigma_batch(x, s), **ctx.extra_args)
            noise = torch.randn(x.shape, generator=ctx.generator).to(x)
            x = ctx.steps.step(x, x0, s, sp, noise)
            if visit is not None:
                visit(x)
    return x
