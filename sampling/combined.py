"""Combined generation (ImageReFL §3) as one continuous ComfyUI sampling pass.

The base model denoises the first ``k`` of ``N`` steps and the reward-tuned model the remaining
``N - k`` ("switch" mode), or the two predictions are blended every step with
``γ_i = 1 - (i / N) ** p`` on the base model ("blend" mode, the paper's "ReFL AIG" baseline).

Everything runs inside one sampler call through a :class:`comfy.samplers.CFGGuider` subclass, so
the sampler's SDE noise and multistep history stay continuous across the switch: with base ==
tuned the result is exactly one KSampler run, whatever the sampler.

Two ways the tuned model can arrive:

* a separately loaded model (another checkpoint): it is loaded next to the base model and each
  call is sent to whichever model owns it;
* a clone of the base that only adds weight patches (base + LoRA): both share the same torch
  modules, so holding two patchers would silently run the base weights for every call. The
  patches that differ are turned into ComfyUI weight hooks attached only to the conditioning of
  the stage that needs them; ComfyUI then swaps weights per hook group (cached, so once per
  switch, not once per call).
"""
from __future__ import annotations

import logging
import math
import sys
import uuid
from dataclasses import dataclass

import torch

import comfy.hooks
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

SWITCH_MODES = ("switch", "blend")
# "continuous": one sampler pass over the whole schedule (SDE noise and multistep history carry
# across the switch). "restart": two passes, exactly like two chained KSamplerAdvanced nodes
# (the second pass restarts multistep history and re-seeds SDE noise at the switch).
HANDOFFS = ("continuous", "restart")

# Which step of the schedule a model call belongs to is read from the sampler's own loop: every
# k-diffusion sampler in ComfyUI runs ``for i in trange(len(sigmas) - 1)`` over the schedule it was
# given, and each model evaluation inside that iteration (heun's corrector, dpm_2's and
# dpmpp_2s_ancestral's midpoint, seeds/sa_solver stages, ...) belongs to step i, wherever its
# sigma lands. Matching sigma values cannot tell step k-1's evaluation at sigma_k from step k's.
# Samplers without such a loop over the schedule (dpm_fast, dpm_adaptive and uni_pc build their own
# time grids) fall back to the sigma: a call above sigma_k belongs to the base stage.
_SCHEDULE_LOOP_MODULES = frozenset({"comfy.k_diffusion.sampling"})


def schedule_step_of_current_call(n_sigmas: int, max_depth: int = 64) -> int | None:
    """The index i of the schedule step the sampler is in when it calls the model, or None.

    Walks up from the caller to the innermost k-diffusion sampler frame that loops over a
    schedule of ``n_sigmas`` sigmas and reads its loop index ``i``.
    """
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        if frame.f_globals.get("__name__") in _SCHEDULE_LOOP_MODULES:
            loc = frame.f_locals
            i, sig = loc.get("i"), loc.get("sigmas")
            if isinstance(i, int) and torch.is_tensor(sig) and sig.shape[-1] == n_sigmas:
                return i
        frame = frame.f_back
        depth += 1
    return None


class CombinedSamplingError(ValueError):
    """Bad input to combined sampling; the message says what to change."""


def resolve_switch_step(steps: int, switch_step: int | None = None, switch_fraction: float | None = None) -> int:
    """The index k of the first step run by the tuned model, from a step index or a fraction: the
    one place the switch step is computed (the Combined KSampler, the guider and the sweep all
    call it).

    ``switch_fraction`` (in [0, 1]) takes precedence when given; it is rounded to the nearest step,
    halves up (0.5 of 9 steps is 5; Python's ``round`` would give 4, ties to even).
    """
    if steps < 1:
        raise CombinedSamplingError(f"steps must be at least 1 (got {steps}).")
    if switch_fraction is not None:
        if not (0.0 <= switch_fraction <= 1.0) or math.isnan(switch_fraction):
            raise CombinedSamplingError(
                f"switch fraction must be between 0 and 1 (got {switch_fraction}); 0 runs only the tuned model, 1 only the base.")
        # + 1e-9: a fraction typed as 0.35 is 0.34999… in binary; 0.35 · 10 must still give 4
        return int(math.floor(switch_fraction * steps + 0.5 + 1e-9))
    if switch_step is None:
        raise CombinedSamplingError("give a switch step or a switch fraction.")
    if not (0 <= switch_step <= steps):
        raise CombinedSamplingError(
            f"switch step must be between 0 and steps={steps} (got {switch_step}); "
            f"0 runs only the tuned model, {steps} only the base. ImageReFL uses 30 of 40 for SD1.5, 35 of 40 for SDXL.")
    return int(switch_step)


def aig_gamma(step_index: int | float, total_steps: int, power: float) -> float:
    """Weight of the base prediction in the "ReFL AIG" blend: γ_i = 1 - (i / T) ** p."""
    if total_steps <= 0:
        raise CombinedSamplingError("the schedule has no steps")
    frac = min(max(float(step_index) / float(total_steps), 0.0), 1.0)
    return 1.0 - frac ** power


def _options_equal(a, b) -> bool:
    """Structural equality of model_options as ComfyUI clones them (dicts/lists copied, leaves shared)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_options_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_options_equal(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # tensors and the like
        return False


def _split_patches(base: comfy.model_patcher.ModelPatcher, tuned: comfy.model_patcher.ModelPatcher):
    """Per weight key: the patches both share (common prefix) and what each adds on top."""
    common, base_extra, tuned_extra = {}, {}, {}
    for key in set(base.patches) | set(tuned.patches):
        pb, pt = base.patches.get(key, []), tuned.patches.get(key, [])
        n = 0
        while n < min(len(pb), len(pt)) and pb[n] is pt[n]:
            n += 1
        if n:
            common[key] = list(pb[:n])
        if pb[n:]:
            base_extra[key] = list(pb[n:])
        if pt[n:]:
            tuned_extra[key] = list(pt[n:])
    return common, base_extra, tuned_extra


class PatchListHook(comfy.hooks.WeightHook):
    """A weight hook carrying ModelPatcher patch entries verbatim (strengths, offsets, functions)."""

    def __init__(self, patches: dict | None = None):
        super().__init__()
        self.patch_lists = patches or {}
        self.need_weight_init = False

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        with model.use_ejected():
            current = model.hook_patches.get(self.hook_ref, {})
            for key, entries in self.patch_lists.items():
                current.setdefault(key, []).extend(entries)
            model.hook_patches[self.hook_ref] = current
            model.patches_uuid = uuid.uuid4()
        registered.add(self)
        return True

    def clone(self):
        c = super().clone()
        c.patch_lists = self.patch_lists
        return c


def _hook_group(patches: dict) -> comfy.hooks.HookGroup | None:
    if not patches:
        return None
    group = comfy.hooks.HookGroup()
    group.add(PatchListHook(patches))
    return group


def _model_sampling(patcher):
    # The patcher's view (its object patches, or the original the module had before another clone
    # patched it in place), not ``patcher.model.model_sampling``: ComfyUI leaves the module patched
    # by whichever clone ran last (e.g. a ModelSamplingDiscrete v_prediction branch).
    return patcher.get_model_object("model_sampling")


def _probe_sigmas(sb, st) -> torch.Tensor:
    """Sigmas covering both models' ranges: 17 quantiles of each sigma table (or its ends)."""
    points = []
    for ms in (sb, st):
        table = getattr(ms, "sigmas", None)
        if table is not None and table.numel() > 0:
            table = table.detach().float().cpu().flatten()
            points.append(table[torch.linspace(0, table.numel() - 1, 17).round().long()])
        points.append(torch.tensor([float(ms.sigma_max), float(ms.sigma_min) * 1.5 + 1e-3]))
    lo = max(float(sb.sigma_min), float(st.sigma_min))
    hi = min(float(sb.sigma_max), float(st.sigma_max))
    probe = torch.cat(points).clamp(min=lo, max=hi) if lo <= hi else torch.cat(points)
    return probe.unique()


def _sigma_space_mismatch(sb, st) -> str | None:
    """Why two model_sampling objects do not read sigmas the same way, or None when they do.

    Both stages run on one schedule, the base model's. What must agree is how each model reads a
    sigma on it: the network's timestep for that sigma, how a latent is noised to it, how the model
    input is scaled and how the output is un-scaled; checked on sigmas covering both models' ranges.
    The schedules themselves (sigma tables) may differ when that reading agrees: a flow-matching
    model's shift (ModelSamplingFlux, ModelSamplingSD3 / AuraFlow with the model's own multiplier, a
    distilled variant's schedule) only changes which sigmas a schedule visits, not what a sigma means.
    What the network predicts (eps, v, flow velocity: ``calculate_denoised``) may differ too; each
    stage computes its x0 with its own.
    """
    sig_b, sig_t = getattr(sb, "sigmas", None), getattr(st, "sigmas", None)
    if (sig_b is None) != (sig_t is None):
        return "one model has a discrete noise schedule and the other a continuous one"
    tables_differ = sig_b is not None and (
        sig_b.shape != sig_t.shape or not torch.allclose(sig_b.float().cpu(), sig_t.float().cpu(), rtol=1e-5, atol=1e-7))
    probe_sigmas = _probe_sigmas(sb, st)
    n = probe_sigmas.numel()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 2, 2, generator=gen)
    latent = torch.randn(n, 2, 2, 2, generator=gen)
    sig = probe_sigmas.view(n, 1, 1, 1)
    checks = {
        "timestep(sigma) (what the network is told the noise level is)": (sb.timestep(probe_sigmas).float(), st.timestep(probe_sigmas).float()),
        "noise scaling": (sb.noise_scaling(probe_sigmas, x, latent), st.noise_scaling(probe_sigmas, x, latent)),
        "input scaling": (sb.calculate_input(sig, x), st.calculate_input(sig, x)),
        "inverse noise scaling": (sb.inverse_noise_scaling(probe_sigmas, x), st.inverse_noise_scaling(probe_sigmas, x)),
    }
    for what, (a, b) in checks.items():
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6):
            if tables_differ:
                return ("their noise schedules (sigma tables) differ and the models read a sigma differently "
                        f"({what}; e.g. zero-terminal-SNR, another beta schedule, an LCM schedule)")
            return (f"their {what} differ (e.g. a flow-matching model and an eps/v model, or ModelSamplingSD3's "
                    "multiplier 1000 on a model that expects AuraFlow's 1.0)")
    return None


def _same_prediction(sb, st) -> bool:
    """Both model_sampling objects read sigmas the same way and turn a network output into the same x0."""
    if _sigma_space_mismatch(sb, st) is not None:
        return False
    probe_sigmas = _probe_sigmas(sb, st)
    n = probe_sigmas.numel()
    gen = torch.Generator().manual_seed(1)
    out, x = torch.randn(n, 2, 2, 2, generator=gen), torch.randn(n, 2, 2, 2, generator=gen)
    return torch.allclose(sb.calculate_denoised(probe_sigmas, out, x).float(),
                          st.calculate_denoised(probe_sigmas, out, x).float(), rtol=1e-5, atol=1e-6)


def _prediction_kind(ms) -> str:
    """The sampling type in ComfyUI's words: schedule class and prediction class (e.g. ModelSamplingFlux + CONST)."""
    own = [c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    schedule = next((n for n in own if n.startswith("ModelSampling")), type(ms).__name__)
    prediction = next((n for n in own if not n.startswith("ModelSampling")), "?")
    kind = {"EPS": "eps prediction", "V_PREDICTION": "v prediction", "CONST": "flow matching",
            "X0": "x0 prediction", "EDM": "EDM"}.get(prediction, prediction)
    shift = getattr(ms, "shift", None)
    return f"{kind} ({prediction}, {schedule}{f' shift {float(shift):g}' if shift is not None else ''})"


def describe_model(patcher) -> str:
    """A model's family, architecture, latent format and sampling type, for messages."""
    m = patcher.model
    return (f"{type(m.model_config).__name__} ({type(m).__name__} architecture, {type(m.latent_format).__name__} latent format, "
            f"{_prediction_kind(_model_sampling(patcher))})")


def _check_compatible(base, tuned):
    bm, tm = base.model, tuned.model
    if type(bm) is not type(tm) or type(bm.latent_format) is not type(tm.latent_format):
        raise CombinedSamplingError(
            "base and tuned models must be the same architecture with the same latent format: the base model is "
            f"{describe_model(base)}, the tuned model is {describe_model(tuned)}. Load a tuned model of the same family "
            "(a LoRA on the base, or a fine-tune of the same base).")
    sb, st = _model_sampling(base), _model_sampling(tuned)
    why = _sigma_space_mismatch(sb, st)
    if why is not None:
        raise CombinedSamplingError(
            f"base and tuned models use different noise schedules: {why}. Both stages run on one sigma grid, so "
            "patch both the same way (e.g. the same ModelSamplingDiscrete / ModelSampling* settings) before combining them. "
            f"Base: {describe_model(base)}; tuned: {describe_model(tuned)}.")
    sig_b, sig_t = getattr(sb, "sigmas", None), getattr(st, "sigmas", None)
    if sig_b is not None and (sig_b.shape != sig_t.shape or not torch.equal(sig_b.float().cpu(), sig_t.float().cpu())):
        logging.info("RewardTune combined sampling: the tuned model's noise schedule (e.g. its shift) differs from the "
                     "base model's; both stages run on the base model's schedule, on which the tuned model reads every "
                     "sigma the same way. Set the shift on the base model to change the schedule.")


def _check_shared_clone(base, tuned):
    """A tuned model that shares the base's weights may differ from it in weight patches only."""
    differing = set(base.object_patches) ^ set(tuned.object_patches) | {
        k for k in set(base.object_patches) & set(tuned.object_patches)
        if not _options_equal(base.object_patches[k], tuned.object_patches[k])}
    if "model_sampling" in differing and _same_prediction(_model_sampling(base), _model_sampling(tuned)):
        # e.g. ModelSamplingFlux / ModelSamplingSD3 with another shift on one branch: only the schedule
        # differs, and the schedule is the base model's; every call reads sigmas the same way.
        differing.discard("model_sampling")
    if differing:
        differing = sorted(differing)
        raise CombinedSamplingError(
            "the tuned model shares its weights with the base model but is patched differently "
            f"({', '.join(differing)}; e.g. a ModelSamplingDiscrete v_prediction/lcm patch on one of them). "
            "Combined sampling can only swap weight patches (e.g. a LoRA) between stages of one model: apply "
            "the same patch to both, or load the tuned model as its own checkpoint.")
    if not (_options_equal(base.weight_wrapper_patches, tuned.weight_wrapper_patches)
            and _options_equal(base.model_options, tuned.model_options)):
        raise CombinedSamplingError(
            "the tuned model shares its weights with the base model but differs in more than weight "
            "patches (weight wrappers or model options). Combined sampling can only swap "
            "weight patches (e.g. a LoRA) between stages: apply the other patches to both models.")


def check_models(base, tuned):
    """Refuse a base/tuned pair combined sampling cannot run, with what to change."""
    if base is None or tuned is None:
        raise CombinedSamplingError("both a base MODEL and a tuned MODEL are needed.")
    _check_compatible(base, tuned)
    if base.is_clone(tuned):
        _check_shared_clone(base, tuned)


def _check_conds(positive, negative):
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is None or len(cond) == 0:
            raise CombinedSamplingError(f"{name} conditioning is empty; connect a CLIP Text Encode output.")


@dataclass
class _Stage:
    """How one stage's calls are made: which inner model, which cond keys, which CFG scale."""
    patcher: comfy.model_patcher.ModelPatcher | None  # None: the guider's own model (shared weights)
    positive: str
    negative: str
    cfg: float


class CombinedGuider(comfy.samplers.CFGGuider):
    """A CFG guider that routes each denoising call to the base or the tuned model.

    mode "switch": the calls of schedule steps [0, k) go to base, those of steps [k, N) to tuned
    (k = ``switch_step``, or ``switch_fraction`` of the steps the sampler runs, rounded half up).
    A call belongs to the step of the sampler's loop that makes it (see
    :func:`schedule_step_of_current_call`), so heun's corrector or dpm_2_ancestral's second
    evaluation of step k-1 still goes to base although it lands on sigma_k.
    mode "blend": both are evaluated every call of step i and mixed with γ_i = 1 - (i/N)^p.
    When both stages would compute the same thing (same weights, conditioning and CFG) each call
    is made once.
    """

    def __init__(self, base, tuned, *, switch_step: int | None = None, switch_fraction: float | None = None,
                 cfg_base: float = 7.5, cfg_tuned: float = 1.0, mode: str = "switch", blend_power: float = 1.0):
        if mode not in SWITCH_MODES:
            raise CombinedSamplingError(f"mode must be one of {SWITCH_MODES} (got {mode!r}).")
        check_numbers(cfg_base=cfg_base, cfg_tuned=cfg_tuned)
        if mode == "blend" and not (blend_power > 0):
            raise CombinedSamplingError(f"blend power p must be > 0 (got {blend_power}).")
        if switch_step is None and switch_fraction is None:
            raise CombinedSamplingError("give a switch step or a switch fraction.")
        check_models(base, tuned)
        self.mode, self.blend_power = mode, float(blend_power)
        self.switch_step, self.switch_fraction = switch_step, switch_fraction
        self.shared = base.is_clone(tuned)
        if self.shared:
            common, base_extra, tuned_extra = _split_patches(base, tuned)
            guider_model = base.clone()
            guider_model.patches = common
            guider_model.patches_uuid = uuid.uuid4()
            self._base_hooks, self._tuned_hooks = _hook_group(base_extra), _hook_group(tuned_extra)
            self._same_weights = not base_extra and not tuned_extra
        else:
            guider_model = base.clone()
            guider_model.set_additional_models("rewardtune_combined_tuned", [tuned])
            self._base_hooks = self._tuned_hooks = None
            self._same_weights = False
        super().__init__(guider_model)
        self.base_stage = _Stage(None, "positive", "negative", float(cfg_base))
        self.tuned_stage = _Stage(None if self.shared else tuned, "tuned_positive", "tuned_negative", float(cfg_tuned))
        self._same_conds = True

    # -- conditioning -------------------------------------------------------------------------
    def set_conds(self, positive, negative, tuned_positive=None, tuned_negative=None):
        self._same_conds = tuned_positive is None and tuned_negative is None
        tuned_positive = positive if tuned_positive is None else tuned_positive
        tuned_negative = negative if tuned_negative is None else tuned_negative
        _check_conds(positive, negative)
        if self._base_hooks is not None:
            positive = comfy.hooks.set_hooks_for_conditioning(positive, self._base_hooks)
            negative = comfy.hooks.set_hooks_for_conditioning(negative, self._base_hooks)
        if self._tuned_hooks is not None:
            tuned_positive = comfy.hooks.set_hooks_for_conditioning(tuned_positive, self._tuned_hooks)
            tuned_negative = comfy.hooks.set_hooks_for_conditioning(tuned_negative, self._tuned_hooks)
        tuned_negative = [[c[0], {**c[1], "prompt_type": "negative"}] for c in tuned_negative]
        self.inner_set_conds({"positive": positive, "negative": negative,
                              "tuned_positive": tuned_positive, "tuned_negative": tuned_negative})

    def set_cfg(self, cfg):  # CFGGuider API: one value sets both stages
        self.base_stage.cfg = self.tuned_stage.cfg = float(cfg)
        self.cfg = float(cfg)

    def stages_identical(self) -> bool:
        """Both stages compute the same prediction: same weights, conditioning and CFG scale."""
        return self._same_weights and self._same_conds and self.base_stage.cfg == self.tuned_stage.cfg

    # -- routing ------------------------------------------------------------------------------
    def _start(self, sigmas):
        n = int(sigmas.shape[-1]) - 1
        self._n_steps, self._k = n, resolve_switch_step(n, self.switch_step, self.switch_fraction)
        self._sigmas = sigmas.detach().float().cpu()

    def _step_of(self, sigma: float) -> int:
        """The schedule step the current call belongs to (see module notes)."""
        i = schedule_step_of_current_call(self._n_steps + 1)
        if i is not None:
            return i
        # No schedule loop (dpm_fast, dpm_adaptive, uni_pc): the number of schedule sigmas above
        # this one; a call at exactly sigma_i counts as step i.
        tol = 1e-5 * max(1.0, abs(sigma))
        return int((self._sigmas[:-1] > sigma + tol).sum())

    # -- prediction ---------------------------------------------------------------------------
    def _options_for(self, stage: _Stage, model_options: dict) -> dict:
        if stage.patcher is None:
            return model_options
        # The tuned patcher's own options plus what the sampler added to the run's options
        # (cfg_pp samplers' post-cfg functions, the schedule), so those samplers keep working.
        opts = comfy.model_patcher.create_model_options_clone(stage.patcher.model_options)
        base_opts = self.model_patcher.model_options
        for key in ("sampler_pre_cfg_function", "sampler_post_cfg_function"):
            added = model_options.get(key, [])[len(base_opts.get(key, [])):]
            if added:
                opts[key] = list(opts.get(key, [])) + list(added)
        if "disable_cfg1_optimization" in model_options:
            opts["disable_cfg1_optimization"] = model_options["disable_cfg1_optimization"]
        t_opts = model_options.get("transformer_options", {})
        if "sample_sigmas" in t_opts:
            opts.setdefault("transformer_options", {})["sample_sigmas"] = t_opts["sample_sigmas"]
        return opts

    def _predict(self, stage: _Stage, x, timestep, model_options, seed):
        inner = self.inner_model if stage.patcher is None else stage.patcher.model
        return comfy.samplers.sampling_function(
            inner, x, timestep, self.conds.get(stage.negative), self.conds.get(stage.positive), stage.cfg,
            model_options=self._options_for(stage, model_options), seed=seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.stages_identical():
            return self._predict(self.base_stage, x, timestep, model_options, seed)
        sigma = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        step = self._step_of(sigma)
        if self.mode == "blend":
            gamma = aig_gamma(step, self._n_steps, self.blend_power)
            if gamma >= 1.0:
                return self._predict(self.base_stage, x, timestep, model_options, seed)
            if gamma <= 0.0:
                return self._predict(self.tuned_stage, x, timestep, model_options, seed)
            # x0 = x - σ·ε is affine in ε, so blending x0 predictions equals blending ε.
            out_base = self._predict(self.base_stage, x, timestep, model_options, seed)
            out_tuned = self._predict(self.tuned_stage, x, timestep, model_options, seed)
            return gamma * out_base + (1.0 - gamma) * out_tuned
        stage = self.base_stage if step < self._k else self.tuned_stage
        return self._predict(stage, x, timestep, model_options, seed)

    # -- sampling -----------------------------------------------------------------------------
    def outer_sample(self, *args, **kwargs):
        tuned = self.tuned_stage.patcher
        if tuned is None:
            return super().outer_sample(*args, **kwargs)
        tuned.pre_run()
        try:
            return super().outer_sample(*args, **kwargs)
        finally:
            tuned.cleanup()

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        if latent_image is not None and latent_image.shape[0] == 0:
            raise CombinedSamplingError("the latent batch is empty; connect an Empty Latent Image with batch size ≥ 1.")
        if not self.original_conds:
            raise CombinedSamplingError("no conditioning set on the combined guider.")
        self._start(sigmas)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask,
                              callback=callback, disable_pbar=disable_pbar, seed=seed)


def ksampler_sigmas(model, steps: int, sampler_name: str, scheduler: str, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas KSampler itself would use (including its per-sampler adjustments)."""
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return ks.sigmas


def _stage_guider(model, positive, negative, cfg):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    return g


def _check_sample_args(sampler_name: str, scheduler: str, mode: str, handoff: str, latent) -> None:
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise CombinedSamplingError(f"unknown sampler {sampler_name!r}; choose one of {comfy.samplers.KSampler.SAMPLERS}.")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise CombinedSamplingError(f"unknown scheduler {scheduler!r}; choose one of {comfy.samplers.KSampler.SCHEDULERS}.")
    if handoff not in HANDOFFS:
        raise CombinedSamplingError(f"handoff must be one of {HANDOFFS} (got {handoff!r}).")
    if handoff == "restart" and mode != "switch":
        raise CombinedSamplingError("the 'restart' handoff only applies to the 'switch' mode; use 'continuous' for 'blend'.")
    if not isinstance(latent, dict) or "samples" not in latent:
        raise CombinedSamplingError("latent must be a LATENT (a dict with 'samples').")
    if latent["samples"].shape[0] == 0:
        raise CombinedSamplingError("the latent batch is empty; connect an Empty Latent Image with batch size ≥ 1.")


SWITCH_UNITS = ("step", "fraction")


def check_dynamic_combos(switch_unit: dict | None, mode: dict | None) -> None:
    """The nodes' switch_unit and mode inputs (ComfyUI DynamicCombos, passed as dicts) are present:
    ComfyUI drops one whose value is not an option, and the node would fail on a missing argument."""
    for name, value, options in (("switch_unit", switch_unit, SWITCH_UNITS), ("mode", mode, SWITCH_MODES)):
        if not isinstance(value, dict) or value.get(name) not in options:
            raise CombinedSamplingError(f"{name} must be one of {', '.join(options)}; the prompt gave none of them "
                                        f"(a typo in an API prompt, or a workflow from an older version): pick it "
                                        "on the node")


def check_numbers(denoise: float = 1.0, **values: float) -> None:
    """NaN passes every min/max check (each comparison with it is false), ComfyUI's input
    validation included: refuse it, and infinity, by name before any work."""
    if not 0.0 <= denoise <= 1.0:  # false for NaN too
        raise CombinedSamplingError(f"denoise must be between 0 and 1 (as in KSampler), got {denoise}")
    for name, value in values.items():
        if not math.isfinite(value):
            raise CombinedSamplingError(f"{name} must be a number, got {value}: set it on the node (a NaN or an "
                                        "infinity comes through a converted or linked input)")


def _two_passes(base, tuned, positive, negative, tuned_positive, tuned_negative, noise, latent_image, sigmas, k, *,
                sampler_name, cfg_base, cfg_tuned, mask, callback, disable_pbar, seed):
    """The 'restart' handoff: KSamplerAdvanced(base, 0→k, leftover noise) → KSamplerAdvanced(tuned,
    k→N, no noise), with one progress count over both."""
    tp = positive if tuned_positive is None else tuned_positive
    tn = negative if tuned_negative is None else tuned_negative
    first = _stage_guider(base, positive, negative, cfg_base).sample(
        noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas[:k + 1], denoise_mask=mask,
        callback=callback, disable_pbar=disable_pbar, seed=seed)
    first = first.to(device=comfy.model_management.intermediate_device(), dtype=comfy.model_management.intermediate_dtype())

    def second_callback(step, x0, x, total):
        if callback is not None:
            return callback(step + k, x0, x, total + k)

    return _stage_guider(tuned, tp, tn, cfg_tuned).sample(
        torch.zeros_like(noise), first, comfy.samplers.sampler_object(sampler_name), sigmas[k:], denoise_mask=mask,
        callback=second_callback, disable_pbar=disable_pbar, seed=seed)


def combined_sample(base, tuned, positive, negative, latent: dict, *, seed: int, steps: int, sampler_name: str,
                    scheduler: str, cfg_base: float, cfg_tuned: float, switch_step: int | None = None,
                    switch_fraction: float | None = None, denoise: float = 1.0, mode: str = "switch",
                    blend_power: float = 1.0, handoff: str = "continuous", tuned_positive=None, tuned_negative=None,
                    callback=None, disable_pbar: bool = True) -> dict:
    """KSampler semantics (same noise, sigmas and sampler) with the base→tuned handoff.

    Returns a new LATENT dict. ``callback(step, x0, x, total_steps)`` is ComfyUI's preview callback.
    """
    _check_sample_args(sampler_name, scheduler, mode, handoff, latent)
    check_numbers(cfg_base=cfg_base, cfg_tuned=cfg_tuned, denoise=denoise)
    # the switch against the requested step count, before any work
    k = resolve_switch_step(steps, switch_step, switch_fraction)
    sigmas = ksampler_sigmas(base, steps, sampler_name, scheduler, denoise)
    # k indexes the sampler's sigmas, as KSamplerAdvanced's start/end steps do. Some schedulers
    # (ddim_uniform when steps does not divide 1000) return an extra step; k = steps still means
    # "base model only".
    n_sched = max(int(sigmas.shape[-1]) - 1, 0)
    if k >= steps:
        k = n_sched
    latent_image = comfy.sample.fix_empty_latent_channels(base, latent["samples"], latent.get("downscale_ratio_spacial", None),
                                                          latent.get("downscale_ratio_temporal", None))
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out.pop("downscale_ratio_temporal", None)
    kw = dict(callback=callback, disable_pbar=disable_pbar, seed=seed)
    if handoff == "restart" and 0 < k < n_sched:
        check_models(base, tuned)
        _check_conds(positive, negative)
        samples = _two_passes(base, tuned, positive, negative, tuned_positive, tuned_negative, noise, latent_image,
                              sigmas, k, sampler_name=sampler_name, cfg_base=cfg_base, cfg_tuned=cfg_tuned,
                              mask=latent.get("noise_mask"), **kw)
    else:
        guider = CombinedGuider(base, tuned, switch_step=k, cfg_base=cfg_base, cfg_tuned=cfg_tuned,
                                mode=mode, blend_power=blend_power)
        guider.set_conds(positive, negative, tuned_positive, tuned_negative)
        if sigmas.shape[-1] == 0:  # denoise == 0: nothing to do, as KSampler
            out["samples"] = latent_image
            return out
        samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent.get("noise_mask"), **kw)
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(),
                                dtype=comfy.model_management.intermediate_dtype())
    return out
