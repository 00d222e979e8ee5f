"""Small cards: a job that trains on the graph's own UNet (``unet_copy`` shared / auto in mode wait)
leaves that model exactly as it was — finished or failed — in this process, on a tiny real
ComfyUI model: the LoRA is off the shared modules (a direct call of the model, which runs whatever
weight functions the modules hold, gives the same tensor as before), no clone of it stays loaded,
and the run's own tuned model still carries the LoRA. The node's choice between a private copy
and the shared weights, and the same checks through a real server, are in test_trainer_node.py."""
from __future__ import annotations

import pytest
import torch

from rewardtune.testing.comfy_host import prepare_comfy_import

prepare_comfy_import(cpu=True)

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

from rewardtune.jobs.comfy_training import plan_unet, shared_weights  # noqa: E402
from rewardtune.testing import tiny_models as tm  # noqa: E402
from rewardtune.trainers import memory  # noqa: E402
from rewardtune.trainers.config import ConfigError, TrainConfig  # noqa: E402
from rewardtune.trainers.engine import TrainingError, train  # noqa: E402


def _setup():
    patcher = tm.tiny_model_patcher(seed=0, unit_scale=True)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    return patcher, vae


def _config(**kw):
    return TrainConfig(**{**dict(objective="refl", steps=2, batch_size=1, grad_accum=1, lr=5e-2, rank=4, alpha=4.0,
                                 num_steps=6, refl_stop_min=3, refl_stop_max=5, width=64, height=64, cfg=2.0,
                                 save_every=1, unet_copy="shared"), **kw})


def _encode(text):
    return tm.tiny_conditioning(sum(map(ord, text)) % 997)


def _direct(patcher):
    """The diffusion model called directly, not through ComfyUI's loader: it runs whatever
    weight functions (LoRA adapters) the shared modules hold at the moment."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([3.0]), c_crossattn=_encode("held")[0][0])


def _sample(model, seed=11):
    lat = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(model, noise, 4, 2.0, "euler", "normal", _encode("held"), _encode(""), lat, seed=seed)


def _clones_loaded(patcher) -> list:
    return [lm for lm in mm.current_loaded_models
            if lm.model is not None and lm.model is not patcher and lm.model.model is patcher.model]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_a_shared_run_leaves_the_graphs_model_as_it_was_and_its_tuned_model_keeps_the_lora(tmp_path):
    patcher, vae = _setup()
    direct, sampled = _direct(patcher), _sample(patcher)
    with shared_weights(patcher):
        result = train(patcher, vae, brightness, _config(), encode=_encode, prompts=["p"], out_dir=str(tmp_path))
        assert not torch.equal(_direct(patcher), direct)  # the LoRA is on the shared modules while it trains
    assert result.step == 2 and any(p.abs().sum() > 0 for p in result.lora.parameters())
    assert _clones_loaded(patcher) == []
    assert torch.equal(_direct(patcher), direct), "the LoRA stayed on the graph's model after the run"
    assert torch.equal(_sample(patcher), sampled)
    assert (_sample(result.model) - sampled).abs().max() > 1e-5  # the tuned model still carries the LoRA
    assert torch.equal(_sample(patcher), sampled)  # and ComfyUI swaps back between the two as for any LoRA clone


def test_a_failed_shared_run_leaves_the_graphs_model_as_it_was(tmp_path):
    patcher, vae = _setup()
    direct, sampled = _direct(patcher), _sample(patcher)

    def nan_at_step_2(images, prompts):
        nan_at_step_2.calls += 1
        return brightness(images, prompts) * (float("nan") if nan_at_step_2.calls > 1 else 1.0)
    nan_at_step_2.calls = 0
    with pytest.raises(TrainingError, match="nan"):
        with shared_weights(patcher):
            train(patcher, vae, nan_at_step_2, _config(), encode=_encode, prompts=["p"], out_dir=str(tmp_path))
    assert nan_at_step_2.calls == 2  # the first step changed the LoRA, the second failed
    assert _clones_loaded(patcher) == []
    assert torch.equal(_direct(patcher), direct), "the LoRA stayed on the graph's model after a failed run"
    assert torch.equal(_sample(patcher), sampled)


def test_plan_unet_picks_from_the_budget_and_never_shares_in_the_background():
    patcher, _ = _setup()
    copy = memory.module_bytes(patcher.model.diffusion_model)
    patcher.cached_patcher_init = (lambda **kw: None, ())  # as the loaders set it: a private copy can be built
    peak, roomy = 10 * copy, 100 * copy
    tight = (memory.needed_bytes(peak) + memory.needed_bytes(peak + copy)) // 2  # the step fits, the copy does not
    assert plan_unet(_config(unet_copy="auto"), patcher, "wait", peak, roomy)[0] is False
    shared, line = plan_unet(_config(unet_copy="auto"), patcher, "wait", peak, tight)
    assert shared and line.startswith("UNet: trains on the graph's weights (no room for a private copy"), line
    with pytest.raises(ConfigError, match="Use mode wait"):
        plan_unet(_config(unet_copy="auto"), patcher, "background", peak, tight)
    with pytest.raises(ConfigError, match="use mode wait"):
        plan_unet(_config(unet_copy="shared"), patcher, "background", peak, roomy)
    assert plan_unet(_config(unet_copy="private"), patcher, "wait", peak, tight)[0] is False
    # no budget (the CPU): today's private copy unless set
    assert plan_unet(_config(unet_copy="auto"), patcher, "wait", None, None)[0] is False
    assert plan_unet(_config(unet_copy="shared"), patcher, "wait", None, None)[0] is True
    with pytest.raises(ConfigError, match="unet_copy must be one of auto, private, shared"):
        _config(unet_copy="copy").validate()
