"""SQDF (tiny models, CPU): the discount, the KL at initialisation, where the gradient flows, a
held-out reward rise (and fall on the negated reward), α's pull towards the reference, exact
resume with the buffer, the consistency-model jump against ComfyUI's own LCM model."""
from __future__ import annotations

import math

import pytest
import torch

from test_trainer_engine import (assert_resume_equals_uninterrupted, brightness, encode, held_out_brightness,  # noqa: E402
                                 negated, random_lora, small, tiny_setup)

from rewardtune.trainers.config import ConfigError  # noqa: E402
from rewardtune.trainers.engine import load_checkpoint, train  # noqa: E402
from rewardtune.trainers.sqdf import discount, kl_term  # noqa: E402
from rewardtune.trainers.steps import posterior  # noqa: E402


def sqdf_cfg(**kw):
    base = dict(objective="sqdf", steps=2, num_steps=6, batch_size=2, grad_accum=1, lr=1e-2, cfg=2.0,
                sqdf_collect=4, sqdf_buffer=16, sqdf_window=16, sqdf_gamma=0.9, sqdf_alpha=2.0, save_every=1)
    base.update(kw)
    return small(**base)


def test_discount_and_posterior_and_kl_by_hand():
    idx = torch.arange(6)
    assert torch.allclose(discount(0.9, 6, idx), torch.tensor([0.9 ** (5 - i) for i in range(6)]))
    assert discount(1.0, 6, idx).eq(1).all()
    x, x0 = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.5)
    mean, std = posterior(x, x0, torch.tensor(2.0).view(1, 1, 1, 1), torch.tensor(1.0).view(1, 1, 1, 1))
    assert mean.item() == pytest.approx(0.875) and std.item() == pytest.approx(math.sqrt(3) / 2)
    mean0, std0 = posterior(x, x0, torch.tensor(2.0).view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    assert mean0.item() == 0.5 and std0.item() == 0.0
    mu, ref = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    mu[0] += 0.5
    sd = torch.tensor([0.5, 0.0]).view(2, 1, 1, 1)
    exact = kl_term(mu, ref, sd, "exact")
    assert exact[0].item() == pytest.approx(16 * 0.25 / (2 * 0.25)) and exact[1].item() == 0.0  # last step: 0
    assert kl_term(mu, ref, sd, "per_dim")[0].item() == pytest.approx(exact[0].item() * 2 / 16)


def test_config_errors():
    for bad, msg in ((dict(sqdf_gamma=0.0), "discount"), (dict(sqdf_alpha=-1.0), "KL weight"),
                     (dict(sqdf_kl="half"), "sqdf_kl"), (dict(sqdf_buffer=2), "at least one step")):
        with pytest.raises(ConfigError, match=msg):
            sqdf_cfg(**bad).validate()
    patcher, vae = tiny_setup()
    with pytest.raises(ConfigError, match="SQDF samples from prompts"):
        train(patcher, vae, brightness, sqdf_cfg(), encode=encode, prompts=[])


def test_kl_is_zero_at_init_and_the_gradient_reaches_only_the_lora_through_one_step():
    patcher, vae = tiny_setup()
    unet = patcher.model.diffusion_model
    probe = unet.output_blocks[0][1].transformer_blocks[0].attn1.to_q  # an adapted layer
    calls = []

    def hook(module, args, out):
        if torch.is_grad_enabled():
            calls.append(len(module.weight_function))  # 1: LoRA on (policy), 0: off (reference)
    handle = probe.register_forward_hook(hook)
    try:
        result = train(patcher, vae, brightness, sqdf_cfg(steps=1), encode=encode, prompts=["a", "b"])
    finally:
        handle.remove()
    assert result.history[0]["kl"] == 0.0  # policy = reference before the first update
    # graph-building calls: one policy call (the one step) and one reference call for x̂0
    assert calls == [1, 0], calls
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is None for p in vae.first_stage_model.parameters())
    assert any(a.lora_down.weight.grad is not None and a.lora_down.weight.grad.abs().sum() > 0
               for a in result.lora.adapters.values())


# 30 steps: held-out brightness before, after (α = 0), after on −brightness (α = 0); mean KL over
# the last 10 steps at α = 0 and α = 50 (measured on the CPU; README "SQDF"; at α = 50 the held-out
# brightness was 0.3755). The bands are ±25% of the measured change and ratio.
SQDF_HELD_OUT = dict(before=0.3751, up=0.4086, down=0.3659, kl0=0.1088, kl50=0.0134)


@pytest.mark.slow
def test_sqdf_raises_held_out_brightness_and_alpha_keeps_the_policy_near_the_reference():
    """30 steps on brightness raise it on held-out seeds and prompt by about the measured amount,
    −brightness lowers it (negative control); α = 50 cuts the policy's KL to the reference by the
    measured ratio and the reward then barely moves."""
    patcher, vae = tiny_setup()
    before = held_out_brightness(patcher, vae)
    runs = {}
    for name, alpha, reward in (("up", 0.0, brightness), ("down", 0.0, negated(brightness)),
                                ("alpha50", 50.0, brightness)):
        res = train(patcher, vae, reward, sqdf_cfg(steps=30, sqdf_alpha=alpha, save_every=1000),
                    encode=encode, prompts=["a cat", "a dog"])
        runs[name] = (held_out_brightness(res.model, vae), sum(h["kl"] for h in res.history[-10:]) / 10)
    print(f"SQDF: held-out brightness {before:.4f} -> " +
          ", ".join(f"{k}: {v[0]:.4f} (KL {v[1]:.4f})" for k, v in runs.items()))
    m = SQDF_HELD_OUT
    rise = runs["up"][0] - before
    assert before == pytest.approx(m["before"], abs=1e-3)
    assert rise == pytest.approx(m["up"] - m["before"], rel=0.25), runs
    assert before - runs["down"][0] == pytest.approx(m["before"] - m["down"], rel=0.25), runs
    ratio = runs["alpha50"][1] / runs["up"][1]
    assert ratio == pytest.approx(m["kl50"] / m["kl0"], rel=0.25), runs
    assert abs(runs["alpha50"][0] - before) < 0.25 * rise, runs


@pytest.mark.slow
def test_resume_mid_run_equals_uninterrupted_buffer_included(tmp_path):
    patcher, vae = tiny_setup()
    full = train(patcher, vae, brightness, sqdf_cfg(steps=4, sqdf_prioritised=True), encode=encode,
                 prompts=["p", "q"], out_dir=str(tmp_path / "full"))
    train(patcher, vae, brightness, sqdf_cfg(steps=2, sqdf_prioritised=True), encode=encode, prompts=["p", "q"],
          out_dir=str(tmp_path / "half"))
    assert len(load_checkpoint(str(tmp_path / "half" / "checkpoint.pt"))["replay"]["latents"]) == 2 * 4  # 2 steps × 4
    resumed = train(patcher, vae, brightness, sqdf_cfg(steps=4, sqdf_prioritised=True), encode=encode,
                    prompts=["p", "q"], out_dir=str(tmp_path / "half"), resume=str(tmp_path / "half" / "checkpoint.pt"))
    assert_resume_equals_uninterrupted(str(tmp_path / "full"), str(tmp_path / "half"), full, resumed)


def test_on_policy_ablation_runs():
    patcher, vae = tiny_setup()
    res = train(patcher, vae, brightness, sqdf_cfg(sqdf_use_buffer=False, sqdf_gamma=1.0), encode=encode,
                prompts=["p"])
    assert res.step == 2 and all(math.isfinite(h["reward"]) for h in res.history)


def _lcm_file(patcher, tmp_path, seed=9):
    from safetensors.torch import save_file
    from rewardtune.testing import tiny_models as tm
    path = tmp_path / "tiny_lcm_lora.safetensors"
    save_file(tm.lora_state_dict(patcher.model, seed=seed, scale=1.0), str(path))  # a tiny random "LCM-LoRA"
    return str(path)


def _inside_sampling(model, fn, x, cfg_scale):
    """Runs ``fn(model_wrap, extra_args)`` where ComfyUI's sampling has prepared ``model`` (the
    guider, conds, options), as the engine's training steps run; returns what it returns."""
    import comfy.samplers
    from rewardtune.trainers.engine import StepSampler
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(encode("a lighthouse"), encode(""))
    guider.set_cfg(cfg_scale)
    sampler = StepSampler(lambda model_wrap, sigmas, extra_args, noise, latent: fn(model_wrap, extra_args))
    guider.sample(x, torch.zeros_like(x), sampler, torch.tensor([1.0, 0.0]), seed=0)
    return sampler.out


def test_the_consistency_jump_equals_comfyuis_lcm_model(host, tmp_path):
    """``ConsistencyModel.jump`` (policy LoRA on, CFG 2: the jump must switch both off) against
    what a user's LCM workflow computes: the same LCM-LoRA loaded as LoraLoader does, the model
    patched by ComfyUI's own ModelSamplingDiscrete node with sampling "lcm", evaluated at the
    snapped σ̃ with CFG 1 — snapping, input scaling, x0 at σ̃ and the boundary condition included."""
    import comfy.sd
    import comfy.utils
    from rewardtune.testing import tiny_models as tm
    from rewardtune.trainers.sqdf import ConsistencyModel
    from rewardtune.trainers.steps import StepContext
    patcher = tm.tiny_model_patcher(seed=0, unit_scale=True)  # no x0 wrapper: the LCM formula is the model's own
    path = _lcm_file(patcher, tmp_path)
    node = host.node_classes["ModelSamplingDiscrete"]
    lcm_sd = comfy.utils.load_torch_file(path, safe_load=True)
    with_lcm = comfy.sd.load_lora_for_models(patcher, None, lcm_sd, 1.0, 0.0)[0]  # what LoraLoader calls
    lcm_model = getattr(node(), node.FUNCTION)(with_lcm, "lcm", False)[0]
    ms_lcm = lcm_model.get_model_object("model_sampling")

    cm = ConsistencyModel(patcher, path)
    sigma = torch.tensor([14.6, 3.0, 0.63, 0.2, 0.05, 0.029])  # off the LCM grid
    t, s_snap = cm.snap(sigma)
    assert torch.equal(t, ms_lcm.timestep(sigma).to(t))
    assert torch.equal(s_snap, ms_lcm.sigmas[(t.long() - 19) // 20])  # its 50-step grid: t = 19, 39, …, 999
    assert (s_snap - sigma).abs().max() > 1e-3  # the snap does something here

    tuned, policy = random_lora(patcher, 0.2, 0.2)
    # unit-scale x: the boundary condition's c_skip·x (7e-6·x at t = 19) must show above the tolerance
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def jump(model_wrap, extra_args):
        ctx = StepContext(model_wrap, None, extra_args, None, None, reference=policy.disabled)
        with torch.no_grad():
            return cm.jump(ctx, x, sigma)
    ours = _inside_sampling(tuned, jump, x, cfg_scale=2.0)
    assert all(len(m.weight_function) == 1 for m in policy.modules.values())  # the policy LoRA is back
    with torch.no_grad():
        theirs = _inside_sampling(lcm_model, lambda mw, extra: mw(x, s_snap, **extra), x, cfg_scale=1.0)
        base = _inside_sampling(patcher, lambda mw, extra: mw(x, s_snap, **extra), x, cfg_scale=1.0)
    err, effect = (ours - theirs).abs().max().item(), (base - theirs).abs().max().item()
    print(f"jump vs ComfyUI's LCM model: max |diff| {err:.3g} (LCM vs plain ε model: {effect:.3g})")
    assert effect > 1e-2  # the LCM weights and boundary condition matter at this size
    assert err <= 1e-6, (err, effect)  # measured: 0 (bitwise)


def test_with_an_lcm_lora_the_consistency_path_is_used(tmp_path):
    patcher, vae = tiny_setup()
    path = _lcm_file(patcher, tmp_path)
    plain = train(patcher, vae, brightness, sqdf_cfg(steps=1), encode=encode, prompts=["a", "b"])
    lcm = train(patcher, vae, brightness, sqdf_cfg(steps=1, sqdf_lcm_lora=path), encode=encode, prompts=["a", "b"])
    assert lcm.history[0]["collect_reward"] == plain.history[0]["collect_reward"]  # the same trajectories …
    assert lcm.history[0]["reward"] != plain.history[0]["reward"]  # … but another x̂0
    assert lcm.history[0]["kl"] == 0.0
    assert not [f for m in patcher.model.diffusion_model.modules() for f in getattr(m, "weight_function", [])
                if getattr(f, "__name__", "") == "lcm"]  # the LCM weights were switched off again
    with pytest.raises(ConfigError, match="cannot read the LCM-LoRA"):
        train(patcher, vae, brightness, sqdf_cfg(steps=1, sqdf_lcm_lora=str(tmp_path / "nope.safetensors")),
              encode=encode, prompts=["a"])
