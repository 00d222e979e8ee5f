"""The training loop: one loop, the objectives plug in (nanoGPT-style: read it top to bottom).

    result = train(model, vae, reward, config, prompts=..., images=..., encode=..., out_dir=...)

``images`` are the aspect buckets ``data.load_examples`` (a folder of images with .txt captions)
or ``data.examples_from_graph`` (an IMAGE batch) return.

``model`` is a ComfyUI MODEL (ModelPatcher); it is cloned and LoRA adapters are added to the
clone, so the graph's model is never changed. ``encode(prompt) -> CONDITIONING`` turns captions
into conditioning (a CLIP's ``encode_from_tokens_scheduled``). ``reward(images, prompts)`` returns
s·(R + o) for images (B, 3, H, W) in [0, 1]; ``reward_from_model`` adapts a RewardModel.

Reading order: ``train`` at the bottom is the loop; ``_setup`` and ``_restore`` build and resume
the run's state (``_Run``); ``OBJECTIVES`` says, per objective, how a micro-batch is drawn and
which ``step(ctx, batch, reward, config)`` turns it into a loss; ``_train_on`` runs one inside
ComfyUI's sampling context and back-propagates it; ``_optimizer_step`` clips and steps.

Under torchrun (``world=``, see distributed.py) the same loop runs in every process: each keeps its
rows of the global batch's random draws, the LoRA gradients are averaged before the optimizer step,
and rank 0 writes the files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.samplers

from .config import TrainConfig
from .data import BatchSampler, Example
from .atomic import DiskFullError, atomic_write
from .checkpointing import checkpointed_decode, gradient_checkpointing
from . import distributed
from .distributed import World
from .lora import LoraSet, save_lora
from .objectives import classic_refl_step, imagerefl_step
from . import sqdf
from .replay import ReplayBuffer, Trajectory
from .steps import Batch, StepContext, comfy_training_mode, randint


MAX_SKIPPED_FP16_STEPS = 20
# What ``save_checkpoint`` writes under "format_version". Files from before the field existed are
# format 1 (the same keys). Raise it when a change makes older code misread a new file.
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("step", "lora", "optimizer", "rng", "config", "history")
log = logging.getLogger("rewardtune.trainers")


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must fix; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    model: object                       # the tuned MODEL (a clone of the input with the LoRA)
    lora: LoraSet
    step: int
    history: list[dict] = field(default_factory=list)
    stopped: bool = False
    lora_path: str | None = None


def reward_from_model(reward_model, scale=None, offset=None):
    """A RewardModel as the engine's reward: its ``training_reward`` s·(R + o) on BCHW images in
    [0, 1] (``scale``, ``offset``: None for the reward model's own s and o)."""
    return lambda images, prompts: reward_model.training_reward(images, prompts, scale=scale, offset=offset,
                                                                layout="BCHW")


class StepSampler(comfy.samplers.Sampler):
    """Runs one training step where ComfyUI has prepared conditioning, models and options,
    exactly as for sampling; the latent passes through unchanged."""

    def __init__(self, fn):
        self.fn, self.out = fn, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.out = self.fn(model_wrap, sigmas, extra_args, noise, latent_image)
        return latent_image


def make_decoder(vae, latent_format, per_image: bool = False):
    """x0 in the sampler's latent space → images in [0, 1] (BCHW) with gradients through the
    frozen VAE. Not ``VAE.decode``: it clamps in place, reloads the model, and may fall back to
    tiled decoding without a graph.

    ``per_image`` (TrainConfig.decode_checkpointing): with gradients, each image is decoded on its
    own under activation checkpointing, and each block of the decoder is checkpointed inside it
    (``checkpointing.checkpointed_decode``), so the backward pass holds one image's block inputs
    and one decoder block's activations at a time instead of the whole batch's decoder
    activations — the largest part of a ReFL step's peak. Without gradients (sampling, SQDF
    collection) the batch is decoded at once either way."""
    first_stage = vae.first_stage_model
    first_stage.requires_grad_(False)

    def decode_batch(x0):
        z = latent_format.process_out(x0).to(vae.vae_dtype)
        img = first_stage.decode(z).float()
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0)
    return lambda x0: checkpointed_decode(decode_batch, first_stage, x0, per_image)


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, step: int, lora: LoraSet, optimizer, gen: torch.Generator, config: TrainConfig,
                    history: list[dict], scaler=None, replay: ReplayBuffer | None = None,
                    world_size: int = 1) -> None:
    """Everything a resume needs, written atomically. The RNG is the run's own generator only
    (checkpoints of earlier versions also hold the process-wide state under "torch"; it is not
    restored: a job must not reseed the generator a foreground sampler uses). A run of several
    processes (torchrun) also records their number, "world_size" (absent: one)."""
    state = {"format_version": CHECKPOINT_FORMAT, "step": step, "lora": lora.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": {"generator": gen.get_state()},
             "config": config.to_json(), "history": json.dumps(history)}
    if scaler is not None and scaler.is_enabled():  # fp16
        state["scaler"] = scaler.state_dict()
    if replay is not None:  # SQDF: the buffer is part of the state, so a resume is exact
        state["replay"] = replay.state_dict()
    if world_size > 1:
        state["world_size"] = world_size

    def write(tmp):
        # through a Python file object: a full disk then raises ENOSPC, which atomic_write names
        # (torch.save to a path writes in C++ and says only "inline_container.cc … unexpected pos")
        with open(tmp, "wb") as f:
            torch.save(state, f)
    atomic_write(path, write)


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """``mmap=True`` maps the tensors instead of reading them: for a look at the step, the config or
    the LoRA without reading the optimizer state and an SQDF replay buffer (gigabytes). A file
    without "format_version" (written before the field existed) is read as format 1."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # not torch's advice to load it with weights_only=False
        from ..rewards.checkpoint import code_in_pickle
        raise TrainingError(code_in_pickle(path, e)) from e
    except Exception as e:
        raise TrainingError(f"cannot read the checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise TrainingError(f"{path} is not a RewardTune training checkpoint")
    version = state.get("format_version", 1)
    if not (isinstance(version, int) and 1 <= version <= CHECKPOINT_FORMAT):
        newer = isinstance(version, int) and version > CHECKPOINT_FORMAT
        raise TrainingError(f"the checkpoint {path} has format {version!r}" +
                            (f", newer than this RewardTune reads (up to {CHECKPOINT_FORMAT}): update RewardTune "
                             "to resume it" if newer else ", which RewardTune does not know: it was not written "
                             "by RewardTune's trainer"))
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise TrainingError(f"{path} is not a RewardTune training checkpoint (it lacks {', '.join(missing)})")
    return state


def check_world_size(state: dict, world: World, batch_size: int) -> None:
    """A checkpoint resumes only on as many processes as wrote it: the global batch (processes ×
    batch size) and how its random draws are split among the processes are part of the run, so on
    another count it would not continue as it was."""
    saved = int(state.get("world_size", 1))
    if saved != world.size:
        def how(n):
            return f"torchrun --nproc_per_node {n} (in all, over its nodes)" if n > 1 else "one process (no torchrun)"
        raise TrainingError(
            f"this checkpoint was trained by {saved} process(es) with a global batch of {saved} × {batch_size}; "
            f"this run has {world.size}, which would train with a global batch of {world.size} × {batch_size} and "
            f"split the random draws differently, so it would not continue the same run: resume it with {how(saved)}")


# ------------------------------------------------------------------------------ the run's state
@dataclass
class _Run:
    """Everything one run holds between steps."""
    config: TrainConfig
    reward: Callable
    tuned: object                       # the clone of the input MODEL that carries the LoRA
    lora: LoraSet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler        # enabled for fp16 only
    generator: torch.Generator
    sigmas: torch.Tensor                # the N-step ddim_uniform schedule the objectives run on
    decode_images: Callable
    encode: Callable                    # caption -> CONDITIONING
    prompts: list[str]
    batches: BatchSampler | None        # real images (ImageReFL)
    replay: ReplayBuffer | None         # SQDF
    consistency: sqdf.ConsistencyModel | None
    checkpoint_path: str | None
    step: int = 0
    saved: int = 0                       # the step of the newest checkpoint on disk (0: none)
    history: list[dict] = field(default_factory=list)
    preview: torch.Tensor | None = None  # the newest decoded training image, for on_checkpoint
    pool: ReplayBuffer | None = None     # SQDF: what this step's micro-batches sample from
    skipped: int = 0                     # fp16 overflows in a row
    conds: dict = field(default_factory=dict)
    world: World = World()               # torchrun: this process's rank of how many (distributed.py)

    def cond(self, text: str):
        if text not in self.conds:
            self.conds[text] = self.encode(text)
        return self.conds[text]

    def decode(self, x0):
        images = self.decode_images(x0)
        self.preview = images[0].detach()  # copied to the CPU only when a checkpoint uses it
        return images

    def pick_prompts(self, n: int, everyone: bool = False) -> list[str]:
        """This process's ``n`` prompts: its rows of the world × n the whole run draws (``everyone``:
        all of them). One process: n draws, as ever."""
        picks = [self.prompts[randint(self.generator, 0, len(self.prompts) - 1)] for _ in range(n * self.world.size)]
        return picks if everyone else picks[self.world.rows(n)]

    def sliced_noise(self):
        """Several processes: each per-sample noise draw of the step is the global batch's, this
        process keeping its rows (distributed.SlicedNoise). One process: nothing changes."""
        if not self.world.distributed:
            return contextlib.nullcontext()
        return distributed.SlicedNoise(self.generator, self.world)

    def autocast(self):
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.tuned.load_device.type, dtype=dtype, enabled=self.config.precision != "fp32")


def _setup(model, vae, reward, config: TrainConfig, encode, prompts, images, out_dir, world: World = World()) -> _Run:
    """The run before its first step. The model: a clone with LoRA adapters, everything else
    frozen. Every random number of the run (the LoRA's initial weights, noise, timestep picks,
    prompts, batches, replay samples) comes from one generator, never the process-wide one: on the
    server a foreground sampler on another thread seeds and draws from that one meanwhile. Under
    torchrun every process seeds it alike and keeps its rows of each draw (distributed.py)."""
    config.check_inputs(has_prompts=bool(prompts), has_images=bool(images))
    if config.objective == "sqdf" and config.sqdf_buffer < world.size * config.sqdf_collect:
        raise TrainingError(f"the replay buffer ({config.sqdf_buffer}) must hold one step's trajectories of all "
                            f"{world.size} processes ({world.size} × sqdf_collect {config.sqdf_collect}): raise "
                            "sqdf_buffer (sqdf_collect is per process, the buffer is shared)")
    generator = torch.Generator().manual_seed(config.seed)
    tuned = model.clone()
    tuned.model.requires_grad_(False)
    lora = LoraSet(tuned, config.rank, config.alpha, config.targets, generator=generator)
    run = _Run(config, reward, tuned, lora,
               optimizer=torch.optim.AdamW(lora.parameters(), lr=config.lr, weight_decay=config.weight_decay),
               # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
               scaler=torch.amp.GradScaler(model.load_device.type, enabled=config.precision == "fp16"),
               generator=generator,
               sigmas=comfy.samplers.calculate_sigmas(tuned.model.model_sampling, "ddim_uniform",
                                                      config.num_steps).cpu(),
               decode_images=make_decoder(vae, tuned.model.latent_format, config.decode_checkpointing),
               encode=encode, prompts=prompts or [],
               batches=_image_batches(vae, images, config.batch_size, generator, world),
               replay=ReplayBuffer(config.sqdf_buffer, config.sqdf_window) if config.objective == "sqdf" else None,
               consistency=_consistency_model(tuned, config),
               checkpoint_path=os.path.join(out_dir, "checkpoint.pt") if out_dir else None, world=world)
    run.cond("")  # the negative
    mm.load_models_gpu([vae.patcher])
    if out_dir and os.path.isdir(out_dir) and world.is_main:  # half-written files of a killed save
        for name in os.listdir(out_dir):
            if name.endswith(".tmp"):
                os.remove(os.path.join(out_dir, name))
    return run


def _image_batches(vae, images, batch_size: int, generator, world: World) -> BatchSampler | None:
    """Real latents encoded once (no grad). ``images``: {(h, w): [Example]} from
    data.load_examples / examples_from_graph; a batch never mixes sizes."""
    if not images:
        return None
    with torch.no_grad():
        latents = {size: [Example(vae.encode(ex.image[None, ..., :3]).cpu(), ex.caption, ex.source)
                          for ex in examples] for size, examples in images.items()}
    return BatchSampler(latents, batch_size, generator, world_size=world.size, rank=world.rank)


def _consistency_model(tuned, config: TrainConfig):
    if config.objective != "sqdf":
        return None
    if not config.sqdf_lcm_lora:
        log.warning("SQDF: no LCM-LoRA given (sqdf_lcm_lora): x̂0 from the frozen reference's one-step prediction, "
                    "the paper's 'without consistency model' ablation")
        return None
    consistency = sqdf.ConsistencyModel(tuned, config.sqdf_lcm_lora)
    log.info("SQDF: x̂0 from the consistency model %s (%d layers)", config.sqdf_lcm_lora, len(consistency.layers))
    return consistency


def _restore(run: _Run, state: dict) -> None:
    """A checkpoint's state into a freshly set-up run: the run continues exactly where it stopped."""
    check_world_size(state, run.world, run.config.batch_size)
    run.lora.load_state_dict(state["lora"])
    if run.replay is not None and "replay" in state:
        run.replay.load_state_dict(state["replay"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["rng"]["generator"])
    run.step, run.history = int(state["step"]), json.loads(state["history"])
    run.saved = run.step
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])  # a no-op unless fp16


def _save(run: _Run) -> None:
    """The checkpoint, written by rank 0 only (every rank holds the same state); the others wait
    until it is on disk."""
    if run.checkpoint_path:
        if run.world.is_main:
            try:
                save_checkpoint(run.checkpoint_path, run.step, run.lora, run.optimizer, run.generator, run.config,
                                run.history, run.scaler, run.replay, world_size=run.world.size)
            except DiskFullError as e:
                last = (f"the last checkpoint (step {run.saved}) is intact" if run.saved
                        else "there was no checkpoint before it")
                raise TrainingError(f"the disk holding {e.folder} is full ({e.free} free): the checkpoint of step "
                                    f"{run.step} could not be written, and {last}. The run stopped; free some space "
                                    "there, then resume it (the steps after that checkpoint are trained "
                                    "again).") from e
            run.saved = run.step
        distributed.barrier(run.world)


# ------------------------------------------------------------------------------ one micro-batch
def _conditioning(run: _Run, texts: list[str]):
    """The batch's positive conditioning (one caption a sample) and the empty-prompt negative."""
    conds = [run.cond(t) for t in texts]
    if len({c[0][0].shape[1] for c in conds}) > 1:
        raise TrainingError("captions encode to different lengths (over 75 tokens make longer conditioning); "
                            "shorten the long captions or use batch size 1")
    empty = run.cond("")
    positive = [[torch.cat([c[0][0] for c in conds]), dict(conds[0][0][1])]]
    negative = [[empty[0][0].expand(len(texts), *empty[0][0].shape[1:]), dict(empty[0][1])]]
    if "pooled_output" in negative[0][1]:
        negative[0][1]["pooled_output"] = negative[0][1]["pooled_output"].expand(len(texts), -1)
        positive[0][1]["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
    return positive, negative


def _in_sampling(run: _Run, batch: Batch, fn: Callable, after: Callable = lambda out: out):
    """``fn(ctx, batch)`` (under autocast), then ``after`` of its result, inside ComfyUI's sampling
    context for the batch: the guider prepares models, conditioning and options exactly as for
    sampling, and hands in the noise and the process_latent_in'd latents."""
    config = run.config
    guider = comfy.samplers.CFGGuider(run.tuned)
    guider.set_conds(*_conditioning(run, batch.prompts))
    guider.set_cfg(config.cfg)
    latents = batch.latents
    shape = latents.shape if latents is not None else (len(batch.prompts), run.tuned.model.latent_format.latent_channels,
                                                       config.height // 8, config.width // 8)
    noise = torch.randn(shape, generator=run.generator)

    def inside(model_wrap, sigmas, extra_args, noise_in, latents_in):
        ctx = StepContext(model_wrap, sigmas, extra_args, run.decode, run.generator, run.lora.merged,
                          run.lora.disabled, run.consistency)
        with run.autocast():
            out = fn(ctx, dataclasses.replace(batch, noise=noise_in,
                                              latents=latents_in if latents is not None else None))
        return after(out)
    sampler = StepSampler(inside)
    guider.sample(noise, latents if latents is not None else torch.zeros(shape), sampler, run.sigmas,
                  seed=config.seed + run.step)
    return sampler.out


def _train_on(run: _Run, objective: "Objective", batch: Batch) -> dict:
    """One micro-batch of an objective: its loss, back-propagated inside the sampling context."""
    def backward(out):
        loss, metrics = out
        if not torch.isfinite(loss):
            raise TrainingError(f"the {objective.name} loss is {loss.item()} at step {run.step + 1} (the reward "
                                "returned NaN/inf, or the model diverged); lower the learning rate. The last "
                                "checkpoint is kept.")
        run.scaler.scale(loss / run.config.grad_accum).backward()
        return metrics
    return _in_sampling(run, batch, lambda ctx, b: objective.step(ctx, b, run.reward, run.config), backward)


def _optimizer_step(run: _Run) -> torch.Tensor:
    """Once per accumulation cycle: unscale (fp16), clip, step. An fp16 overflow skips the update
    (the scaler lowers its scale); too many in a row, or a non-finite norm without fp16, stop the run."""
    config, scaler = run.config, run.scaler
    # torchrun: each process back-propagated its rows of the global batch; their mean gradient is the
    # global batch's (distributed.py says why an all-reduce here and not DistributedDataParallel)
    distributed.average_gradients(run.lora.parameters(), run.world)
    scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.lora.parameters(),
                                               config.grad_clip if config.grad_clip > 0 else float("inf"))
    if torch.isfinite(grad_norm):
        run.skipped = 0
    elif not scaler.is_enabled():
        raise TrainingError(f"the gradient norm is {grad_norm.item()} at step {run.step + 1}; lower the learning rate "
                            "or use fp32/bf16. The last checkpoint is kept.")
    else:
        run.skipped += 1
        if run.skipped >= MAX_SKIPPED_FP16_STEPS:
            raise TrainingError(f"fp16 gradients overflowed {run.skipped} steps in a row (up to step {run.step + 1}); "
                                "use bf16 or fp32, or lower the learning rate. The last checkpoint is kept.")
    scaler.step(run.optimizer)
    scaler.update()
    return grad_norm


# ------------------------------------------------------------------------------ the objectives
def _draw_prompts(run: _Run) -> Batch:
    return Batch(run.pick_prompts(run.config.batch_size))


def _draw_images(run: _Run) -> Batch:
    picks = run.batches.next()
    return Batch([p.caption for p in picks], latents=torch.cat([p.image for p in picks]))


def _draw_replay(run: _Run) -> Batch:
    b = run.config.batch_size
    pairs = run.pool.sample(b * run.world.size, run.generator, num_steps=len(run.sigmas) - 1,  # ddim_uniform may add one
                            prioritised=run.config.sqdf_prioritised, gamma=run.config.sqdf_gamma)[run.world.rows(b)]
    return Batch([t.prompt for t, _ in pairs], pairs=pairs)


def _collect_trajectories(run: _Run) -> dict:
    """SQDF, before the step's micro-batches: fresh trajectories with the current policy (no grad)
    into the replay buffer (or, on-policy, into a pool of this step's only).

    Under torchrun each process collects ``sqdf_collect`` (its rows of each global chunk) and the
    chunks are gathered to every process in rank order: one replay buffer, the same on every rank
    and the same as one process with the global batch collects. So the replay samples are drawn
    from the shared stream and sliced like everything else, rank 0's checkpoint holds the whole
    buffer, and every rank resumes it from there. The cost: every rank holds the whole buffer
    (sqdf_buffer trajectories, as one process would) and the fresh latents cross the network once."""
    config, t0 = run.config, time.perf_counter()
    fresh, metrics, collected = [], {}, 0
    while collected < config.sqdf_collect:
        n = min(config.batch_size, config.sqdf_collect - collected)
        everyone = run.pick_prompts(n, everyone=True)
        trajs, m = _in_sampling(run, Batch(everyone[run.world.rows(n)]),
                                lambda ctx, b: sqdf.collect(ctx, b, run.reward))
        fresh += _gather_trajectories(trajs, everyone, run.world)
        collected += n
        metrics["collect_reward"] = metrics.get("collect_reward", 0.0) + m["collect_reward"] * n / config.sqdf_collect
    metrics["collect_seconds"] = time.perf_counter() - t0
    run.pool = run.replay if config.sqdf_use_buffer else ReplayBuffer(len(fresh))  # on-policy: the paper's ablation
    run.pool.add(fresh)
    return metrics


def _gather_trajectories(trajs: list, prompts: list[str], world: World) -> list:
    """Every rank's trajectories of one chunk, in rank order (the global chunk's order); one process: as they are."""
    if not world.distributed:
        return trajs
    latents = distributed.gather_rows(torch.stack([t.latents for t in trajs]), world)
    rewards = distributed.gather_rows(torch.tensor([t.reward for t in trajs], dtype=torch.float64), world)
    return [Trajectory(latents[i], prompts[i], float(rewards[i])) for i in range(len(prompts))]


@dataclass(frozen=True)
class Objective:
    """An objective as the loop runs it: ``draw(run)`` picks a micro-batch, ``step(ctx, batch,
    reward, config)`` is its loss (objectives.py, sqdf.py); ``prepare(run)``, if any, runs once
    per optimizer step before the micro-batches and returns metrics."""
    name: str
    step: Callable
    draw: Callable[[_Run], Batch]
    prepare: Callable[[_Run], dict] | None = None


OBJECTIVES = {"refl": Objective("classic ReFL", classic_refl_step, _draw_prompts),
              "imagerefl": Objective("ImageReFL", imagerefl_step, _draw_images),
              "sqdf": Objective("SQDF", sqdf.update, _draw_replay, prepare=_collect_trajectories)}


# ------------------------------------------------------------------------------ the loop
def train(model, vae, reward: Callable, config: TrainConfig, *, encode: Callable, prompts: list[str] | None = None,
          images: dict[tuple[int, int], list[Example]] | None = None, out_dir: str | None = None,
          resume: str | None = None, should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[dict], None] | None = None,
          on_checkpoint: Callable[[int, torch.Tensor], None] | None = None,
          world: World | None = None) -> TrainResult:
    """``world``: this process's rank under torchrun (``distributed.from_environment``, after
    ``distributed.init_process_group``); None: one process. Then ``config.batch_size`` is per
    process, the global batch world × it, and rank 0 writes the files."""
    world = world or World()
    run = _setup(model, vae, reward, config.validate(), encode, prompts, images, out_dir, world)
    if resume:
        _restore(run, load_checkpoint(resume))
    objective, regulariser = OBJECTIVES[config.objective], OBJECTIVES["refl"]
    stopped = False
    with comfy_training_mode(), gradient_checkpointing(run.tuned.model.diffusion_model, config.grad_checkpointing):
        while run.step < config.steps:
            if distributed.any_rank(should_stop is not None and should_stop(), world):
                stopped = True
                break
            t0 = time.perf_counter()
            run.optimizer.zero_grad(set_to_none=True)
            with run.sliced_noise():
                metrics = objective.prepare(run) if objective.prepare else {}
                for _ in range(config.grad_accum):
                    for k, v in _train_on(run, objective, objective.draw(run)).items():
                        metrics[k] = metrics.get(k, 0.0) + v / config.grad_accum
                if config.objective == "imagerefl" and config.refl_every and (run.step + 1) % config.refl_every == 0:
                    m = _train_on(run, regulariser, regulariser.draw(run))  # classic ReFL every refl_every-th step
                    metrics.update({f"regulariser_{k}": v for k, v in m.items()})
            grad_norm = _optimizer_step(run)
            metrics = distributed.average_metrics(metrics, world)  # the global batch's, the same on every rank
            run.step += 1
            metrics.update(step=run.step, grad_norm=float(grad_norm), seconds=time.perf_counter() - t0)
            run.history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            if run.step % config.save_every == 0 or run.step == config.steps:
                _save(run)
                if on_checkpoint is not None and run.preview is not None:
                    on_checkpoint(run.step, run.preview.float().cpu())  # (3, H, W) in [0, 1]: the x̂0 the reward saw
    lora_path = None
    if out_dir:
        if stopped or run.step % config.save_every:
            _save(run)
        lora_path = os.path.join(out_dir, "lora.safetensors")
        if world.is_main:
            save_lora(lora_path, run.lora, {"rewardtune_config": config.to_json(), "rewardtune_step": str(run.step)})
        distributed.barrier(world)
    return TrainResult(run.tuned, run.lora, run.step, run.history, stopped, lora_path)
