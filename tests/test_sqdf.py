"""SQDF (tiny models, CPU): the discount, the KL at initialisation, where the gradient flows, a
held-out reward rise, α's pull towards the reference, exact resume with the buffer."""
from __future__ import annotations

import math

import pytest
import torch

from test_trainer_engine import brightness, encode, held_out_brightness, small, tiny_setup  # noqa: E402

from rewardtune.trainers.config import ConfigError  # noqa: E402
from rewardtune.trainers.engine import load_checkpoint, train  # noqa: E402
from rewardtune.trainers.sqdf import discount, kl_term, posterior  # noqa: E402


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


def test_sqdf_raises_held_out_brightness_and_alpha_keeps_the_policy_near_the_reference():
    patcher, vae = tiny_setup()
    before = held_out_brightness(patcher, vae)
    runs = {}
    for alpha in (0.0, 50.0):
        res = train(patcher, vae, brightness, sqdf_cfg(steps=30, sqdf_alpha=alpha, save_every=1000),
                    encode=encode, prompts=["a cat", "a dog"])
        runs[alpha] = (held_out_brightness(res.model, vae), sum(h["kl"] for h in res.history[-10:]) / 10)
    print(f"held-out brightness {before:.4f} -> alpha 0: {runs[0.0]}, alpha 50: {runs[50.0]}")
    assert runs[0.0][0] > before + 0.01
    assert runs[50.0][1] < runs[0.0][1]


def test_resume_mid_run_equals_uninterrupted_buffer_included(tmp_path):
    patcher, vae = tiny_setup()
    full = train(patcher, vae, brightness, sqdf_cfg(steps=4, sqdf_prioritised=True), encode=encode,
                 prompts=["p", "q"], out_dir=str(tmp_path / "full"))
    train(patcher, vae, brightness, sqdf_cfg(steps=2, sqdf_prioritised=True), encode=encode, prompts=["p", "q"],
          out_dir=str(tmp_path / "half"))
    assert len(load_checkpoint(str(tmp_path / "half" / "checkpoint.pt"))["replay"]["latents"]) == 2 * 4  # 2 steps × 4
    resumed = train(patcher, vae, brightness, sqdf_cfg(steps=4, sqdf_prioritised=True), encode=encode,
                    prompts=["p", "q"], out_dir=str(tmp_path / "half"), resume=str(tmp_path / "half" / "checkpoint.pt"))
    for k, v in full.lora.state_dict().items():
        assert torch.equal(v, resumed.lora.state_dict()[k]), k
    assert [h["reward"] for h in full.history] == [h["reward"] for h in resumed.history]


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


def test_the_lcm_snap_and_boundary_condition_match_comfyuis_lcm_sampling(tmp_path):
    import comfy_extras.nodes_model_advanced as adv  # test-only: ComfyUI's own LCM sampling as the reference
    from rewardtune.trainers.sqdf import ConsistencyModel
    patcher, _ = tiny_setup()
    cm = ConsistencyModel(patcher, _lcm_file(patcher, tmp_path))
    assert len(cm.layers) > 0
    ms_lcm = adv.ModelSamplingDiscrete().patch(patcher, "lcm", False)[0].get_model_object("model_sampling")
    sigma = torch.tensor([14.6, 3.0, 0.63, 0.2, 0.05, 0.029])
    t, s_snap = cm.snap(sigma)
    assert torch.equal(t, ms_lcm.timestep(sigma).to(t))
    assert torch.allclose(s_snap, ms_lcm.sigma(t), rtol=1e-5)
    x, eps = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    ts = (t * 10.0).view(-1, 1, 1, 1)
    ours = ts / (ts ** 2 + 0.25) ** 0.5 * (x - s_snap.view(-1, 1, 1, 1) * eps) + 0.25 / (ts ** 2 + 0.25) * x
    assert torch.allclose(ours, ms_lcm.calculate_denoised(s_snap, eps, x), atol=1e-6)


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
