"""Reward fine-tuning (ReFL, ImageReFL, SQDF) on flow-matching transformers (tiny models, CPU).

Flux dev and SD3.5 are the tiny detectable files of test_flow_models.py, loaded with UNETLoader;
Z-Image is the tiny model of the same ``ZImage`` config class (its smallest detectable file has
718M parameters). The VAE is a random TAESD with 16 latent channels (the TAEF1/TAESD3 layout).
Checked: the flow step equals ComfyUI's own ``euler_ancestral`` step (and the DDPM step on SD1.5),
the diffusion term is the velocity loss, the training schedule is sane, SQDF's KL is 0 at
initialisation, a held-out reward rises (and falls on the negated reward), the saved LoRA reloads
through LoraLoader with every key on a weight and reproduces the tuned model, resume is bit-exact,
gradient checkpointing gives the same gradients.
"""
from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from test_flow_models import flow_tree, load_base, one_torch_thread  # noqa: F401  (fixtures)
from test_trainer_engine import assert_resume_equals_uninterrupted, brightness, negated

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.utils  # noqa: E402

from rewardtune.testing import tiny_flow_models as tf  # noqa: E402
from rewardtune.trainers.config import TrainConfig  # noqa: E402
from rewardtune.trainers.data import examples_from_graph  # noqa: E402
from rewardtune.trainers.engine import StepSampler, train  # noqa: E402
from rewardtune.trainers.objectives import diffusion_mse  # noqa: E402
from rewardtune.trainers.steps import DDPM, RectifiedFlow, sampling_steps  # noqa: E402


def _sane_flow_denoiser(apply, args):
    """x0 = (1 − σ)·x / ((1 − σ)² + σ²) (the ideal denoiser for unit-variance data under
    x = (1 − σ)·x0 + σ·ε) plus the random transformer's correction −σ·v̂: keeps a random tiny
    model's samples in the range the VAE decodes, so rewards respond to the weights."""
    x, sigma = args["input"], args["timestep"].view(-1, 1, 1, 1)
    return (1 - sigma) * x / ((1 - sigma) ** 2 + sigma ** 2) + (apply(x, args["timestep"], **args["c"]) - x)


def flow_setup(host, fam):
    """The family's base MODEL as a user loads it (UNETLoader; Z-Image: the tiny ZImage model),
    cloned, with the sane-denoiser wrapper; the 16-channel VAE; an ``encode`` for captions."""
    patcher = load_base(host, fam).clone()
    patcher.set_model_unet_function_wrapper(_sane_flow_denoiser)
    vae = tf.tiny_flow_vae(seed=2)
    guidance = 3.5 if fam == "flux_dev" else None

    def encode(text):
        return tf.flow_conditioning(patcher, sum(map(ord, text)) % 997, guidance=guidance)
    return patcher, vae, encode


def flow_cfg(**kw):
    """Small runs: 10-step grid, late windows, 64 px (8×8×16 latents), CFG 1 (Flux dev is
    guidance-distilled: its users sample at CFG 1), LoRA targets "auto" by default (the list)."""
    base = dict(objective="refl", steps=2, batch_size=2, grad_accum=1, lr=1e-2, rank=4, alpha=4.0, num_steps=10,
                refl_stop_min=6, refl_stop_max=9, imagerefl_start=6, imagerefl_tf_min=6, imagerefl_tf_max=9,
                width=64, height=64, cfg=1.0, save_every=1, sqdf_collect=4, sqdf_buffer=16, sqdf_window=16,
                sqdf_alpha=0.0)
    if kw.get("objective") == "sqdf":
        base["num_steps"] = 6
    base.update(kw)
    return TrainConfig(**base)


def real_images(n=4):
    g = torch.Generator().manual_seed(4)
    return examples_from_graph(torch.rand(n, 64, 64, 3, generator=g), [f"caption {i}" for i in range(n)], 64, 64)


def held_out_brightness(model, vae, encode) -> float:
    """Mean brightness of 4 samples from seeds, a prompt and a sampler (euler, simple schedule)
    never used in training (training steps are the rectified-flow ancestral step on ddim_uniform)."""
    lat = torch.zeros(4, 16, 8, 8)
    noise = comfy.sample.prepare_noise(lat, 1234)
    out = comfy.sample.sample(model, noise, 10, 1.0, "euler", "simple", encode("held out prompt"), encode(""), lat,
                              seed=1234, disable_pbar=True)
    with torch.no_grad():
        return float(vae.decode(out).mean())


def _in_sampling(patcher, encode, fn, x, sigmas, cfg=1.0):
    """``fn(model_wrap, extra_args)`` where ComfyUI's sampling has prepared the model, as the
    engine's steps run."""
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(encode("a lighthouse"), encode(""))
    guider.set_cfg(cfg)
    sampler = StepSampler(lambda model_wrap, sig, extra_args, noise, latent: fn(model_wrap, extra_args))
    guider.sample(x, torch.zeros_like(x), sampler, sigmas, seed=0)
    return sampler.out


# ------------------------------------------------------------------------------ the step formulas
STEP_PAIRS = ((1.0, 0.8), (0.7, 0.4), (0.3, 0.05), (0.2, 0.0))


def _comfy_one_step(model_wrap, extra_args, x, s, sp, noise):
    """ONE step of ComfyUI's own ``k_diffusion.sampling.sample_euler_ancestral`` from σ = s to sp, with
    ``noise`` as its noise; returns (x', the x0 prediction it used)."""
    import comfy.k_diffusion.sampling as kds
    seen = {}
    model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, torch.tensor([s, sp]))
    out = kds.sample_euler_ancestral(model_k, x, torch.tensor([s, sp]), extra_args={**extra_args, "denoise_mask": None},
                                     callback=lambda d: seen.setdefault("x0", d["denoised"]), disable=True,
                                     noise_sampler=lambda a, b: noise)
    return out, seen["x0"]


def _ours_and_comfys_step(steps, model, encode, x, s, sp, noise):
    """One step σ = s → sp from x: ComfyUI's own euler_ancestral step (called for real) and
    ``steps.step`` given the same x0 prediction and noise."""
    def both(model_wrap, extra_args):
        with torch.no_grad():
            theirs, x0 = _comfy_one_step(model_wrap, extra_args, x, s, sp, noise)
        return theirs, steps.step(x, x0, torch.tensor(s), torch.tensor(sp), noise)
    return _in_sampling(model, encode, both, x, torch.tensor([s, sp]))


@pytest.mark.parametrize("fam", ["flux_dev", "sd35"])
def test_flow_step_equals_comfyuis_euler_ancestral_step(host, flow_tree, fam):
    """RectifiedFlow.step == one step of ComfyUI's sample_euler_ancestral (which dispatches to its RF
    variant on CONST models), called for real on the tiny model, to 1e-6, for several (σ, σ')
    including σ' = 0; sampling_steps picks RectifiedFlow from model_sampling."""
    patcher, _, encode = flow_setup(host, fam)
    ms = patcher.get_model_object("model_sampling")
    assert sampling_steps(ms) is RectifiedFlow
    g = torch.Generator().manual_seed(0)
    for s, sp in STEP_PAIRS:
        x = torch.randn(2, 16, 8, 8, generator=g)
        noise = torch.randn(2, 16, 8, 8, generator=g)

        theirs, ours = _ours_and_comfys_step(RectifiedFlow, patcher, encode, x, s, sp, noise)
        err = (theirs - ours).abs().max().item()
        assert err <= 1e-6, (fam, s, sp, err)
        mean, std = RectifiedFlow.posterior(x, x, torch.tensor(s), torch.tensor(sp))
        if sp == 0.0:
            assert float(std) == 0.0
    # the marginal is kept: x = (1 − s)·x0 + s·ε steps to a sample of (1 − sp)·x0 + sp·ε'
    x0, eps = torch.randn(200_000), torch.randn(200_000)
    s, sp = torch.tensor(0.9), torch.tensor(0.35)
    mean, std = RectifiedFlow.posterior((1 - s) * x0 + s * eps, x0, s, sp)
    residual = (mean - (1 - sp) * x0) / sp
    assert (residual.var() + std ** 2 / sp ** 2).item() == pytest.approx(1.0, abs=1e-2)


def test_ddpm_step_equals_comfyuis_euler_ancestral_step(host, models_tree):
    """The same check for DDPM on the tiny SD1.5 checkpoint (ε model: the non-RF branch)."""
    model, clip, _ = host.node_classes["CheckpointLoaderSimple"]().load_checkpoint(models_tree["sd15"])[:3]
    ms = model.get_model_object("model_sampling")
    assert sampling_steps(ms) is DDPM

    def encode(text):
        return host.node_classes["CLIPTextEncode"]().encode(clip, text)[0]
    g = torch.Generator().manual_seed(0)
    for s, sp in ((14.0, 6.0), (3.0, 1.0), (0.5, 0.0)):
        x = torch.randn(1, 4, 8, 8, generator=g) * s
        noise = torch.randn(1, 4, 8, 8, generator=g)

        theirs, ours = _ours_and_comfys_step(DDPM, model, encode, x, s, sp, noise)
        err = ((theirs - ours).abs().max() / theirs.abs().max()).item()
        assert err <= 1e-6, (s, sp, err)


def test_diffusion_mse_is_the_flow_matching_velocity_loss(host, flow_tree):
    """For x = (1 − σ)·x0 + σ·ε the x0-form MSE equals ‖v̂ − v‖², v = ε − x0, with v̂ the raw
    transformer output (the model's x̂0 is ComfyUI's calculate_denoised of it)."""
    patcher, _, encode = flow_setup(host, "flux_dev")
    model = patcher.model
    mm.load_models_gpu([patcher])
    ms = model.model_sampling
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    x = ms.noise_scaling(sigma, eps, x0)
    cond = encode("a cat")[0]
    context, pooled = cond[0].expand(2, -1, -1), cond[1]["pooled_output"].expand(2, -1)
    with torch.no_grad():
        v_hat = model.diffusion_model(x, ms.timestep(sigma), context=context, y=pooled,
                                      guidance=torch.full((2,), 3.5)).float()
    x0_hat = ms.calculate_denoised(sigma, v_hat, x)
    velocity_loss = ((v_hat - (eps - x0)) ** 2).mean()
    assert diffusion_mse(x0_hat, x0, sigma).item() == pytest.approx(velocity_loss.item(), rel=1e-5)
    assert velocity_loss.item() > 0.1


@pytest.mark.parametrize("fam", ["flux_dev", "flux_schnell", "sd35"])
def test_the_training_schedule_on_flow_models_is_sane(host, flow_tree, fam):
    """ddim_uniform (the papers' DDPM grid t = 1, 1 + k, …) on a flow model's own shifted schedule:
    N + 1 values, strictly decreasing, starting near σ_max = 1 (the last of the grid's timesteps),
    ending at 0."""
    ms = load_base(host, fam).get_model_object("model_sampling")
    for n in (10, 40):
        sig = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", n)
        assert len(sig) == n + 1 and float(sig[-1]) == 0.0
        assert bool((sig[1:] < sig[:-1]).all())
        assert 0.9 < float(sig[0]) <= 1.0, sig


# ------------------------------------------------------------------------------ training
# Held-out brightness before, after training on brightness, after on −brightness (measured on
# the CPU with the settings of the test below). The bands are ±40% of the measured change.
HELD_OUT = {("flux_dev", "refl"): (0.5969, 0.6051, 0.5900), ("flux_dev", "imagerefl"): (0.5969, 0.6068, 0.5891),
            ("flux_dev", "sqdf"): (0.5969, 0.6049, 0.5907), ("sd35", "refl"): (0.2845, 0.2959, 0.2713),
            ("zimage", "refl"): (0.5962, 0.6014, 0.5945)}


def _rise_and_fall(host, fam, objective, steps, **kw):
    patcher, vae, encode = flow_setup(host, fam)
    before = held_out_brightness(patcher, vae, encode)
    after = {}
    for sign, reward in ((+1, brightness), (-1, negated(brightness))):
        result = train(patcher, vae, reward, flow_cfg(objective=objective, steps=steps, save_every=1000, **kw),
                       encode=encode, prompts=["a cat", "a dog"], images=real_images())
        after[sign] = held_out_brightness(result.model, vae, encode)
    print(f"{fam} {objective}: held-out brightness {before:.4f} -> {after[+1]:.4f} (+), {after[-1]:.4f} (-)")
    assert held_out_brightness(patcher, vae, encode) == before  # the graph's model is unchanged
    return before, after


@pytest.mark.parametrize("fam,objective,steps,lr", [("flux_dev", "refl", 12, 1e-2), ("flux_dev", "imagerefl", 12, 1e-2),
                                                    ("flux_dev", "sqdf", 8, 1e-2), ("sd35", "refl", 12, 1e-2),
                                                    ("zimage", "refl", 8, 2e-2)])
@pytest.mark.slow
def test_training_raises_a_held_out_reward_and_the_negated_reward_lowers_it(host, flow_tree, fam, objective, steps, lr):
    """Training on brightness through the real engine raises it on held-out seeds, a held-out prompt
    and a sampler never trained with, by about the measured amount; the same run on −brightness
    (the negative control) lowers it."""
    before, after = _rise_and_fall(host, fam, objective, steps, lr=lr)
    b0, up, down = HELD_OUT[(fam, objective)]
    assert before == pytest.approx(b0, abs=1e-3)
    assert after[+1] - before == pytest.approx(up - b0, rel=0.4), (before, after)
    assert before - after[-1] == pytest.approx(b0 - down, rel=0.4), (before, after)


def test_sqdf_kl_is_zero_at_initialisation_on_a_flow_model(host, flow_tree):
    """Policy and reference means come from the same RectifiedFlow posterior with the same std:
    before the first update (LoRA zero) the KL is exactly 0; after it, positive. No LCM-LoRA
    exists for flow models: x̂0 is the reference's one-step prediction (ConsistencyModel refuses
    a non-ε model, see test_sqdf)."""
    patcher, vae, encode = flow_setup(host, "flux_dev")
    result = train(patcher, vae, brightness, flow_cfg(objective="sqdf", steps=2, lr=5e-2), encode=encode,
                   prompts=["a", "b"])
    assert result.history[0]["kl"] == 0.0
    assert result.history[1]["kl"] > 0.0 and math.isfinite(result.history[1]["reward"])


def test_lora_targets_auto_and_the_default_on_every_family(host, flow_tree, models_tree):
    """The default targets (the papers' UNet attention projections) stay exactly those on SD1.5;
    on a flow transformer, where no layer is called to_q…, they mean "auto": every linear layer of
    the transformer blocks (attention q/k/v/out, MLP, modulation), nothing outside them."""
    from rewardtune.trainers.lora import UNET_ATTENTION, target_modules
    sd15 = host.node_classes["CheckpointLoaderSimple"]().load_checkpoint(models_tree["sd15"])[0].model.diffusion_model
    default = TrainConfig().targets
    assert tuple(default) == UNET_ATTENTION
    picked = [n for n, _ in target_modules(sd15, default)]
    assert picked and all(n.endswith(UNET_ATTENTION) for n in picked)
    assert [n for n, _ in target_modules(sd15, ["auto"])] == picked
    blocks = {"flux_dev": ("double_blocks", "single_blocks"), "sd35": ("joint_blocks",),
              "zimage": ("layers", "noise_refiner", "context_refiner")}
    for fam, lists in blocks.items():
        dm = load_base(host, fam).model.diffusion_model
        auto = [n for n, _ in target_modules(dm, ["auto"])]
        assert auto == [n for n, _ in target_modules(dm, default)], fam
        linears = [n for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[0] in lists]
        assert auto == sorted(linears), fam
        explicit = [n for n, _ in target_modules(dm, ["qkv"])]  # explicit targets still mean name endings
        assert explicit and explicit == sorted(n for n in linears if n.endswith("qkv")), fam


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["flux_dev", "sd35", "zimage"])
def test_saved_lora_loads_through_loraloader_and_reproduces_the_tuned_model(host, flow_tree, fam, caplog):
    """The trained LoRA (diffusion_model.<module>.lora_up/down/alpha) loads through ComfyUI's
    LoraLoaderModelOnly with every key on a weight (no "lora key not loaded"), one patch per
    adapter, and sampling with it equals sampling with the in-memory tuned model."""
    patcher, vae, encode = flow_setup(host, fam)
    out_dir = os.path.join(flow_tree_root(flow_tree), "loras", f"rt_trained_{fam}")
    result = train(patcher, vae, brightness, flow_cfg(steps=3, lr=5e-2), encode=encode, prompts=["p", "q"],
                   out_dir=out_dir)
    with caplog.at_level(logging.WARNING):
        loaded = host.node_classes["LoraLoaderModelOnly"]().load_lora_model_only(
            patcher, f"rt_trained_{fam}/lora.safetensors", 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == len(result.lora.adapters) == len(comfy.utils.load_torch_file(result.lora_path)) // 3

    def sample(model):
        lat = torch.zeros(2, 16, 8, 8)
        return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 11), 6, 1.0, "euler", "simple",
                                   encode("held"), encode(""), lat, seed=11, disable_pbar=True)
    a, b, base = sample(result.model), sample(loaded), sample(patcher)
    assert (a - b).abs().max() <= 1e-5
    assert (a - base).abs().max() > 1e-4  # the LoRA does something


def flow_tree_root(flow_tree):
    return os.path.dirname(os.path.dirname(flow_tree["written"]["flux_dev"].path))


@pytest.mark.slow
def test_resume_equals_uninterrupted_on_flux(host, flow_tree, tmp_path):
    """SQDF (replay buffer, prioritised sampling) on Flux dev: 2 steps, a restart, 2 more == 4 in one go."""
    patcher, vae, encode = flow_setup(host, "flux_dev")
    kw = dict(objective="sqdf", sqdf_prioritised=True)
    data = dict(encode=encode, prompts=["p", "q"])
    full = train(patcher, vae, brightness, flow_cfg(steps=4, **kw), out_dir=str(tmp_path / "full"), **data)
    train(patcher, vae, brightness, flow_cfg(steps=2, **kw), out_dir=str(tmp_path / "half"), **data)
    resumed = train(patcher, vae, brightness, flow_cfg(steps=4, **kw), out_dir=str(tmp_path / "half"),
                    resume=str(tmp_path / "half" / "checkpoint.pt"), **data)
    assert_resume_equals_uninterrupted(str(tmp_path / "full"), str(tmp_path / "half"), full, resumed)


def test_gradient_checkpointing_on_flux_gives_the_same_gradients(host, flow_tree):
    """Flux's blocks add residuals in place; with checkpointing each double/single block runs again
    in the backward pass, and the LoRA gradients equal those of the plain run."""
    patcher, vae, encode = flow_setup(host, "flux_dev")
    dm = patcher.model.diffusion_model
    calls = []
    handle = dm.single_blocks[0].linear2.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))

    def grads(**kw):
        result = train(patcher, vae, brightness, flow_cfg(steps=1, lr=1e-9, **kw), encode=encode, prompts=["p"])
        return {n: a.lora_down.weight.grad.clone() for n, a in result.lora.adapters.items()}
    try:
        plain = grads()
        n_plain = len(calls)
        calls.clear()
        ckpt = grads(grad_checkpointing=True)
    finally:
        handle.remove()
    assert len(calls) == n_plain + 1 and calls.count(True) == 2
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        assert torch.allclose(g, ckpt[name], rtol=1e-4, atol=1e-10), (name, (g - ckpt[name]).abs().max())
    assert not [m for m in dm.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("fam,objective", [("flux_dev", "refl"), ("sd35", "refl"), ("zimage", "refl"),
                                           ("flux_dev", "imagerefl"), ("flux_dev", "sqdf")])
@pytest.mark.slow
def test_memory_estimate_on_a_flow_model_is_within_10_percent_and_checks_the_run(host, flow_tree, fam, objective):
    """The FakeTensor estimate rebuilds a flow transformer's step through its BaseModel's
    ``apply_model`` with the conds of its own ``extra_conds`` (no UNet ``context_dim``): each step
    kind's estimate is within 10 % of the same tracker on the real tiny step, and the node's check
    (``check_budget`` with a budget) estimates the run instead of training it unchecked."""
    from rewardtune.trainers import memory
    patcher, vae, _ = flow_setup(host, fam)

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))
    cfg = flow_cfg(objective=objective).validate()
    est = memory.estimate(patcher, vae, reward, cfg)
    assert set(est.per_kind) == set(memory.objective_kinds(cfg))
    for kind, peak in est.per_kind.items():
        real, parts = memory.measure_peak_bytes(patcher, vae, reward, cfg, kind)
        assert abs(peak / real - 1) < 0.10, (kind, peak, real, est.breakdown[kind], parts)
        if kind != "sqdf_collect":  # the step with gradients, not only the weights
            assert parts["Activation"] + parts.get("Temp", 0) > 0.2 * real, (kind, parts)
    assert all(not m.__dict__.get("weight_function") for m in patcher.model.diffusion_model.modules())

    line, peak, budget = memory.check_budget(flow_cfg(objective=objective, memory_budget_gb=64), patcher, vae,
                                             reward)
    assert "not checked" not in line and "fits the 64.0 GiB available" in line, line
    assert peak == est.peak and budget == 64 * memory.GiB
