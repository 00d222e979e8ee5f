"""Training jobs inside a running ComfyUI: the glue between the trainer nodes, the job manager and
the engine. What a job needs from the graph's live objects (``build_spec``), how it trains on
ComfyUI's models from a worker thread (``own_interrupts``, ``make_trainable``), what it trains on
(``plan_memory``: a ``private_copy`` of the UNet or, on a small card in mode wait, the graph's own
weights via ``shared_weights``), how a *wait* node follows it (``wait``), and how its LoRA comes
back into the graph as a MODEL (``tuned_model``)."""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..trainers import memory
from ..trainers.config import ConfigError, TrainConfig
from ..trainers.engine import TrainingError, load_checkpoint, reward_from_model, train
from ..trainers.history import checkpoint_history
from ..trainers.lora import check_rank
# the run's fingerprint (part of the job id) is the command line's too: one function for both
from ..trainers.fingerprint import fingerprint as run_fingerprint, run_identity
from .manager import Job, JobError, JobSpec, get_manager


_THREAD = threading.local()


@contextlib.contextmanager
def own_interrupts():
    """Keep ComfyUI's process-wide interrupt flag away from the training thread.

    ComfyUI checks (and clears) that one flag inside every op (``comfy.ops.run_every_op``) and in
    CLIP encoding. A job training on its own thread would therefore swallow the Cancel meant for
    the prompt in the foreground: the prompt runs on and the job dies. So the check is wrapped,
    once, to do nothing on a thread inside this context (every other thread is unaffected); the
    job stops through its own cancel event instead, and a *wait* node turns the flag into that
    event from the executing thread (``wait``)."""
    check = mm.throw_exception_if_processing_interrupted
    if not getattr(check, "_rewardtune", False):
        def throw_exception_if_processing_interrupted():
            if not getattr(_THREAD, "training", False):
                check()
        throw_exception_if_processing_interrupted._rewardtune = True
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    _THREAD.training = True
    try:
        yield
    finally:
        _THREAD.training = False


def make_trainable(module: torch.nn.Module) -> None:
    """Replace the module's inference tensors (ComfyUI loads models under ``inference_mode``) with
    ordinary copies: autograd refuses to save inference tensors for backward, and frozen weights
    are saved (the gradient of x in x·Wᵀ needs W). Done on the worker thread, in place, once."""
    with torch.inference_mode(False):
        for name, p in list(module.named_parameters()):
            if p.is_inference():
                comfy.utils.set_attr_param(module, name, p.detach())
        for name, b in list(module.named_buffers()):
            if b.is_inference():
                comfy.utils.set_attr_buffer(module, name, b.clone())


def private_copy(model):
    """The job's own copy of the UNet, rebuilt from its file (ComfyUI's ``clone(force_deepcopy)``),
    with the graph's weight patches. A clone shares the modules with the graph's model: a prompt
    sampling that checkpoint while the job trains would load its own patches into the same
    modules mid-step (and see the job's adapters). Costs one more UNet in memory while training.
    Models built in a graph (no file to rebuild from) are shared, and the log says so."""
    if getattr(model, "cached_patcher_init", None) is None:
        import logging
        logging.getLogger("rewardtune.jobs").warning(
            "RewardTune: this MODEL has no loader to rebuild it from; the job trains on the shared UNet, so "
            "don't sample from the same model while it trains")
        return model
    return model.clone(force_deepcopy=True)


def _size(n: int) -> str:
    """Bytes for the summary: GiB from 1 GiB up, MiB below (a tiny model's sizes stay readable)."""
    return memory._gib(n) if n >= memory.GiB else f"{n / 2 ** 20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What the node decided before the job starts: the summary's memory and UNet lines, and
    whether the job trains on the graph's own UNet (``shared``) or on a private copy."""
    memory: str
    unet: str
    shared: bool


def progress_text(text: str, node_id) -> None:
    """``text`` shown on the executing node (ComfyUI's progress text), e.g. what it waits for."""
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (a script), or its loop has closed: nothing to show
        pass


def plan_memory(config: TrainConfig, model, vae, reward, mode: str, say=None) -> MemoryPlan:
    """Refuse, before a job starts, a run that cannot be honoured: a LoRA rank above what the
    adapted layers hold (``lora.check_rank``, as the CLI), a training step that will not fit the
    device (``memory.check_budget``, the same check the CLI makes: the step's peak estimated on fake
    copies of the models, compared with the budget; raises ConfigError saying what to lower); then
    decide where the job trains (``config.unet_copy``; see ``plan_unet``). ``say(text)``: what the
    node shows while the estimate runs."""
    check_rank(model.model.diffusion_model, config.rank, config.targets)
    line, peak, budget = memory.check_budget(config, model, vae, reward, where="config_json", on_estimate=say)
    shared, unet = plan_unet(config, model, mode, peak, budget)
    return MemoryPlan(line, unet, shared)


def plan_unet(config: TrainConfig, model, mode: str, peak: int | None, budget: int | None) -> tuple[bool, str]:
    """(train on the graph's own UNet?, the summary's UNet line) for ``config.unet_copy``.

    A private copy (``private_copy``) keeps a background job and the prompts that sample the same
    model meanwhile apart, at the price of one more UNet on the device (SDXL: 2.6B weights). On a
    small card that copy is what does not fit, so "auto" takes it only when the budget holds the
    step's estimated peak (which counts the UNet once) plus the copy; else, in mode wait, the job
    trains on the graph's weights: the queue waits for this node, so no prompt samples the model
    meanwhile, and ``shared_weights`` takes the LoRA off again when the job ends.

    Mode background with no room for the copy is refused rather than run with the graph's copy
    offloaded: offloading only lasts until the next prompt that samples this model, which reloads
    it, and ComfyUI then makes room by unloading models, the job's own UNet among them, mid-step
    (or runs out of memory). The user is told to use mode wait or what to lower instead. Without a
    budget (the CPU) or an estimate, "auto" keeps the private copy."""
    choice = config.unet_copy
    rebuildable = getattr(model, "cached_patcher_init", None) is not None
    if not rebuildable:
        if choice == "private":
            raise ConfigError('unet_copy "private": this MODEL has no loader to rebuild a private copy from (it was '
                              'built in the graph); set unet_copy to "auto" or "shared"')
        if mode != "wait":
            raise ConfigError("this MODEL has no loader to rebuild a private copy of its UNet from (it was built in "
                              "the graph), and a background job cannot share the graph's UNet: the prompts that "
                              "sample it meanwhile would change it under the job. Use mode wait")
        return True, ("UNet: trains on the graph's weights (no loader to rebuild a private copy from); the queue "
                      "waits for this node, and the LoRA is taken off the model when the job ends")
    if choice == "shared":
        if mode != "wait":
            raise ConfigError('unet_copy "shared" trains on the graph\'s own UNet, which the prompts that run while a '
                              'background job trains would change under it: use mode wait with it (the queue waits '
                              'for the node), or unet_copy "auto" / "private" in mode background')
        return True, ("UNet: trains on the graph's weights (unet_copy shared; the queue waits for this node, and the "
                      "LoRA is taken off the model when the job ends)")
    copy = memory.module_bytes(model.model.diffusion_model)
    private = (f"UNet: the job trains on a private copy (+{_size(copy)} on the device while the graph's model is "
               "also loaded; ComfyUI unloads the least recently used model when the job needs the room)")
    if choice == "private" or peak is None or budget is None:
        return False, private
    ok, _ = memory.fits(peak + copy, budget)
    both, alone = memory.needed_bytes(peak + copy), memory.needed_bytes(peak)
    figures = f"the step with the copy needs {_size(both)}, the step alone {_size(alone)}, budget {_size(budget)}"
    if ok:
        return False, f"{private} ({figures})"
    if mode != "wait":
        raise ConfigError(f"no room for the background job's private copy of the UNet ({figures}; the copy is "
                          f"{_size(copy)}): a background job cannot share the graph's UNet, since prompts that "
                          "sample it meanwhile would change it under the job. Use mode wait (the job then trains on "
                          "the graph's weights while the queue waits), or lower what the step needs (batch_size, "
                          "width/height, gradient_checkpointing on, bf16), or set a larger memory_budget_gb if the "
                          "card has more room")
    return True, (f"UNet: trains on the graph's weights (no room for a private copy: {figures}); the queue waits "
                  "for this node, and the LoRA is taken off the model when the job ends")


@contextlib.contextmanager
def shared_weights(model):
    """Train on the graph's own UNet (no private copy; see ``plan_unet``), and leave it as it was
    when the job ends — finished, cancelled or failed. The engine adds its LoRA to a clone of
    ``model`` (``engine._setup``), and loading that clone puts the adapters into the shared
    modules' ``weight_function`` lists. On exit every loaded clone of it is unloaded (ComfyUI
    unpatches the weights, restoring the graph's patches' originals) and each module keeps only
    the weight/bias functions it had before the job. The graph's model is reloaded by the next
    prompt that samples it. Use only while nothing else samples the model (mode wait)."""
    inner = model.model
    before = {id(m): (m, list(getattr(m, "weight_function", None) or []), list(getattr(m, "bias_function", None) or []))
              for m in inner.modules() if hasattr(m, "weight_function") or hasattr(m, "bias_function")}
    try:
        yield model
    finally:
        for i in reversed(range(len(mm.current_loaded_models))):
            loaded = mm.current_loaded_models[i]
            patcher = loaded.model
            if patcher is not None and patcher is not model and patcher.model is inner:
                mm.current_loaded_models.pop(i)
                loaded.model_unload()
        for m, weight_functions, bias_functions in before.values():
            if hasattr(m, "weight_function"):
                m.weight_function = [f for f in m.weight_function if any(f is g for g in weight_functions)]
            if hasattr(m, "bias_function"):
                m.bias_function = [f for f in m.bias_function if any(f is g for g in bias_functions)]


def build_spec(name: str, config: TrainConfig, *, model, vae, clip, reward, prompts, images, prompt=None,
               shared: bool = False) -> JobSpec:
    """The job's run function. ``shared``: train on the graph's own UNet (``plan_memory`` decided;
    mode wait only) instead of a private copy."""
    # steps and save_every are left out: queueing the graph with more steps continues the same job
    fp = run_fingerprint(run_identity(config, model=model, vae=vae, clip=clip, reward_model=reward.model,
                                      prompts=prompts, images=images))

    def run(job: Job) -> int:
        manager = get_manager()
        with own_interrupts(), torch.inference_mode(False), torch.enable_grad(), \
                (shared_weights(model) if shared else contextlib.nullcontext()):
            reward_model = reward.load()
            unet = model if shared else private_copy(model)
            for module in (unet.model, vae.first_stage_model, reward_model):
                make_trainable(module)
            cfg = job.config

            def on_step(metrics: dict) -> None:
                job.report(metrics)
                manager.notify("rewardtune.progress", {"id": job.id, "step": metrics["step"], "steps": cfg.steps,
                                                       "metrics": metrics})

            def on_checkpoint(step: int, image: torch.Tensor) -> None:
                """The x̂0 the reward saw at this step, saved as the job's newest sample."""
                from PIL import Image
                path = os.path.join(job.dir, "samples", f"step_{step:06d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                Image.fromarray(pixels).save(path)
                job.preview = path

            def encode(text: str):
                return clip.encode_from_tokens_scheduled(clip.tokenize(text))
            resume = job.checkpoint if os.path.exists(job.checkpoint) else None
            job.restart_metrics(checkpoint_history(load_checkpoint(resume, mmap=True) if resume else None))
            result = train(unet, vae, reward_from_model(reward_model, cfg.reward_scale, cfg.reward_offset), cfg,
                           encode=encode, prompts=prompts, images=images, out_dir=job.dir, resume=resume,
                           should_stop=job.cancel.is_set, on_step=on_step, on_checkpoint=on_checkpoint)
            return result.step
    return JobSpec(name, config, fp, run, prompt)


def lora_from_checkpoint(job: Job) -> tuple[dict, int]:
    """The newest LoRA weights of a job: its checkpoint (written every save_every steps)."""
    if not os.path.exists(job.checkpoint):
        raise JobError(f"job {job.id} has no checkpoint yet (state {job.state}, step {job.step}): wait for its "
                       f"first save (every {job.config.save_every} steps)")
    state = load_checkpoint(job.checkpoint, mmap=True)  # the LoRA only, not the optimizer or replay buffer
    # copies: no mapping of the file outlives this call (the job replaces it at its next save)
    return {k: v.clone() for k, v in state["lora"].items()}, int(state["step"])


def check_strength(strength: float) -> None:
    """A LoRA strength must be a number: NaN passes ComfyUI's min/max check (every comparison with
    it is false) and would make every patched weight NaN."""
    if not math.isfinite(strength):
        raise JobError(f"strength must be a finite number, got {strength}: set it on the node (e.g. 1.0)")


def tuned_model(job: Job, model, strength: float = 1.0):
    """(``model`` with the job's newest LoRA, that LoRA's name in the loras folder, its step).

    The LoRA is applied to a clone of ``model`` as weight patches, exactly what LoraLoader does
    (so the Combined KSampler can use base and tuned side by side). A finished job's LoRA is the
    one the manager published when it finished; a mid-training checkpoint's is published now as
    ``<job id>-latest``, so LoraLoader can load the same weights."""
    check_strength(strength)
    lora_sd, step = lora_from_checkpoint(job)
    manager = get_manager()
    if job.state == "finished" and step >= job.config.steps:
        name = manager.lora_name(job)
    else:
        name = manager.publish(job, latest_lora=lora_sd)
    tuned, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0.0)
    return tuned, name, step


def wait(job: Job, progress=None, poll: float = 0.1) -> None:
    """Wait for the job on the executing node's thread: progress to the node's bar, and ComfyUI's
    interrupt (the global flag, read only here) cancels this job and stops the prompt."""
    shown = None
    try:
        while not job.done.wait(poll):
            mm.throw_exception_if_processing_interrupted()  # clears the flag and raises
            if progress is not None:
                sample = job.preview if job.preview != shown else None
                shown = job.preview
                progress(job.step, job.config.steps, sample)  # ComfyUI's progress hook may raise it too
    except mm.InterruptProcessingException:
        job.cancel.set()
        job.done.wait()  # the job saves its checkpoint after the current step
        raise
    if progress is not None:
        progress(job.step, job.config.steps, None)
    if job.state == "failed":
        error = (job.error or "").rstrip(". ")
        # the engine's errors say what became of the checkpoint, as does an unreadable one's hint
        tail = "" if "checkpoint" in error else (" Its last checkpoint is kept: fix the problem and queue the graph "
                                                 "again to resume it.")
        raise TrainingError(f"training job {job.id} failed: {error}.{tail}")
