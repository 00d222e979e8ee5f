"""SQDF (soft-Q diffusion fine-tuning, arXiv 2512.04559) as two steps the engine's loop runs inside
ComfyUI's sampling context, like the ReFL objectives (see objectives.py for the conventions):

* ``collect``: full no-grad trajectories with the current policy — the model's stochastic step
  (``ctx.steps``: the DDPM posterior, DDIM η = 1, on ε/v models; ComfyUI's rectified-flow ancestral
  step on flow models, see steps.py) on the N-step grid, with CFG — storing every x_i (i = 0 … N, index 0 the noisiest) and
  the final reward, for the replay buffer.
* ``update``: for sampled (trajectory, i) pairs: the policy mean μθ and the frozen reference mean
  μref (the same UNet with the LoRA switched off: no second copy) at the stored x_i, both from
  ``ctx.steps.posterior`` with the same std σ_i (it depends on the schedule only, so the KL is 0
  while the LoRA is zero, on every model type); one stochastic step x_{i+1} = μθ + σ_i·ε with gradients through this step only; x̂0 from x_{i+1} by
  the frozen reference's one-step x0 prediction (conditional branch; at the last step x̂0 =
  x_{i+1}); decode; reward. Loss per pair: −γ^(remaining)·r + α·KL, remaining = N − 1 − i.

KL: between N(μθ, σ_i²) and N(μref, σ_i²), the exact Gaussian KL is ‖μθ − μref‖² / (2σ_i²)
summed over the D latent dimensions (``kl = "exact"``). The reference code uses
mean((μθ − μref)²)/σ_i², which is 2/D of it; ``kl = "per_dim"`` (the default) is that scale, so
the paper's α values mean what they meant there. The last step is deterministic (σ = 0: the KL is
undefined; μθ = x̂0θ): it contributes no KL, only the reward term.

Consistency model: the paper jumps to x̂0 with a frozen LCM-LoRA of the same base
(``ConsistencyModel``, from ``sqdf_lcm_lora``). Without one, the one-step x0 prediction of the
frozen reference is used instead — the paper's "without the consistency model" ablation — and the
run says so in its log and the node's summary. The jump exists for ε-prediction models only
(SD1.5, SDXL LCM-LoRAs); on flow models (Flux, SD3.5, Z-Image…) and v-prediction ones
``ConsistencyModel`` refuses the file and the one-step prediction is what SQDF uses.
"""
from __future__ import annotations

import contextlib

import torch

from .steps import Batch, StepContext, cfg_scale, denoise_no_grad
from .replay import Trajectory


def discount(gamma: float, num_steps: int, index: torch.Tensor) -> torch.Tensor:
    """γ^(remaining) for the transition out of schedule index i: remaining = N − 1 − i steps after it."""
    return torch.pow(torch.tensor(float(gamma), dtype=torch.float64), (num_steps - 1 - index).double()).float()


def kl_term(mu: torch.Tensor, mu_ref: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample KL(N(μθ, σ²) ‖ N(μref, σ²)); 0 where σ = 0 (the deterministic last step)."""
    sq = ((mu - mu_ref) ** 2).flatten(1)
    var = (std.flatten(1)[:, 0] ** 2)
    live = var > 0
    safe = torch.where(live, var, torch.ones_like(var))
    if mode == "exact":
        kl = sq.sum(1) / (2 * safe)
    else:  # per_dim: the reference code's scale, 2/D of the exact value
        kl = sq.mean(1) / safe
    return torch.where(live, kl, torch.zeros_like(kl))


def collect(ctx: StepContext, batch: Batch, reward) -> tuple[list[Trajectory], dict]:
    """No-grad trajectories from noise with the current policy (LoRA merged for speed)."""
    x = ctx.steps.initial_noise(ctx.model_sampling, ctx.sigmas, batch.noise)
    xs = [x.float().cpu()]
    x = denoise_no_grad(ctx, x, 0, len(ctx.sigmas) - 1, visit=lambda x_next: xs.append(x_next.float().cpu()))
    with torch.no_grad():
        r = reward(ctx.decode(x), batch.prompts).float().cpu()
    stacked = torch.stack(xs, 1)  # (B, N+1, C, H, W)
    trajs = [Trajectory(stacked[b].clone(), batch.prompts[b], float(r[b])) for b in range(len(batch.prompts))]
    return trajs, {"collect_reward": float(r.mean())}


def update(ctx: StepContext, batch: Batch, reward, config) -> tuple[torch.Tensor, dict]:
    """The SQDF loss on the batch's sampled (trajectory, index) pairs."""
    n, dev = len(ctx.sigmas) - 1, ctx.sigmas.device
    idx = torch.tensor([i for _, i in batch.pairs], device=dev)
    x = torch.stack([t.latents[i] for t, i in batch.pairs]).to(dev, torch.float32)
    s, sp = ctx.sigmas[idx].view(-1, 1, 1, 1), ctx.sigmas[idx + 1].view(-1, 1, 1, 1)
    x0_policy = ctx.model(x, s.flatten(), **ctx.extra_args)
    with torch.no_grad(), ctx.reference():
        x0_ref = ctx.model(x, s.flatten(), **ctx.extra_args)
    mu, std = ctx.steps.posterior(x, x0_policy, s, sp)
    mu_ref, _ = ctx.steps.posterior(x, x0_ref, s, sp)
    x_next = mu + std * torch.randn(x.shape, generator=ctx.generator).to(x)
    r = reward(ctx.decode(_x0_estimate(ctx, x_next, sp.flatten(), s.flatten())), batch.prompts)
    weight = discount(config.sqdf_gamma, n, idx.cpu()).to(r)
    kl = kl_term(mu, mu_ref, std, config.sqdf_kl)
    loss = (-weight * r + config.sqdf_alpha * kl).mean()
    return loss, {"reward": float(r.detach().mean()), "kl": float(kl.detach().mean()), "sqdf_loss": float(loss.detach()),
                  "mean_index": float(idx.float().mean())}


def _x0_estimate(ctx: StepContext, x_next: torch.Tensor, sp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x̂0 from x_{i+1} at σ = sp (B,): the consistency model's jump, or (fallback) the frozen
    reference's one-step prediction, conditional branch only (CFG 1); at the last step (sp = 0)
    x_{i+1} is already the x0 prediction."""
    last = sp == 0
    sp_safe = torch.where(last, s, sp)
    if ctx.consistency is not None:
        x0_hat = ctx.consistency.jump(ctx, x_next, sp_safe)
    else:
        with cfg_scale(ctx.model, 1.0), ctx.reference():
            x0_hat = ctx.model(x_next, sp_safe, **ctx.extra_args)
    return torch.where(last.view(-1, 1, 1, 1), x_next, x0_hat)


class ConsistencyModel:
    """The frozen consistency model for SQDF's x̂0: the base UNet with a user-supplied LCM-LoRA
    (same base), applied as weight functions only for the jump — the policy LoRA is off then, so
    it is base + LCM — without a second copy of the UNet.

    The jump follows ComfyUI's LCM sampling (``ModelSamplingDiscreteDistilled`` + the LCM boundary
    condition), computed here instead of swapping the model's ``model_sampling``: the noise level is
    snapped to the 50-step LCM grid (t = 19, 39, …, 999), the UNet predicts x0_ε = x − σ̃·ε̂ at the
    snapped σ̃, and x̂0 = c_out·x0_ε + c_skip·x with c_skip = 0.25/((10t)² + 0.25),
    c_out = 10t/√((10t)² + 0.25). ε-prediction models only (SD1.5, SDXL)."""

    LCM_STEPS = 50

    def __init__(self, patcher, path: str):
        import comfy.lora
        import comfy.model_sampling
        import comfy.utils
        from .config import ConfigError
        ms = patcher.model.model_sampling
        if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.V_PREDICTION):
            raise ConfigError("the consistency-model jump needs an ε-prediction model (SD1.5, SDXL); "
                              "leave sqdf_lcm_lora empty for this one")
        try:
            sd = comfy.utils.load_torch_file(path, safe_load=True)
        except Exception as e:
            raise ConfigError(f"cannot read the LCM-LoRA {path}: {e}") from e
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
        self.layers = []
        for key, adapter in patches.items():
            if not isinstance(key, str) or not key.endswith(".weight") or not hasattr(adapter, "calculate_weight"):
                continue
            module = comfy.utils.get_attr(patcher.model, key[:-len(".weight")])
            if hasattr(module, "weight_function"):
                self.layers.append((module, key, adapter))
        if not self.layers:
            raise ConfigError(f"the LCM-LoRA {path} matches no layer of this model: use the LCM-LoRA made for "
                              "this base (SD1.5 or SDXL)")
        self.name = path
        sigmas = ms.sigmas
        skip = len(sigmas) // self.LCM_STEPS
        self.grid_t = torch.arange(skip - 1, len(sigmas), skip)     # 19, 39, …, 999
        self.grid_sigma = sigmas[self.grid_t]

    def snap(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest LCM-grid timestep (in log σ) and its σ, per sample."""
        grid = self.grid_sigma.to(sigma)
        i = (sigma.log().view(-1, 1) - grid.log().view(1, -1)).abs().argmin(1)
        return self.grid_t.to(sigma.device)[i].to(sigma), grid[i]

    def _function(self, key, adapter):
        def lcm(w):
            return adapter.calculate_weight(w.clone(), key, 1.0, 1.0, None, lambda d: d,
                                            intermediate_dtype=torch.float32).to(w.dtype)
        return lcm

    @contextlib.contextmanager
    def active(self):
        """Weight functions = [LCM] on its layers (the policy LoRA off), restored on exit."""
        saved = [(m, list(m.weight_function)) for m, _, _ in self.layers]
        try:
            for m, key, adapter in self.layers:
                m.weight_function = [self._function(key, adapter)]
            yield
        finally:
            for m, functions in saved:
                m.weight_function = functions

    def jump(self, ctx: StepContext, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂0 from x at noise level ``sigma`` (B,), conditional branch only, differentiable in x
        (the policy LoRA off: ``ctx.reference``)."""
        t, sigma_snap = self.snap(sigma)
        with cfg_scale(ctx.model, 1.0), ctx.reference(), self.active():
            x0_eps = ctx.model(x, sigma_snap, **ctx.extra_args)
        ts = (t * 10.0).view(-1, 1, 1, 1)
        c_skip = 0.25 / (ts ** 2 + 0.25)
        c_out = ts / (ts ** 2 + 0.25) ** 0.5
        return c_out * x0_eps + c_skip * x
