"""The sampling pieces every objective shares, in one place: the context a training step runs in,
and the step functions of the model's sampling type.

ComfyUI gives every model the same σ-space view (``model_sampling``): ``noise_scaling`` puts a
latent at noise level σ, the guider returns an x0 prediction. What depends on how the model was
trained is kept in one object of step functions, chosen from the model's ``model_sampling`` by
``sampling_steps``:

* ``initial_noise``: the start of a trajectory from pure noise, as ComfyUI's samplers start;
* ``noised``: a real latent put at noise level σ;
* ``posterior`` / ``step``: one stochastic step from σ to σ' given the x0 prediction.

Two implementations, both ComfyUI's own ancestral Euler step at η = 1 written as a Gaussian
(mean, std) so that SQDF can use it as its policy and the ReFL objectives as their sampler:

* ``DDPM`` — ε/v-prediction models (``model_sampling`` EPS, V_PREDICTION: x = x0 + σ·ε, SD1.5,
  SDXL): the DDPM posterior (DDIM η = 1), which is ``k_diffusion.sampling.sample_euler_ancestral``'s
  step (σ_down = σ'²/σ, σ_up = σ'·√(σ² − σ'²)/σ);
* ``RectifiedFlow`` — flow-matching models (``model_sampling`` CONST: x = (1 − σ)·x0 + σ·ε, Flux,
  SD3.5, Z-Image / Lumina 2, Chroma, Qwen-Image): ``sample_euler_ancestral_RF``'s step, the step
  ComfyUI itself takes with ``euler_ancestral`` on these models.

``sampling_steps`` picks one by the class of ``model_sampling`` (no model-family names);
tests/test_flow_training.py checks both against ComfyUI's sampler, called for real, to 1e-6.
"""
from __future__ import annotations

import contextlib
import math
import threading
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


_training = {"runs": 0, "before": False}
_training_lock = threading.Lock()


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's ``model_management.in_training`` on while a run trains, as its own LoRA trainer
    sets it: with it off, Flux / Z-Image / Lumina attention applies rotary embeddings with fused
    ``comfy_kitchen`` kernels that have no backward ("no autograd formula was registered"); on,
    with the plain torch code. The flag is process-wide: a sampler running meanwhile takes the
    plain torch path too (same result, a little slower). Counted, so overlapping runs keep it on
    until the last one ends; the value before the first is restored."""
    import comfy.model_management as mm
    with _training_lock:
        if _training["runs"] == 0:
            _training["before"] = mm.in_training
        _training["runs"] += 1
        mm.in_training = True
    try:
        yield
    finally:
        with _training_lock:
            _training["runs"] -= 1
            if _training["runs"] == 0:
                mm.in_training = _training["before"]


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


class RectifiedFlow(DDPM):
    """Flow-matching models (``model_sampling`` CONST): x = (1 − σ)·x0 + σ·ε. One step is ComfyUI's
    ``sample_euler_ancestral_RF`` at η = 1: down to σ_d = σ'²/σ by the straight line through x0,
    x_d = (σ_d/σ)·x + (1 − σ_d/σ)·x0, then rescaled to σ' and noise added,
    x' = ((1 − σ')/(1 − σ_d))·x_d + ρ·ε with ρ = √(σ'² − σ_d²(1 − σ')²/(1 − σ_d)²). Given the
    exact x0 it keeps the marginal x_σ' = (1 − σ')·x0 + σ'·ε: the flow analogue of the DDPM
    posterior. At σ' = 0: mean = x0, std = 0. ``initial_noise`` / ``noised`` are ``DDPM``'s: both
    call the model's own ``noise_scaling``, which for CONST is σ·ε + (1 − σ)·x0."""

    @staticmethod
    def posterior(x: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, sp: torch.Tensor):
        """Mean and std of the step from σ = s to σ = sp (scalars, or per sample (B,1,1,1))."""
        s, sp = s.to(x), sp.to(x)
        down = sp ** 2 / s                      # σ_d: η = 1
        ratio = down / s
        rescale = (1 - sp) / (1 - down)
        mean = rescale * (ratio * x + (1 - ratio) * x0)
        std = torch.sqrt((sp ** 2 - down ** 2 * rescale ** 2).clamp_min(0))
        return mean, std


def sampling_steps(model_sampling) -> type[DDPM]:
    """The step functions for a model's sampling type: ``RectifiedFlow`` for flow-matching models
    (``comfy.model_sampling.CONST``), ``DDPM`` for the rest (EPS, V_PREDICTION)."""
    import comfy.model_sampling
    return RectifiedFlow if isinstance(model_sampling, comfy.model_sampling.CONST) else DDPM


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
