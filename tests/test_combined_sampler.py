"""Combined KSampler: equality with KSampler / chained KSamplerAdvanced, on tiny models built with comfy's classes.

The reference nodes (KSampler, KSamplerAdvanced, SamplerCustomAdvanced …) are ComfyUI's own, taken
from NODE_CLASS_MAPPINGS after ComfyUI loaded everything; the pack's node is the one ComfyUI loaded.
"""
from __future__ import annotations

import pytest
import torch

from rewardtune.testing.workflow import combined_switch_inputs

N = 4  # steps in the bulk sweeps: every k in 0..N


@pytest.fixture(scope="module")
def env(host):
    from rewardtune.testing import tiny_models as tm
    import comfy.sd

    base = tm.tiny_model_patcher(seed=0, unit_scale=True)
    twin = tm.tiny_model_patcher(seed=0, unit_scale=True)  # same weights, a separate model object
    other = tm.tiny_model_patcher(seed=1, unit_scale=True)  # a different "tuned checkpoint"
    lora = tm.lora_state_dict(base.model, seed=7, scale=2.0)
    with_lora, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    return {
        "nodes": host.node_classes, "tm": tm, "base": base, "twin": twin, "other": other, "lora": with_lora,
        "pos": tm.tiny_conditioning(1), "neg": tm.tiny_conditioning(2),
        "latent": {"samples": torch.zeros(2, 4, 8, 8)},
    }


def ksampler(env, model, sampler, steps=N, cfg=4.0, seed=11, scheduler="normal", denoise=1.0):
    node = env["nodes"]["KSampler"]()
    return node.sample(model, seed, steps, cfg, sampler, scheduler, env["pos"], env["neg"], env["latent"], denoise=denoise)[0]["samples"]


def chain(env, base, tuned, sampler, k, steps=N, cfg_base=4.0, cfg_tuned=4.0, seed=11, scheduler="normal"):
    adv = env["nodes"]["KSamplerAdvanced"]()
    first = adv.sample(base, "enable", seed, steps, cfg_base, sampler, scheduler, env["pos"], env["neg"], env["latent"],
                       0, k, "enable")[0]
    return adv.sample(tuned, "disable", seed, steps, cfg_tuned, sampler, scheduler, env["pos"], env["neg"], first,
                      k, 10000, "disable")[0]["samples"]


def combined(env, base, tuned, sampler, k, steps=N, cfg_base=4.0, cfg_tuned=4.0, seed=11, scheduler="normal", **kw):
    node = env["nodes"]["RewardTuneCombinedKSampler"]
    switch = {k2: kw.pop(k2) for k2 in ("switch_unit", "switch_fraction", "mode", "blend_power") if k2 in kw}
    args = dict(base_model=base, tuned_model=tuned, positive=env["pos"], negative=env["neg"], latent_image=env["latent"],
                seed=seed, steps=steps, cfg_base=cfg_base, cfg_tuned=cfg_tuned, sampler_name=sampler,
                scheduler=scheduler, handoff="continuous", denoise=1.0,
                **combined_switch_inputs(switch_step=k, **switch, api=False))
    args.update(kw)
    return node.execute(**args).args[0]["samples"]


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"max abs diff {diff}"


def all_samplers():
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def test_node_is_registered_by_comfyui(host):
    assert "RewardTuneCombinedKSampler" in host.node_classes
    assert "RewardTuneCombinedGuider" in host.node_classes


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "ddpm"])
def test_k0_is_tuned_and_kN_is_base(env, sampler):
    for tuned in (env["other"], env["lora"]):
        assert_close(combined(env, env["base"], tuned, sampler, 0), ksampler(env, tuned, sampler))
        assert_close(combined(env, env["base"], tuned, sampler, N), ksampler(env, env["base"], sampler))


@pytest.mark.slow
def test_same_model_equals_one_ksampler_for_every_sampler_and_k(env):
    """One continuous pass: no re-seeded noise and no restarted history at the switch, for all samplers.

    ``twin`` has the base's weights in a separate model object, so every call really is routed
    between two models; the result must still be exactly one KSampler run.
    """
    failures = []
    for sampler in all_samplers():
        ref = ksampler(env, env["base"], sampler)
        for k in range(N + 1):
            for tuned in (env["base"], env["twin"]):
                out = combined(env, env["base"], tuned, sampler, k)
                diff = (out - ref).abs().max().item()
                if not (torch.isfinite(out).all() and diff <= 1e-5 * max(1.0, ref.abs().max().item())):
                    failures.append((sampler, k, tuned is env["twin"], diff))
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "ddim"])
@pytest.mark.parametrize("tuned_name", ["other", "lora"])
def test_single_step_samplers_equal_the_two_node_chain(env, sampler, tuned_name):
    tuned = env[tuned_name]
    for k in range(1, N):
        assert_close(combined(env, env["base"], tuned, sampler, k, cfg_tuned=2.0),
                     chain(env, env["base"], tuned, sampler, k, cfg_tuned=2.0))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc", "lms"])
def test_multistep_samplers_keep_history_and_restart_mode_equals_the_chain(env, sampler):
    k = 2
    cont = combined(env, env["base"], env["other"], sampler, k, steps=6)
    restart = combined(env, env["base"], env["other"], sampler, k, steps=6, handoff="restart")
    ref_chain = chain(env, env["base"], env["other"], sampler, k, steps=6)
    assert_close(restart, ref_chain)
    # the continuous pass keeps the multistep history, so it differs from the chain
    assert (cont - ref_chain).abs().max().item() > 1e-4


def test_lora_tuned_model_is_really_used(env):
    """The shared-weights trap: base + LoRA must not silently run the base for every step."""
    base_only = ksampler(env, env["base"], "euler")
    out = combined(env, env["base"], env["lora"], "euler", 2)
    assert (out - base_only).abs().max().item() > 1e-3
    assert_close(out, chain(env, env["base"], env["lora"], "euler", 2))
    # and the base model is left unpatched afterwards
    assert_close(ksampler(env, env["base"], "euler"), base_only)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde", "ddpm"])
def test_stochastic_samplers_are_deterministic_for_a_seed(env, sampler):
    a = combined(env, env["base"], env["lora"], sampler, 2, seed=5)
    b = combined(env, env["base"], env["lora"], sampler, 2, seed=5)
    c = combined(env, env["base"], env["lora"], sampler, 2, seed=6)
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3


def test_switch_fraction_matches_step(env):
    by_fraction = combined(env, env["base"], env["other"], "euler", 0, steps=8, switch_unit="fraction", switch_fraction=0.75)
    by_step = combined(env, env["base"], env["other"], "euler", 6, steps=8)
    assert torch.equal(by_fraction, by_step)


def test_cfg_per_stage(env):
    """cfg_tuned only affects the tuned stage: at k = N it changes nothing, at k < N it does."""
    a = combined(env, env["base"], env["other"], "euler", N, cfg_tuned=1.0)
    b = combined(env, env["base"], env["other"], "euler", N, cfg_tuned=9.0)
    assert torch.equal(a, b)
    c = combined(env, env["base"], env["other"], "euler", 2, cfg_tuned=1.0)
    d = combined(env, env["base"], env["other"], "euler", 2, cfg_tuned=9.0)
    assert (c - d).abs().max().item() > 1e-4


@pytest.mark.parametrize("which, seed", [("tuned_positive", 99), ("tuned_negative", 77)])
def test_separate_tuned_conditioning(env, which, seed):
    other = env["tm"].tiny_conditioning(seed)
    a = combined(env, env["base"], env["other"], "euler", 2)
    b = combined(env, env["base"], env["other"], "euler", 2, **{which: other})
    assert (a - b).abs().max().item() > 1e-4
    # only the tuned stage sees it: at k = N nothing changes
    assert torch.equal(combined(env, env["base"], env["other"], "euler", N),
                       combined(env, env["base"], env["other"], "euler", N, **{which: other}))
    # the tuned stage sees exactly that conditioning: k = 0 equals KSampler with it
    pos, neg = (other, env["neg"]) if which == "tuned_positive" else (env["pos"], other)
    ref = env["nodes"]["KSampler"]().sample(env["other"], 11, N, 4.0, "euler", "normal", pos, neg, env["latent"])[0]["samples"]
    assert_close(combined(env, env["base"], env["other"], "euler", 0, **{which: other}), ref)


def test_blend_mode_endpoints_and_formula(env):
    """ReFL AIG: γ_i = 1 − (i/N)^p. A huge p keeps γ ≈ 1 (base) until the very end; with base == tuned the blend is exact."""
    from rewardtune.sampling.combined import aig_gamma
    assert aig_gamma(0, 10, 2.0) == 1.0 and aig_gamma(10, 10, 2.0) == 0.0
    assert abs(aig_gamma(5, 10, 2.0) - 0.75) < 1e-12
    same = combined(env, env["base"], env["twin"], "dpmpp_2m", 0, mode="blend", blend_power=1.5)
    assert_close(same, ksampler(env, env["base"], "dpmpp_2m"))
    blend = combined(env, env["base"], env["other"], "euler", 0, mode="blend", blend_power=1.0)
    base_only = ksampler(env, env["base"], "euler")
    tuned_only = ksampler(env, env["other"], "euler")
    assert (blend - base_only).abs().max() > 1e-4 and (blend - tuned_only).abs().max() > 1e-4


def test_blend_first_step_is_pure_base_prediction(env):
    """At i = 0, γ = 1: a one-step euler blend equals one base step exactly."""
    out = combined(env, env["base"], env["other"], "euler", 0, steps=1, mode="blend", blend_power=1.0)
    assert_close(out, ksampler(env, env["base"], "euler", steps=1))


def test_guider_for_sampler_custom_advanced(env):
    nodes = env["nodes"]
    guider = nodes["RewardTuneCombinedGuider"].execute(
        base_model=env["base"], tuned_model=env["lora"], positive=env["pos"], negative=env["neg"], cfg_base=4.0,
        cfg_tuned=4.0, **combined_switch_inputs(switch_step=2, api=False)).args[0]
    noise = nodes["RandomNoise"].execute(noise_seed=11).args[0]
    sampler = nodes["KSamplerSelect"].execute(sampler_name="euler").args[0]
    sigmas = nodes["BasicScheduler"].execute(model=env["base"], scheduler="normal", steps=N, denoise=1.0).args[0]
    out = nodes["SamplerCustomAdvanced"].execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                                 latent_image=env["latent"]).args[0]["samples"]
    assert_close(out, combined(env, env["base"], env["lora"], "euler", 2))


def test_interrupt_is_honoured(env):
    import comfy.model_management as mm
    from rewardtune.sampling.combined import combined_sample

    def cb(step, x0, x, total):
        if step == 1:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            combined_sample(env["base"], env["lora"], env["pos"], env["neg"], env["latent"], seed=1, steps=6,
                            sampler_name="euler", scheduler="normal", cfg_base=4.0, cfg_tuned=1.0, switch_step=3,
                            callback=cb)
    finally:
        mm.interrupt_current_processing(False)


def raises_named(name, match):
    """The node's module is ComfyUI's copy of the pack (loaded under its path), so compare the class by name."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(Exception, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            ok = self.cm.__exit__(*exc)
            assert type(self.info.value).__name__ == name, repr(self.info.value)
            return ok
    return _Ctx()


def test_bad_inputs_have_clear_errors(env):
    tm = env["tm"]
    with raises_named("CombinedSamplingError", "switch step must be between 0 and steps=4"):
        combined(env, env["base"], env["other"], "euler", 5)
    with raises_named("CombinedSamplingError", "latent batch is empty"):
        combined(env, env["base"], env["other"], "euler", 2, latent_image={"samples": torch.zeros(0, 4, 8, 8)})
    scaled = tm.tiny_model_patcher(seed=0, unit_scale=False)  # SD1.5 latent scale vs scale 1
    with raises_named("CombinedSamplingError", "same architecture with the same latent format"):
        combined(env, env["base"], scaled, "euler", 2)
    with raises_named("CombinedSamplingError", "positive conditioning is empty"):
        combined(env, env["base"], env["other"], "euler", 2, positive=[])
    with raises_named("CombinedSamplingError", "restart' handoff only applies"):
        combined(env, env["base"], env["other"], "euler", 2, mode="blend", handoff="restart")


# ---------------------------------------------------------------------------- routing by step
# Samplers that do not loop over the schedule they are given (their own time grids): routed by
# sigma, documented in sampling/combined.py. Every other sampler is checked against a reference
# that knows nothing of the guider: it counts the model calls the base makes for steps [0, k)
# (KSamplerAdvanced 0 → k) and, in one full KSampler pass, sends exactly those first calls to the
# base model and every later call to the tuned one.
OWN_GRID_SAMPLERS = {"dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2"}
# The reference assumes step k-1 makes as many model calls when the schedule ends at sigma_k as in
# the full schedule. heunpp2 breaks that: its last step is plain euler (1 call), in the full run
# the same step is Heun++ (3 calls, at sigma_k and sigma_k+1), all of which belong to step k-1
# and go to the base; measured against this reference it differs by 1.7e-2, by construction.
NOT_REFERENCE_CHECKED = OWN_GRID_SAMPLERS | {"heunpp2"}


def _counting_clone(model, route_after=None, tuned=None):
    """A clone whose UNet calls are counted; with ``route_after`` = C, calls C, C+1, … run ``tuned``."""
    clone = model.clone()
    state = {"calls": 0}

    def wrapper(apply_model, args):
        n = state["calls"]
        state["calls"] += 1
        if route_after is not None and n >= route_after:
            return tuned.model.apply_model(args["input"], args["timestep"], **args["c"])
        return apply_model(args["input"], args["timestep"], **args["c"])
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, state


def step_by_step_reference(env, base, tuned, sampler, k, steps=N, cfg=4.0, seed=11, scheduler="normal"):
    counter, state = _counting_clone(base)
    adv = env["nodes"]["KSamplerAdvanced"]()
    adv.sample(counter, "enable", seed, steps, cfg, sampler, scheduler, env["pos"], env["neg"], env["latent"], 0, k, "enable")
    routed, _ = _counting_clone(base, route_after=state["calls"], tuned=tuned)
    return ksampler(env, routed, sampler, steps=steps, cfg=cfg, seed=seed, scheduler=scheduler)


@pytest.mark.slow
def test_every_sampler_hands_off_at_the_step_not_the_sigma(env):
    """dpm_2_ancestral, dpmpp_2s_ancestral(_cfg_pp), heun… evaluate the model a second time inside
    step k−1, at or near sigma_k: those calls still belong to the base model."""
    failures = []
    for sampler in [s for s in all_samplers() if s not in NOT_REFERENCE_CHECKED]:
        for k in range(1, N):
            ref = step_by_step_reference(env, env["base"], env["other"], sampler, k)
            out = combined(env, env["base"], env["other"], sampler, k)
            diff = (out - ref).abs().max().item()
            if not (torch.isfinite(out).all() and diff <= 1e-5 * max(1.0, ref.abs().max().item())):
                failures.append((sampler, k, diff))
    assert not failures, failures


def test_reference_tells_the_handoff_apart(env):
    """Negative control: handing off one call late or early is visible to the reference."""
    for sampler in ("dpm_2_ancestral", "heun"):
        ref = step_by_step_reference(env, env["base"], env["other"], sampler, 2)
        for k in (1, 3):
            assert (combined(env, env["base"], env["other"], sampler, k) - ref).abs().max().item() > 1e-4


# dpm_adaptive takes hundreds of calls per run; the same-model test above covers it at every k.
@pytest.mark.parametrize("sampler", sorted(OWN_GRID_SAMPLERS - {"dpm_adaptive"}))
def test_own_grid_samplers_route_by_sigma(env, sampler):
    """No schedule loop to read: calls above sigma_k go to base, the rest to tuned; k = 0 / N exact."""
    assert_close(combined(env, env["base"], env["other"], sampler, 0), ksampler(env, env["other"], sampler))
    assert_close(combined(env, env["base"], env["other"], sampler, N), ksampler(env, env["base"], sampler))
    mid = combined(env, env["base"], env["other"], sampler, 2)
    assert (mid - ksampler(env, env["base"], sampler)).abs().max() > 1e-4
    assert (mid - ksampler(env, env["other"], sampler)).abs().max() > 1e-4


# ---------------------------------------------------------------------------- noise schedules
def _model_sampling_patch(env, model, sampling):
    return env["nodes"]["ModelSamplingDiscrete"]().patch(model, sampling, False)[0]


def test_tuned_model_with_another_parameterisation_runs_its_own(env):
    """A separately loaded v-prediction tuned model: one sigma grid, each stage's own x0."""
    vpred = _model_sampling_patch(env, env["other"], "v_prediction")
    assert_close(combined(env, env["base"], vpred, "euler", 0), ksampler(env, vpred, "euler"))
    assert_close(combined(env, env["base"], vpred, "euler", N), ksampler(env, env["base"], "euler"))
    mid = combined(env, env["base"], vpred, "euler", 2)
    assert_close(mid, chain(env, env["base"], vpred, "euler", 2))
    # negative control: the eps reading of the same weights gives another image
    assert (mid - combined(env, env["base"], env["other"], "euler", 2)).abs().max().item() > 1e-3


def test_noise_schedule_guard_reads_the_patchers_view(env):
    """ComfyUI leaves the module patched by the clone that ran last; the guard must not read it."""
    vpred_base = _model_sampling_patch(env, env["base"], "v_prediction")
    ksampler(env, vpred_base, "euler")
    ref = chain(env, env["base"], env["other"], "euler", 2)
    out = combined(env, env["base"], env["other"], "euler", 2)
    assert_close(out, ref)


def test_mismatched_noise_schedules_are_refused_with_a_reason(env):
    lcm = _model_sampling_patch(env, env["other"], "lcm")  # LCM's distilled sigma table
    with raises_named("CombinedSamplingError", "different noise schedules: their noise schedules"):
        combined(env, env["base"], lcm, "euler", 2)
    zsnr = env["nodes"]["ModelSamplingDiscrete"]().patch(env["other"], "eps", True)[0]
    with raises_named("CombinedSamplingError", "different noise schedules"):
        combined(env, env["base"], zsnr, "euler", 2)
    # a clone of the base patched to v_prediction shares its modules: refused, naming the patch
    with raises_named("CombinedSamplingError", r"patched differently \(model_sampling"):
        combined(env, env["base"], _model_sampling_patch(env, env["lora"], "v_prediction"), "euler", 2)


def test_tuned_clone_differing_in_more_than_weight_patches_is_refused(env):
    clone = env["lora"].clone()
    clone.set_model_sampler_cfg_function(lambda args: args["cond_denoised"])
    with raises_named("CombinedSamplingError", "differs in more than weight patches"):
        combined(env, env["base"], clone, "euler", 2)


# ---------------------------------------------------------------------------- blend
def test_blend_with_the_same_weights_calls_once_and_is_exact(env):
    counted, state = _counting_clone(env["base"])
    out = combined(env, counted, counted, "dpmpp_2m", 0, mode="blend", blend_power=1.5)
    blend_calls = state["calls"]
    state["calls"] = 0
    ref = ksampler(env, counted, "dpmpp_2m")
    assert torch.equal(out, ref)
    assert blend_calls == state["calls"] == N
    # a LoRA clone with the LoRA at the base's strength is the same weights too
    same = combined(env, env["lora"], env["lora"], "euler", 0, mode="blend")
    assert torch.equal(same, ksampler(env, env["lora"], "euler"))


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_one_blended_euler_step_is_the_gamma_weighted_steps(env, power):
    """Two euler steps: step 0 has γ = 1 (base), step 1 ends at sigma 0, so its result is the
    blended x0 itself: γ·(base's x0) + (1 − γ)·(tuned's x0) from the same x_1, γ = 1 − (1/2)^p."""
    gamma = 1.0 - 0.5 ** power
    out = combined(env, env["base"], env["other"], "euler", 0, steps=2, mode="blend", blend_power=power)
    base_x0 = chain(env, env["base"], env["base"], "euler", 1, steps=2)
    tuned_x0 = chain(env, env["base"], env["other"], "euler", 1, steps=2)
    assert (base_x0 - tuned_x0).abs().max().item() > 1e-3
    assert_close(out, gamma * base_x0 + (1.0 - gamma) * tuned_x0, tol=1e-6)


# ---------------------------------------------------------------------------- inpainting
def _masked_latent():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    g = torch.Generator().manual_seed(4)
    return {"samples": torch.randn(2, 4, 8, 8, generator=g) * 0.5, "noise_mask": mask}


def test_inpainting_continuous_is_one_pass_and_restart_is_the_chain(env):
    """continuous: the kept region is the source latent noised to each step's sigma with the run's
    own noise, for both stages (one KSampler's inpainting). restart: exactly the two-node chain,
    whose second KSamplerAdvanced adds no noise and takes the first pass's noisy latent as its source."""
    latent = _masked_latent()
    local = {**env, "latent": latent}
    assert_close(combined(local, env["base"], env["twin"], "euler", 2), ksampler(local, env["base"], "euler"))
    assert_close(combined(local, env["base"], env["other"], "euler", 0), ksampler(local, env["other"], "euler"))
    cont = combined(local, env["base"], env["other"], "dpmpp_sde", 2)
    restart = combined(local, env["base"], env["other"], "dpmpp_sde", 2, handoff="restart")
    assert_close(restart, chain(local, env["base"], env["other"], "dpmpp_sde", 2))
    assert (cont - restart).abs().max().item() > 1e-4
    # continuous keeps the kept region exactly; the chain (restart) hands its second sampler the
    # base stage's noisy latent of step k as if it were the source, and leaves that noise there
    keep = latent["noise_mask"].expand_as(cont) == 0
    assert torch.allclose(cont[keep], latent["samples"][keep], atol=1e-5)
    left_noise = (restart[keep] - latent["samples"][keep]).abs().mean().item()
    print(f"restart: mean |kept region - source| = {left_noise:.4f}")
    assert left_noise > 0.05


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_restart_with_an_sde_sampler_equals_the_chain(env, sampler):
    for tuned in (env["other"], env["lora"]):
        assert_close(combined(env, env["base"], tuned, sampler, 2, handoff="restart"),
                     chain(env, env["base"], tuned, sampler, 2))


# ---------------------------------------------------------------------------- switch and denoise
def test_switch_fraction_rounds_half_up():
    from rewardtune.sampling.combined import resolve_switch_step
    assert resolve_switch_step(9, switch_fraction=0.5) == 5      # round() would give 4
    assert resolve_switch_step(7, switch_fraction=0.5) == 4      # 3.5 → 4
    assert resolve_switch_step(4, switch_fraction=0.625) == 3    # 2.5 → 3 (round() gives 2)
    assert resolve_switch_step(10, switch_fraction=0.35) == 4    # 0.35 is 0.3499… in binary
    assert resolve_switch_step(40, switch_fraction=0.74) == 30   # 29.6 → 30
    assert resolve_switch_step(40, switch_fraction=0.7375) == 30  # 29.5 → 30


def test_switch_fraction_tie_through_the_node(env):
    by_fraction = combined(env, env["base"], env["other"], "euler", 0, steps=5, switch_unit="fraction", switch_fraction=0.5)
    assert torch.equal(by_fraction, combined(env, env["base"], env["other"], "euler", 3, steps=5))


def test_denoise_below_one(env):
    """denoise < 1 runs the tail of a longer schedule, as KSampler; k counts the steps actually run."""
    src = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 0.5}
    local = {**env, "latent": src}
    assert_close(combined(local, env["base"], env["twin"], "euler", 2, denoise=0.6),
                 ksampler(local, env["base"], "euler", denoise=0.6))
    assert_close(combined(local, env["base"], env["other"], "euler", 0, denoise=0.6),
                 ksampler(local, env["other"], "euler", denoise=0.6))
    assert_close(combined(local, env["base"], env["other"], "euler", N, denoise=0.6),
                 ksampler(local, env["base"], "euler", denoise=0.6))
    full = combined(local, env["base"], env["other"], "euler", 2)
    part = combined(local, env["base"], env["other"], "euler", 2, denoise=0.6)
    assert (full - part).abs().max().item() > 1e-3
