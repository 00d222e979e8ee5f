"""Combined generation on flow-matching transformers: Flux dev / schnell, SD3.5 (MMDiT), Z-Image.

Flux and SD3.5 are tiny random-weight files ComfyUI's own detection maps to those families, written
to the test models tree's ``diffusion_models`` folder and loaded with ``UNETLoader``; their LoRAs
(diffusers layout) with ``LoraLoaderModelOnly``. Z-Image's smallest detectable file has 718M
parameters (Lumina 2's 334M): their detection is checked on shapes, and combined generation runs on
a 3.3M-parameter model of the same ``ZImage`` config class (see testing/tiny_flow_models.py).
Text encoders of these families are billions of parameters: conditioning is made as tensors.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from rewardtune.testing.workflow import combined_switch_inputs
from test_combined_sampler import raises_named  # noqa: E402  (the node's error class compared by name)


STEPS = 4
K = 2
SCHEDULER = "simple"
FAMILIES = ("flux_dev", "flux_schnell", "sd35", "zimage")
FILES = {"flux_dev": "rt_tiny_flux_dev.safetensors", "flux_schnell": "rt_tiny_flux_schnell.safetensors",
         "sd35": "rt_tiny_sd35.safetensors"}
# What ComfyUI must detect each file (or the tiny model) as: (model config, schedule class, prediction class)
EXPECTED = {"flux_dev": ("Flux", "ModelSamplingFlux", "CONST"),
            "flux_schnell": ("FluxSchnell", "ModelSamplingDiscreteFlow", "CONST"),
            "sd35": ("SD3", "ModelSamplingDiscreteFlow", "CONST"),
            "zimage": ("ZImage", "ModelSamplingDiscreteFlow", "CONST")}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a loaded 2-core machine torch's two threads wait on each other: a 1M-parameter Flux call
    took 0.85 s with two threads and 0.03 s with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def flow_tree(models_tree):
    """Tiny Flux dev / schnell / SD3.5 files in diffusion_models/, a diffusers-layout LoRA per family in loras/."""
    from rewardtune.testing import tiny_flow_models as tf
    root = models_tree["root"]
    written = {fam: tf.write_flow_unet(os.path.join(root, "diffusion_models", name), fam, seed=i)
               for i, (fam, name) in enumerate(FILES.items())}
    loras = {}
    for i, fam in enumerate(FAMILIES):
        loras[fam] = f"rt_tiny_{fam}_lora.safetensors"
        tf.write_flow_lora(os.path.join(root, "loras", loras[fam]), tf.build_flow_model(fam), seed=10 + i, scale=1.0)
    return {"files": FILES, "written": written, "loras": loras, "sd15": models_tree["sd15"]}


_ENVS = {}


def load_base(host, fam, seed_offset=0):
    """The family's base MODEL as a user gets it: UNETLoader (Z-Image: the tiny ZImage-class model)."""
    from rewardtune.testing import tiny_flow_models as tf
    if fam == "zimage":
        return tf.tiny_zimage_patcher(seed=3 + seed_offset)
    return host.node_classes["UNETLoader"]().load_unet(FILES[fam], "default")[0]


def env_for(host, flow_tree, fam):
    if fam not in _ENVS:
        from rewardtune.testing import tiny_flow_models as tf
        nodes = host.node_classes
        base = load_base(host, fam)
        tuned = nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, flow_tree["loras"][fam], 1.0)[0]
        _ENVS[fam] = {
            "nodes": nodes, "base": base, "lora": tuned,
            "pos": tf.flow_conditioning(base, 1, guidance=3.5 if fam == "flux_dev" else None),
            "neg": tf.flow_conditioning(base, 2, guidance=3.5 if fam == "flux_dev" else None),
            "latent": {"samples": torch.zeros(1, 16, 8, 8)},  # a 64 px image
        }
    return _ENVS[fam]


def ksampler(env, model, sampler, cfg, steps=STEPS, seed=5, positive=None):
    return env["nodes"]["KSampler"]().sample(model, seed, steps, cfg, sampler, SCHEDULER, positive or env["pos"],
                                             env["neg"], env["latent"], 1.0)[0]["samples"]


def combined(env, base, tuned, sampler, k, cfg_base=3.0, cfg_tuned=1.0, steps=STEPS, seed=5, handoff="continuous",
             unit="step", fraction=0.0, positive=None, tuned_positive=None):
    return env["nodes"]["RewardTuneCombinedKSampler"].execute(
        base_model=base, tuned_model=tuned, positive=positive or env["pos"], negative=env["neg"],
        latent_image=env["latent"], seed=seed, steps=steps,
        **combined_switch_inputs(switch_unit=unit, switch_step=k, switch_fraction=fraction, api=False),
        cfg_base=cfg_base, cfg_tuned=cfg_tuned, sampler_name=sampler,
        scheduler=SCHEDULER, handoff=handoff, denoise=1.0, tuned_positive=tuned_positive).args[0]["samples"]


def chain(env, base, tuned, sampler, k, cfg_base=3.0, cfg_tuned=1.0, steps=STEPS, seed=5, positive=None,
          tuned_positive=None):
    """KSamplerAdvanced(base, 0 → k, leftover noise) → KSamplerAdvanced(tuned, k → N, no noise)."""
    adv = env["nodes"]["KSamplerAdvanced"]()
    first = adv.sample(base, "enable", seed, steps, cfg_base, sampler, SCHEDULER, positive or env["pos"], env["neg"],
                       env["latent"], 0, k, "enable")[0]
    return adv.sample(tuned, "disable", seed, steps, cfg_tuned, sampler, SCHEDULER, tuned_positive or positive or env["pos"],
                      env["neg"], first, k, 10000, "disable")[0]["samples"]


def on_base_sigmas(env, base, tuned, sampler, k, cfg_base=3.0, cfg_tuned=1.0, steps=STEPS, seed=5):
    """The SplitSigmas workflow: both stages run on the base model's schedule (two CFGGuider passes)."""
    import comfy.sample
    import comfy.samplers
    from rewardtune.sampling.combined import ksampler_sigmas
    sigmas = ksampler_sigmas(base, steps, sampler, SCHEDULER)
    latent = env["latent"]["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    out = latent
    for model, cfg, sig in ((base, cfg_base, sigmas[:k + 1]), (tuned, cfg_tuned, sigmas[k:])):
        if sig.shape[-1] < 2:
            continue
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(env["pos"], env["neg"])
        g.set_cfg(cfg)
        out = g.sample(noise, out, comfy.samplers.sampler_object(sampler), sig, seed=seed, disable_pbar=True).float().cpu()
        noise = torch.zeros_like(noise)  # the second stage continues from the first one's noisy latent
    return out


def rel_diff(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


FIGURES = {}


def record(name, value):
    FIGURES[name] = max(FIGURES.get(name, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    for name, value in sorted(FIGURES.items()):
        print(f"[flow figures] {name}: {value:.3g}")


# ------------------------------------------------------------------------------------------ detection
def test_files_are_detected_as_their_families(host, flow_tree):
    from rewardtune.sampling.combined import describe_model
    for fam in FAMILIES:
        model = env_for(host, flow_tree, fam)["base"]
        config, schedule, prediction = EXPECTED[fam]
        assert type(model.model.model_config).__name__ == config, describe_model(model)
        assert schedule in describe_model(model) and prediction in describe_model(model)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        print(f"[flow figures] {fam}: {config}, {params} parameters")
        assert params < 3.5e6
    for fam in FILES:
        assert flow_tree["written"][fam].parameters < 1.2e6


def test_smallest_zimage_and_lumina2_shapes_are_detected():
    """Detection reads shapes only: the smallest configs ComfyUI maps to Z-Image / Lumina 2."""
    import comfy.supported_models as sm
    from rewardtune.testing import tiny_flow_models as tf
    for cls, cfg, expected in ((sm.ZImage, tf.ZIMAGE_DETECTABLE, 717880928), (sm.Lumina2, tf.LUMINA2_DETECTABLE, 334405216)):
        shapes = tf.detectable_shapes(cls, cfg)
        assert type(tf.detect(shapes)).__name__ == cls.__name__
        assert sum(v.numel() for v in shapes.values()) == expected
    # negative control: at the tiny width the detector no longer calls it Z-Image
    assert type(tf.detect(tf.detectable_shapes(sm.ZImage, tf.ZIMAGE_TINY))).__name__ != "ZImage"


def test_lora_keys_all_land_on_weights(host, flow_tree, caplog):
    """Every key of the diffusers-layout LoRA is read by ComfyUI's LoRA loader and patches a weight."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    import folder_paths
    names = {"flux_dev": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
                          "transformer.single_transformer_blocks.0.attn.to_v", "transformer.single_transformer_blocks.0.proj_mlp"],
             "sd35": ["transformer.transformer_blocks.1.attn.to_q", "transformer.transformer_blocks.0.ff.net.0.proj"],
             "zimage": ["transformer.layers.0.attention.to_q", "transformer.noise_refiner.1.feed_forward.w2"]}
    for fam in FAMILIES:
        env = env_for(host, flow_tree, fam)
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", flow_tree["loras"][fam]), safe_load=True)
        modules = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}
        for n in names.get(fam, []):
            assert n in modules, (fam, n)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), comfy.lora.model_lora_keys_unet(env["base"].model, {}))
        assert not [r for r in caplog.records if "not loaded" in r.getMessage()], fam
        assert len(patches) == len(modules), fam
        added = env["base"].clone().add_patches(patches, 1.0)
        assert len(added) == len(patches), fam
        # and the LoRA changes the model
        assert rel_diff(ksampler(env, env["lora"], "euler", 1.0), ksampler(env, env["base"], "euler", 1.0)) > 1e-3, fam


def test_flux_base_with_sd15_tuned_is_refused(host, flow_tree):
    env = env_for(host, flow_tree, "flux_dev")
    sd15 = env["nodes"]["CheckpointLoaderSimple"]().load_checkpoint(flow_tree["sd15"])[0]
    with raises_named("CombinedSamplingError", "same architecture with the same latent format") as info:
        combined(env, env["base"], sd15, "euler", K)
    msg = str(info.value)
    assert "Flux" in msg and "SD15" in msg and "flow matching" in msg and "eps prediction" in msg


# ------------------------------------------------------------------------------ combined = KSampler
ENDPOINT_SAMPLERS = ("euler", "dpmpp_2m", "euler_ancestral", "heun", "dpmpp_2m_sde", "uni_pc")


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_switch_at_0_and_n_equals_ksampler(host, flow_tree, fam):
    env = env_for(host, flow_tree, fam)
    for sampler in ENDPOINT_SAMPLERS:
        tuned_ref = ksampler(env, env["lora"], sampler, 1.0)
        base_ref = ksampler(env, env["base"], sampler, 3.0)
        d0 = rel_diff(combined(env, env["base"], env["lora"], sampler, 0), tuned_ref)
        dn = rel_diff(combined(env, env["base"], env["lora"], sampler, STEPS), base_ref)
        record(f"k=0/N vs KSampler ({fam})", max(d0, dn))
        assert d0 <= 1e-6 and dn <= 1e-6, (sampler, d0, dn)
        mid = combined(env, env["base"], env["lora"], sampler, K)
        assert rel_diff(mid, tuned_ref) > 1e-3 and rel_diff(mid, base_ref) > 1e-3, sampler
    # the switch as a fraction: 0.5 of 4 steps is step 2
    assert torch.equal(combined(env, env["base"], env["lora"], "euler", 0, unit="fraction", fraction=0.5),
                       combined(env, env["base"], env["lora"], "euler", K))


def _samplers():
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_base_equal_to_tuned_is_one_ksampler(host, flow_tree, fam):
    """Two separately loaded copies of the same weights: every call is routed, the result is one
    KSampler run, for every sampler at k = N/2 and for a few samplers at every k."""
    env = env_for(host, flow_tree, fam)
    copy = load_base(host, fam)
    failures, unsupported = [], []
    for sampler in _samplers():
        try:
            ref = ksampler(env, env["base"], sampler, 2.0)
        except Exception as e:  # a sampler ComfyUI itself cannot run on this model
            unsupported.append((sampler, type(e).__name__))
            continue
        ks = [K] + (list(range(STEPS + 1)) if sampler in ("euler", "dpmpp_2m", "euler_ancestral", "heun") else [])
        for k in ks:
            out = combined(env, env["base"], copy, sampler, k, cfg_base=2.0, cfg_tuned=2.0)
            d = rel_diff(out, ref)
            record(f"base == tuned vs KSampler ({fam})", d)
            if not (torch.isfinite(out).all() and d <= 1e-6):
                failures.append((sampler, k, d))
    print(f"[flow figures] samplers KSampler itself cannot run on {fam}: {unsupported or 'none'}")
    assert not failures, failures
    assert len(unsupported) <= 2, unsupported


@pytest.mark.parametrize("fam", FAMILIES)
def test_lora_tuned_equals_two_ksampler_advanced_chain(host, flow_tree, fam):
    env = env_for(host, flow_tree, fam)
    out = combined(env, env["base"], env["lora"], "euler", K)
    d = rel_diff(out, chain(env, env["base"], env["lora"], "euler", K))
    record(f"LoRA combined vs KSamplerAdvanced chain, euler ({fam})", d)
    # the chain divides and re-multiplies by the latent scale (and 1 − σ) at the handoff in fp32
    assert d <= 1e-5, d
    # 'restart' is the chain for any sampler, multistep history included
    d2 = rel_diff(combined(env, env["base"], env["lora"], "dpmpp_2m", K, handoff="restart"),
                  chain(env, env["base"], env["lora"], "dpmpp_2m", K))
    record(f"LoRA combined (restart) vs chain, dpmpp_2m ({fam})", d2)
    assert d2 <= 1e-5, d2


# ------------------------------------------------------------------------------------------ shift
SHIFT_PATCHES = {
    # the shift Flux uses at 256 px (0.54) instead of the default 1.15
    "flux_dev": ("ModelSamplingFlux", lambda node, m: node.patch(m, 1.15, 0.5, 256, 256)),
    "sd35": ("ModelSamplingSD3", lambda node, m: node.patch(m, 6.0)),
    "zimage": ("ModelSamplingAuraFlow", lambda node, m: node.patch_aura(m, 6.0)),
}


def _patch(env, node_name, fn, model):
    out = fn(env["nodes"][node_name](), model)
    return out[0] if isinstance(out, tuple) else out.args[0]


@pytest.mark.parametrize("fam", sorted(SHIFT_PATCHES))
def test_tuned_model_with_another_shift_runs_on_the_base_schedule(host, flow_tree, fam):
    """A shift only changes which sigmas a schedule visits, not what a sigma means: combined
    sampling runs on the base model's schedule, so the tuned model's shift changes nothing, and the
    result is the SplitSigmas workflow (both stages on the base schedule)."""
    env = env_for(host, flow_tree, fam)
    node, fn = SHIFT_PATCHES[fam]
    ref = combined(env, env["base"], env["lora"], "euler", K)
    # a LoRA clone patched with the shift node
    shifted_clone = _patch(env, node, fn, env["lora"])
    assert torch.equal(combined(env, env["base"], shifted_clone, "euler", K), ref)
    # a separately loaded tuned model with the shift node
    other = _patch(env, node, fn, load_base(host, fam, seed_offset=1))
    out = combined(env, env["base"], other, "euler", K)
    d = rel_diff(out, on_base_sigmas(env, env["base"], other, "euler", K))
    record(f"other shift vs SplitSigmas reference ({fam})", d)
    assert d <= 1e-5, d
    # negative control: the shifted model's own schedule gives another image
    assert rel_diff(ksampler(env, other, "euler", 1.0), on_base_sigmas(env, env["base"], other, "euler", 0)) > 1e-3


def test_timestep_multiplier_mismatch_is_refused_with_a_reason(host, flow_tree):
    """ModelSamplingSD3 (multiplier 1000) on a Z-Image model (multiplier 1): the network would be
    told another noise level."""
    env = env_for(host, flow_tree, "zimage")
    wrong = env["nodes"]["ModelSamplingSD3"]().patch(load_base(host, "zimage", seed_offset=1), 3.0)[0]
    with raises_named("CombinedSamplingError", r"different noise schedules: their timestep\(sigma\)"):
        combined(env, env["base"], wrong, "euler", K)
    wrong_clone = env["nodes"]["ModelSamplingSD3"]().patch(env["lora"], 3.0)[0]
    with raises_named("CombinedSamplingError", "different noise schedules"):
        combined(env, env["base"], wrong_clone, "euler", K)


# --------------------------------------------------------------------------- distilled / guidance
def test_flux_dev_guidance_per_stage(host, flow_tree):
    """FluxGuidance on each stage's conditioning, CFG 1 (as Flux dev is run): equals the chain."""
    env = env_for(host, flow_tree, "flux_dev")
    guidance = env["nodes"]["FluxGuidance"]
    pos_base = guidance.execute(env["pos"], 3.5).args[0]
    pos_tuned = guidance.execute(env["pos"], 1.5).args[0]
    out = combined(env, env["base"], env["lora"], "euler", K, cfg_base=1.0, cfg_tuned=1.0, positive=pos_base,
                   tuned_positive=pos_tuned)
    ref = chain(env, env["base"], env["lora"], "euler", K, cfg_base=1.0, cfg_tuned=1.0, positive=pos_base,
                tuned_positive=pos_tuned)
    d = rel_diff(out, ref)
    record("Flux dev, FluxGuidance 3.5 → 1.5, vs chain", d)
    assert d <= 1e-5, d
    same_guidance = combined(env, env["base"], env["lora"], "euler", K, cfg_base=1.0, cfg_tuned=1.0, positive=pos_base)
    assert rel_diff(out, same_guidance) > 1e-4  # the tuned stage's guidance is used


def test_flux_dev_base_with_schnell_tuned(host, flow_tree):
    """Flux dev (ModelSamplingFlux, guidance-embedded) → Flux schnell (plain flow, shift 1, no
    guidance input), CFG 1 for the distilled stage, through the Combined KSampler and the Combined
    Guider: both equal the SplitSigmas workflow on the dev schedule."""
    import comfy.sample
    import comfy.samplers
    from rewardtune.sampling.combined import ksampler_sigmas
    env = env_for(host, flow_tree, "flux_dev")
    schnell = env_for(host, flow_tree, "flux_schnell")["base"]
    ref = on_base_sigmas(env, env["base"], schnell, "euler", K, cfg_base=1.0, cfg_tuned=1.0)
    out = combined(env, env["base"], schnell, "euler", K, cfg_base=1.0, cfg_tuned=1.0)
    d = rel_diff(out, ref)
    record("Flux dev → schnell vs SplitSigmas reference", d)
    assert d <= 1e-5, d
    guider = env["nodes"]["RewardTuneCombinedGuider"].execute(
        base_model=env["base"], tuned_model=schnell, positive=env["pos"], negative=env["neg"],
        **combined_switch_inputs(switch_step=K, api=False), cfg_base=1.0, cfg_tuned=1.0).args[0]
    latent = env["latent"]["samples"]
    g_out = guider.sample(comfy.sample.prepare_noise(latent, 5), latent, comfy.samplers.sampler_object("euler"),
                          ksampler_sigmas(env["base"], STEPS, "euler", SCHEDULER), seed=5, disable_pbar=True).float().cpu()
    d_g = rel_diff(g_out, ref)
    record("Flux dev → schnell, Combined Guider vs SplitSigmas reference", d_g)
    assert d_g <= 1e-5, d_g
    assert rel_diff(out, ksampler(env, env["base"], "euler", 1.0)) > 1e-3
