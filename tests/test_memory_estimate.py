"""Memory estimate without a GPU (trainers/memory.py), on tiny real models on the CPU: the estimate
on fake copies (FakeTensorMode) equals the same tracker's measurement of the real step within
10 %; the refusal names what to lower; SQDF trains with gradient checkpointing."""
from __future__ import annotations

import pytest
import torch

from rewardtune.testing.comfy_host import prepare_comfy_import

prepare_comfy_import(cpu=True)

import comfy.sd  # noqa: E402

from rewardtune.testing import tiny_models as tm  # noqa: E402
from rewardtune.trainers import memory  # noqa: E402
from rewardtune.trainers.config import TrainConfig  # noqa: E402
from rewardtune.trainers.engine import train  # noqa: E402

GiB = 2 ** 30


@pytest.fixture(scope="module")
def tiny():
    patcher = tm.tiny_model_patcher(seed=0)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.requires_grad_(False)

    class Reward(torch.nn.Module):  # a module, so the estimate fake-copies its weights too
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images, prompts):
            return self.net(images).squeeze(1)
    return patcher, vae, Reward()


def config(**kw):
    base = dict(objective="refl", batch_size=2, grad_accum=1, num_steps=10, refl_stop_min=7, refl_stop_max=7,
                imagerefl_start=4, imagerefl_tf_min=7, imagerefl_tf_max=7, width=64, height=64, rank=4, alpha=4.0,
                sqdf_collect=2, sqdf_buffer=4, sqdf_window=4)
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.mark.slow
@pytest.mark.parametrize("objective,checkpointing", [("refl", False), ("imagerefl", True), ("sqdf", True)])
def test_estimate_within_10_percent_of_the_real_step(tiny, objective, checkpointing):
    patcher, vae, reward = tiny
    cfg = config(objective=objective, grad_checkpointing=checkpointing)
    est = memory.estimate(patcher, vae, reward, cfg)
    assert set(est.per_kind) == set(memory.objective_kinds(cfg))
    weights = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    for kind, peak in est.per_kind.items():
        real, parts = memory.measure_peak_bytes(patcher, vae, reward, cfg, kind)
        assert abs(peak / real - 1) < 0.10, (kind, peak, real, est.breakdown[kind], parts)
        assert real > weights  # the UNet's weights are part of the peak, and the step adds to them
        if kind != "sqdf_collect":  # a step with gradients keeps activations for backward
            assert parts["Activation"] + parts.get("Temp", 0) > 0.2 * real
    # the model the graph holds is left as it was: no LoRA functions, no gradients wanted
    assert all(not m.__dict__.get("weight_function") for m in patcher.model.diffusion_model.modules())
    assert not any(p.requires_grad for p in patcher.model.diffusion_model.parameters())


def test_fake_copy_allocates_nothing_and_leaves_the_original(tiny):
    patcher, _, _ = tiny
    unet = patcher.model.diffusion_model
    before = [p.detach().clone() for p in unet.parameters()]
    mode = memory.new_fake_mode()
    copy = memory.fake_copy(unet, mode)
    from torch._subclasses.fake_tensor import FakeTensor
    assert all(isinstance(p, FakeTensor) for p in copy.parameters())
    assert [p.shape for p in copy.parameters()] == [p.shape for p in unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))


@pytest.mark.slow
def test_checkpointing_lowers_the_estimate_and_the_refusal_says_what_to_lower(tiny):
    patcher, vae, reward = tiny
    plain = config(objective="imagerefl", batch_size=4)
    peak = memory.estimate_peak_bytes(patcher, vae, reward, plain)
    peak_gc = memory.estimate_peak_bytes(patcher, vae, reward, config(objective="imagerefl", batch_size=4,
                                                                       grad_checkpointing=True))
    assert peak_gc < peak

    ok, advice = memory.fits(peak, 10 * GiB, plain)
    assert ok and "fits" in advice
    ok, advice = memory.fits(peak, 2 ** 20, plain)  # a deliberately tiny budget: 1 MiB
    assert not ok
    assert "will not fit" in advice and "gradient_checkpointing" in advice and "batch_size" in advice
    assert "1.0 MiB" not in advice and "0.0 GiB" in advice  # sizes in GiB

    # a budget between the two: re-estimating finds that checkpointing alone is enough
    budget = memory.needed_bytes(peak_gc) + 1024
    assert memory.needed_bytes(peak) > budget
    ok, advice = memory.check_fits(patcher, vae, reward, plain, budget, peak=peak)
    assert not ok and "Suggested: turn on gradient_checkpointing (estimated peak" in advice
    assert memory.fits(peak_gc, budget)[0]


def test_sqdf_trains_with_gradient_checkpointing(tiny):
    """The reference call of an SQDF update runs with the LoRA off; its recomputation in the
    backward pass must too (it failed with a CheckpointError before checkpointing.py restored the
    forward's weight functions)."""
    patcher, vae, reward = tiny
    losses = {}
    for checkpointing in (False, True):
        cfg = config(objective="sqdf", steps=1, num_steps=6, grad_checkpointing=checkpointing)
        res = train(patcher, vae, reward, cfg, encode=lambda t: tm.tiny_conditioning(sum(map(ord, t)) % 997),
                    prompts=["a cat"])
        assert res.step == 1
        losses[checkpointing] = (res.history[0]["sqdf_loss"], res.history[0]["grad_norm"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def _fp64_models():
    """A fresh tiny UNet and TAESD in float64 (the fixture's stay fp32 for the other tests)."""
    patcher = tm.tiny_model_patcher(seed=0)
    base = patcher.model
    base.to(torch.float64)
    base.diffusion_model.dtype = torch.float64
    base.manual_cast_dtype = None
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    vae.first_stage_model.to(torch.float64)
    vae.vae_dtype = torch.float64
    return patcher, vae


def _lora_grads(patcher, vae, reward, cfg, dtype=torch.float32):
    """The LoRA's gradients of one engine micro-batch (its own setup, sampling context and backward)."""
    from rewardtune.trainers import engine

    def encode(text):
        c = tm.tiny_conditioning(sum(map(ord, text)) % 997)
        return [[c[0][0].to(dtype), c[0][1]]]
    run = engine._setup(patcher, vae, reward, cfg, encode, ["a cat", "a dog"], None, None)
    metrics = engine._train_on(run, engine.OBJECTIVES[cfg.objective], engine._draw_prompts(run))
    return [p.grad.detach().clone() for p in run.lora.parameters() if p.grad is not None], metrics


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["refl", "sqdf"])
def test_decode_checkpointing_gives_the_same_gradients(tiny, objective):
    """Per-image decode under checkpointing is the same computation: in float64 the LoRA's
    gradients agree to 1e-12 (relative to the largest); in float32 the loss agrees to 1e-6 (the
    batched and single-image convolutions round differently, as a change of thread count does)."""
    _, _, reward = tiny
    patcher, vae = _fp64_models()
    kw = dict(objective=objective, batch_size=3, refl_weight=1.0)
    if objective == "sqdf":
        kw.update(steps=1, num_steps=6)
    grads = {}
    for on in (False, True):
        cfg = config(decode_checkpointing=on, **kw)
        if objective == "sqdf":  # the update's replay pool comes from a collection first
            run_grads = _sqdf_grads(patcher, vae, reward, cfg, torch.float64)
        else:
            run_grads, _ = _lora_grads(patcher, vae, reward, cfg, torch.float64)
        grads[on] = run_grads
    scale = max(g.abs().max().item() for g in grads[False])
    assert scale > 0
    diff = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    assert diff <= 1e-12 * scale, (diff, scale)

    if objective == "refl":
        fp32, _, _ = tiny
        losses = [_lora_grads(fp32, tiny[1], reward, config(decode_checkpointing=on, **kw))[1]["refl_loss"]
                  for on in (False, True)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def _sqdf_grads(patcher, vae, reward, cfg, dtype):
    from rewardtune.trainers import engine

    def encode(text):
        c = tm.tiny_conditioning(sum(map(ord, text)) % 997)
        return [[c[0][0].to(dtype), c[0][1]]]
    run = engine._setup(patcher, vae, reward, cfg, encode, ["a cat", "a dog"], None, None)
    objective = engine.OBJECTIVES["sqdf"]
    objective.prepare(run)
    engine._train_on(run, objective, objective.draw(run))
    return [p.grad.detach().clone() for p in run.lora.parameters() if p.grad is not None]


@pytest.mark.slow
def test_decode_checkpointing_lowers_the_peak_and_the_estimate_follows(tiny):
    """At batch 4 the decode's activations are the step's largest part: decoding one image at a
    time under checkpointing lowers the measured peak of the real step (CPU, MemTracker), and the
    estimate models the same choice (within 10 % of each measurement)."""
    patcher, vae, reward = tiny
    peaks = {}
    for on in (False, True):
        cfg = config(objective="refl", batch_size=4, width=128, height=128, decode_checkpointing=on)
        real, parts = memory.measure_peak_bytes(patcher, vae, reward, cfg, "refl")
        est = memory.estimate(patcher, vae, reward, cfg).per_kind["refl"]
        assert abs(est / real - 1) < 0.10, (on, est, real, parts)
        peaks[on] = (real, est)
    assert peaks[True][0] < 0.9 * peaks[False][0], peaks
    assert peaks[True][1] < 0.9 * peaks[False][1], peaks


# A ComfyUI AutoencoderKL (the class of the SD1.5/SDXL/SD3/Flux VAEs: ResnetBlocks, attention,
# Upsamples in its Decoder) at tiny size, through comfy.sd.VAE with an explicit config.
KL_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
               "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _tiny_kl_vae(dtype=torch.float32):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    first = AutoencoderKL(ddconfig=dict(KL_DDCONFIG), embed_dim=4)
    tm.init_weights_(first, 3)
    vae = comfy.sd.VAE(sd=first.state_dict(), config={"params": {"ddconfig": dict(KL_DDCONFIG), "embed_dim": 4}})
    if dtype != torch.float32:
        vae.first_stage_model.to(dtype)
        vae.vae_dtype = dtype
    return vae


def test_block_wise_decode_wraps_the_decoder_blocks_and_restores_them(tiny):
    """The blocks found generically: ComfyUI's Decoder (mid and up ResnetBlocks, attention,
    Upsamples; not its single convs and norms) and TAESD's Blocks; a no-grad decode inside is the
    plain decode; on exit every block's forward is the class's again."""
    from rewardtune.trainers.checkpointing import decoder_checkpointing
    for vae, want in ((_tiny_kl_vae(), {"ResnetBlock": 2 + 4 * 2, "AttnBlock": 1, "Upsample": 3}),
                      (tiny[1], {"Block": 10})):
        first = vae.first_stage_model
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            plain = first.decode(z)
            with decoder_checkpointing(first) as blocks:
                names = [type(b).__name__ for b in blocks]
                assert {n: names.count(n) for n in set(names)} == want
                assert torch.equal(first.decode(z), plain)
        assert not any("forward" in m.__dict__ for m in first.modules())


def test_block_wise_decode_gives_the_same_gradients_on_comfys_vae(tiny):
    """The engine's step with the decode checkpointed block by block inside each image's
    checkpoint on ComfyUI's AutoencoderKL: in float64 the LoRA's gradients equal the plain
    batched decode's to 1e-12 (relative to the largest). (TAESD: the test above.)"""
    _, _, reward = tiny
    patcher, _ = _fp64_models()
    vae = _tiny_kl_vae(torch.float64)
    grads = {}
    for on in (False, True):
        cfg = config(decode_checkpointing=on, objective="refl", batch_size=2, refl_weight=1.0)
        grads[on], _ = _lora_grads(patcher, vae, reward, cfg, torch.float64)
    scale = max(g.abs().max().item() for g in grads[False])
    assert scale > 0 and len(grads[True]) == len(grads[False])
    diff = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    assert diff <= 1e-12 * scale, (diff, scale)


class _Block(torch.nn.Module):
    """A decoder block that (``in_place``) changes a tensor it saved for backward (sigmoid's
    output) and its own input in place, as some transformer blocks do; else the same sums out of
    place."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.conv1, self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = torch.sigmoid(self.conv1(x))
        if self.in_place:
            h += x
            x += self.conv2(h)
            return x
        return x + self.conv2(h + x)


class _FirstStage(torch.nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.decoder = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), _Block(in_place), _Block(in_place))

    def decode(self, z):
        return self.decoder(z)


def test_block_wise_decode_of_a_block_that_works_in_place_gives_the_right_gradients():
    """The recomputation skips the copies of inputs and saved tensors for blocks that change
    neither (ComfyUI's VAE blocks), so it must see when a block does: a block that adds into
    what it saved and into its input gets, checkpointed, the gradients of the same sums written
    out of place (float64, 1e-12)."""
    from rewardtune.trainers.checkpointing import checkpointed_decode
    grads = {}
    for in_place in (False, True):
        torch.manual_seed(0)
        first = _FirstStage(in_place).double().requires_grad_(False)
        z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        decode = checkpointed_decode if in_place else (lambda f, fs, x: f(x))
        out = decode(first.decode, first, z * 1.0)
        grads[in_place] = torch.autograd.grad((out ** 2).sum(), z)[0]
        assert not any("forward" in m.__dict__ for m in first.modules())
    assert (grads[True] - grads[False]).abs().max() <= 1e-12 * grads[False].abs().max()


@pytest.mark.slow
def test_block_wise_decode_lowers_the_peak_and_the_estimate_follows(tiny):
    """At batch 1 the per-image checkpoint alone recomputes the whole decoder at once in the
    backward pass; checkpointing each decoder block inside it lowers the measured peak of the real
    step (ComfyUI's AutoencoderKL, CPU, MemTracker), and the FakeTensor estimate of the step with
    block-wise decode is within 10 % of its measurement."""
    patcher, _, reward = tiny
    vae = _tiny_kl_vae()
    cfg = config(objective="refl", batch_size=1)
    per_image, _ = memory.measure_peak_bytes(patcher, vae, reward, cfg, "refl", decode_blocks=False)
    block_wise, parts = memory.measure_peak_bytes(patcher, vae, reward, cfg, "refl")
    assert block_wise < 0.85 * per_image, (block_wise, per_image)
    est = memory.estimate(patcher, vae, reward, cfg).per_kind["refl"]
    assert abs(est / block_wise - 1) < 0.10, (est, block_wise, parts)


def test_the_refusal_suggests_decode_checkpointing_at_batch_1():
    """The block-wise decode lowers a batch-1 step too (SDXL at 1024²), so a refusal of a run
    with decode_checkpointing off says to turn it on whatever the batch size."""
    ok, advice = memory.fits(2 * GiB, GiB, config(batch_size=1, sqdf_collect=1, decode_checkpointing=False))
    assert not ok and "turn on decode_checkpointing" in advice
    ok, advice = memory.fits(2 * GiB, GiB, config(batch_size=1, sqdf_collect=1))
    assert not ok and "decode_checkpointing" not in advice


@pytest.mark.slow
def test_an_estimate_made_while_a_job_trains_on_another_thread_is_unchanged(tiny):
    """The node estimates on its own thread while a background job may be training: the tracker's
    module and optimizer hooks are process-wide, so it must listen to its own thread only — the
    estimate is the same bytes as an idle one and the job trains undisturbed."""
    import threading
    patcher, vae, reward = tiny
    cfg = config(objective="refl", batch_size=2)
    idle = memory.estimate(patcher, vae, reward, cfg).per_kind

    job_model = tm.tiny_model_patcher(seed=5)  # the job's own models, as a background job has
    job_vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(3).items()})
    stop, started, outcome = threading.Event(), threading.Event(), {}

    def job():
        try:
            steps = 0
            while not stop.is_set():
                res = train(job_model, job_vae, reward, config(objective="refl", steps=1, seed=steps),
                            encode=lambda t: tm.tiny_conditioning(sum(map(ord, t)) % 997), prompts=["a cat"])
                steps += res.step
                started.set()
            outcome["steps"] = steps
        except BaseException as e:  # noqa: BLE001 - reported to the test's thread
            outcome["error"] = e
    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert started.wait(120), outcome  # the job is training (it loops until the estimate is done)
        busy = memory.estimate(patcher, vae, reward, cfg).per_kind
    finally:
        stop.set()
        thread.join(120)
    assert "error" not in outcome, outcome
    assert outcome["steps"] >= 2  # it went on training during the estimate
    assert busy == idle
