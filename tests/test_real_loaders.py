"""The Combined KSampler in real prompts, on tiny checkpoints loaded by CheckpointLoaderSimple / LoraLoader.

Prompts are executed by ComfyUI's PromptExecutor; latents come back through the core SaveLatent
node's files, images through a real (TAESD) VAE decode and SaveImage.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rewardtune.testing.workflow import combined_switch_inputs


def sd15_prompt(models, sampler="euler", steps=6, seed=3, width=64, height=64, batch=2):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models["sd15"]}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                         "lora_name": models["lora"], "strength_model": 1.0, "strength_clip": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red fox in the snow"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
    }


def add_combined(p, k, sampler="euler", steps=6, seed=3, cfg_tuned=1.0, name="combined", base=("ckpt", 0), tuned=("lora", 0)):
    p[name] = {"class_type": "RewardTuneCombinedKSampler", "inputs": {
        "base_model": list(base), "tuned_model": list(tuned), "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": ["latent", 0], "seed": seed, "steps": steps, **combined_switch_inputs(switch_step=k),
        "cfg_base": 7.5, "cfg_tuned": cfg_tuned, "sampler_name": sampler, "scheduler": "ddim_uniform", "handoff": "continuous", "denoise": 1.0}}
    return name


def add_ksampler(p, model, cfg, sampler="euler", steps=6, seed=3, name="ks"):
    p[name] = {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "ddim_uniform",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    return name


def add_chain(p, k, sampler="euler", steps=6, seed=3, cfg_tuned=1.0):
    common = {"sampler_name": sampler, "scheduler": "ddim_uniform", "steps": steps, "noise_seed": seed,
              "positive": ["pos", 0], "negative": ["neg", 0]}
    p["adv1"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "model": ["ckpt", 0], "add_noise": "enable", "cfg": 7.5,
                 "latent_image": ["latent", 0], "start_at_step": 0, "end_at_step": k, "return_with_leftover_noise": "enable"}}
    p["adv2"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "model": ["lora", 0], "add_noise": "disable", "cfg": cfg_tuned,
                 "latent_image": ["adv1", 0], "start_at_step": k, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    return "adv2"


def save_latent(p, src, prefix):
    p["save_" + prefix] = {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": prefix}}


def read_latent(host, outputs, prefix):
    import folder_paths
    entry = outputs["save_" + prefix]["latents"][0]
    path = os.path.join(folder_paths.get_output_directory(), entry["subfolder"], entry["filename"])
    return load_file(path)["latent_tensor"]


def test_sd15_checkpoint_is_detected_and_lora_loads(host, models_tree):
    import comfy.supported_models
    nodes = host.node_classes
    model, clip, vae = nodes["CheckpointLoaderSimple"]().load_checkpoint(models_tree["sd15"])
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert clip is not None and vae is not None
    lmodel, _ = nodes["LoraLoader"]().load_lora(model, clip, models_tree["lora"], 1.0, 1.0)
    assert lmodel.is_clone(model) and len(lmodel.patches) > 0
    sdxl, sdxl_clip, sdxl_vae = nodes["CheckpointLoaderSimple"]().load_checkpoint(models_tree["sdxl"])
    assert isinstance(sdxl.model.model_config, comfy.supported_models.SDXL)


@pytest.mark.slow
def test_real_prompt_endpoints_and_chain(host, models_tree):
    p = sd15_prompt(models_tree)
    for k in (0, 3, 6):
        save_latent(p, add_combined(p, k, name=f"c{k}"), f"c{k}")
    save_latent(p, add_ksampler(p, ("ckpt", 0), 7.5, name="ks_base"), "ks_base")
    save_latent(p, add_ksampler(p, ("lora", 0), 1.0, name="ks_tuned"), "ks_tuned")
    save_latent(p, add_chain(p, 3), "chain")
    out = host.run(p)
    lat = {name: read_latent(host, out, name) for name in ("c0", "c3", "c6", "ks_base", "ks_tuned", "chain")}
    for v in lat.values():
        assert v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    assert torch.allclose(lat["c0"], lat["ks_tuned"], atol=1e-5, rtol=0)
    assert torch.allclose(lat["c6"], lat["ks_base"], atol=1e-5, rtol=0)
    # the chain divides/multiplies by the latent scale at the handoff: compare relatively
    scale = lat["chain"].abs().max().item()
    assert (lat["c3"] - lat["chain"]).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (lat["c3"] - lat["ks_base"]).abs().max().item() > 1e-3
    assert (lat["c3"] - lat["ks_tuned"]).abs().max().item() > 1e-3


def test_real_prompt_decodes_images_through_the_vae(host, models_tree):
    p = sd15_prompt(models_tree, batch=2)
    add_combined(p, 4, sampler="ddpm")
    p["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["combined", 0], "vae": ["ckpt", 2]}}
    p["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "rt_real"}}
    out = host.run(p)
    import folder_paths
    imgs = out["save"]["images"]
    assert len(imgs) == 2
    for e in imgs:
        arr = np.asarray(Image.open(os.path.join(folder_paths.get_output_directory(), e["subfolder"], e["filename"])))
        assert arr.shape == (64, 64, 3)


@pytest.mark.slow
def test_sdxl_architecture_combined_equals_ksampler_endpoints(host, models_tree):
    from rewardtune.testing import tiny_models as tm
    import comfy.sd
    nodes = host.node_classes
    base = nodes["CheckpointLoaderSimple"]().load_checkpoint(models_tree["sdxl"])[0]
    lora = tm.lora_state_dict(base.model, seed=5, scale=1.0, targets=("attn1.to_q", "attn2.to_v"))
    tuned, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    pos = tm.tiny_conditioning(1, tokens=77, dim=2048, pooled=1280)
    neg = tm.tiny_conditioning(2, tokens=77, dim=2048, pooled=1280)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ks = nodes["KSampler"]()
    comb = nodes["RewardTuneCombinedKSampler"]
    kw = dict(positive=pos, negative=neg, latent_image=latent, seed=1, steps=3, cfg_base=5.0, cfg_tuned=5.0,
              sampler_name="euler", scheduler="normal", handoff="continuous", denoise=1.0)
    ref_base = ks.sample(base, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    ref_tuned = ks.sample(tuned, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    c3 = comb.execute(base_model=base, tuned_model=tuned, **combined_switch_inputs(switch_step=3, api=False),
                        **kw).args[0]["samples"]
    c0 = comb.execute(base_model=base, tuned_model=tuned, **combined_switch_inputs(switch_step=0, api=False),
                        **kw).args[0]["samples"]
    c1 = comb.execute(base_model=base, tuned_model=tuned, **combined_switch_inputs(switch_step=1, api=False),
                        **kw).args[0]["samples"]
    tol = 1e-5 * max(1.0, ref_base.abs().max().item())
    assert (c3 - ref_base).abs().max().item() <= tol
    assert (c0 - ref_tuned).abs().max().item() <= tol
    assert (c1 - ref_base).abs().max().item() > 1e-4 and (c1 - ref_tuned).abs().max().item() > 1e-4


def test_mixed_architectures_fail_clearly_and_host_keeps_working(host, models_tree):
    p = sd15_prompt(models_tree)
    p["xl"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sdxl"]}}
    add_combined(p, 3, tuned=("xl", 0))
    save_latent(p, "combined", "mixed")
    err = host.run_expect_error(p)
    assert err["exception_type"].endswith("CombinedSamplingError")
    assert "same architecture" in err["exception_message"]
    # the host still runs prompts afterwards
    p2 = sd15_prompt(models_tree)
    save_latent(p2, add_combined(p2, 3), "after_error")
    assert read_latent(host, host.run(p2), "after_error").shape == (2, 4, 8, 8)
