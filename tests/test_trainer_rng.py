"""A training job draws only from its own torch.Generator (tiny models, CPU).

On the server a job trains on a worker thread while foreground prompts sample on another, and a
KSampler seeds and draws from the process-wide generator (``comfy.sample.prepare_noise`` calls
``torch.manual_seed``). A job that used that generator (the LoRA's initial weights came from it
right after ``torch.manual_seed``) could train another LoRA depending on what ran beside it, and
could change a foreground prompt's noise."""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from test_trainer_engine import encode, pattern_reward, small, tiny_setup  # noqa: E402

import comfy.sample  # noqa: E402

from rewardtune.trainers.engine import train  # noqa: E402


FAST = dict(num_steps=4, refl_stop_min=2, refl_stop_max=3, imagerefl_start=1, imagerefl_tf_min=2, imagerefl_tf_max=3)


def _global_states():
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


def test_training_and_resuming_leave_the_process_wide_generator_alone(tmp_path):
    """The process-wide generator is neither reseeded nor drawn from by a run or a resume."""
    patcher, vae = tiny_setup()
    torch.manual_seed(1234)
    before = _global_states()
    train(patcher, vae, pattern_reward, small(steps=1, **FAST), encode=encode, prompts=["p", "q"], out_dir=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(before, _global_states())), "a fresh run touched the global RNG"
    train(patcher, vae, pattern_reward, small(steps=2, **FAST), encode=encode, prompts=["p", "q"], out_dir=str(tmp_path),
          resume=str(tmp_path / "checkpoint.pt"))
    assert all(torch.equal(a, b) for a, b in zip(before, _global_states())), "a resume touched the global RNG"


def test_checkpointed_recomputation_does_not_set_the_process_wide_generator(tmp_path):
    """A foreground sampler drawing from the process-wide generator while a job runs its backward
    pass, without threads: every convolution of the UNet and the VAE draws one number from that
    generator each time it runs — in the forward passes and in the recomputations of the UNet's
    gradient checkpoints and the block-wise decode. The draws must continue one stream, as if the
    job were not there. torch's checkpoint with RNG preservation set the generator back to the
    forward pass's state for each recomputation (and restored it after): draws repeated, which on
    the server changed a foreground prompt's noise (trainers/checkpointing.py's module doc)."""
    patcher, vae = tiny_setup()
    convs = [m for root in (patcher.model.diffusion_model, vae.first_stage_model) for m in root.modules()
             if isinstance(m, torch.nn.Conv2d)]
    draws = []
    handles = [m.register_forward_hook(lambda *_: draws.append(torch.rand(()).item())) for m in convs]
    torch.manual_seed(4321)
    try:
        train(patcher, vae, pattern_reward, small(steps=1, grad_checkpointing=True, decode_checkpointing=True, **FAST),
              encode=encode, prompts=["p", "q"], out_dir=str(tmp_path))
    finally:
        for h in handles:
            h.remove()
    torch.manual_seed(4321)
    alone = [torch.rand(()).item() for _ in draws]
    assert len(draws) > 100  # the convolutions ran, recomputations included
    repeated = sum(a != b for a, b in zip(draws, alone))
    assert repeated == 0, f"{repeated} of {len(draws)} draws were not the stream's next number"


@pytest.mark.slow
def test_a_foreground_sampler_on_another_thread_changes_neither_the_lora_nor_its_own_noise(tmp_path):
    """An undisturbed 2-step run against a 1-step run resumed to 2 steps while another thread
    does what a foreground KSampler does (``prepare_noise``: reseed the global generator, draw
    noise) in bursts every 0.5 ms, the interpreter switching threads every 100 µs: the LoRAs are
    bitwise equal, and every noise the other thread drew is the one its seed gives alone. (Before
    the job had its own generator for everything, 112 of the 168 LoRA tensors differed and a few
    foreground draws were changed, in every try.)"""
    patcher, vae = tiny_setup()
    prompts = ["p", "q", "r"]
    # every kind of draw: prompts, batches, stop and t_f indices, training t, noise
    settings = dict(objective="imagerefl", refl_every=2, batch_size=1, **FAST)
    from test_trainer_engine import real_images
    images = real_images(3)
    quiet = train(patcher, vae, pattern_reward, small(steps=2, **settings), encode=encode, prompts=prompts, images=images,
                  out_dir=str(tmp_path / "quiet"))

    latent = torch.zeros(1, 4, 8, 8)
    expected = {s: comfy.sample.prepare_noise(latent, s) for s in range(16)}
    stop, draws, wrong = threading.Event(), [0], []

    def foreground():
        while not stop.is_set():
            for s, want in expected.items():
                if not torch.equal(comfy.sample.prepare_noise(latent, s), want):
                    wrong.append(s)
                draws[0] += 1
            time.sleep(0.0005)  # a burst, then a pause for the job's thread

    interval = sys.getswitchinterval()
    thread = threading.Thread(target=foreground, daemon=True)
    sys.setswitchinterval(1e-4)
    thread.start()
    try:
        out = str(tmp_path / "busy")
        train(patcher, vae, pattern_reward, small(steps=1, **settings), encode=encode, prompts=prompts, images=images,
              out_dir=out)
        busy = train(patcher, vae, pattern_reward, small(steps=2, **settings), encode=encode, prompts=prompts,
                     images=images, out_dir=out, resume=out + "/checkpoint.pt")
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert draws[0] > 100, draws  # the other thread really ran alongside
    quiet_sd, busy_sd = quiet.lora.state_dict(), busy.lora.state_dict()
    assert quiet_sd.keys() == busy_sd.keys()
    changed = [k for k, v in quiet_sd.items() if not torch.equal(v, busy_sd[k])]
    assert not changed and not wrong, (f"{len(changed)} of {len(quiet_sd)} LoRA tensors differ from the undisturbed "
                                       f"run; {len(wrong)} of {draws[0]} foreground draws were changed by the job")
    assert [h["reward"] for h in quiet.history] == [h["reward"] for h in busy.history]
