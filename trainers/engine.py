"""The training loop: one loop, the objectives plug in (nanoGPT-style: read it top to bottom).

    result = train(model, vae, reward, config, prompts=..., images=..., encode=..., out_dir=...)

``images`` are the aspect buckets ``data.load_examples`` (a folder of images with .txt captions)
or ``data.examples_from_graph`` (an IMAGE batch) return.

``model`` is a ComfyUI MODEL (ModelPatcher); it is cloned and LoRA adapters are added to the
clone, so the graph's model is never changed. ``encode(prompt) -> CONDITIONING`` turns captions
into conditioning (a CLIP's ``encode_from_tokens_scheduled``). ``reward(images, prompts)`` returns
s·(R + o) for images (B, 3, H, W) in [0, 1]; ``reward_from_model`` adapts a RewardModel.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.samplers

from .config import ConfigError, TrainConfig
from .data import BatchSampler, Example
from .atomic import atomic_write
from .checkpointing import gradient_checkpointing
from .lora import LoraSet, save_lora
from .objectives import StepContext, classic_refl_step, imagerefl_step, randint
from . import sqdf
from .replay import ReplayBuffer


MAX_SKIPPED_FP16_STEPS = 20
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
    """A RewardModel as the engine's reward: s·(R + o) on BCHW images in [0, 1]."""
    s = reward_model.scale if scale is None else scale
    o = reward_model.offset if offset is None else offset
    return lambda images, prompts: s * (reward_model.score(images, prompts, layout="BCHW") + o)


class StepSampler(comfy.samplers.Sampler):
    """Runs one training step where ComfyUI has prepared conditioning, models and options,
    exactly as for sampling; the latent passes through unchanged."""

    def __init__(self, fn):
        self.fn, self.out = fn, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.out = self.fn(model_wrap, sigmas, extra_args, noise, latent_image)
        return latent_image


def make_decoder(vae, latent_format):
    """x0 in the sampler's latent space → images in [0, 1] (BCHW) with gradients through the
    frozen VAE. Not ``VAE.decode``: it clamps in place, reloads the model, and may fall back to
    tiled decoding without a graph."""
    first_stage = vae.first_stage_model
    first_stage.requires_grad_(False)

    def decode(x0):
        z = latent_format.process_out(x0).to(vae.vae_dtype)
        img = first_stage.decode(z).float()
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0)
    return decode


def _rng_state(gen: torch.Generator) -> dict:
    """The run's own generator: all a resume needs to draw the same numbers. (Checkpoints of
    earlier versions also hold the process-wide state under "torch"; it is not restored: a job
    must not reseed the generator a foreground sampler uses.)"""
    return {"generator": gen.get_state()}


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["generator"])


def save_checkpoint(path: str, step: int, lora: LoraSet, optimizer, gen: torch.Generator, config: TrainConfig,
                    history: list[dict], scaler=None, replay: ReplayBuffer | None = None) -> None:
    state = {"step": step, "lora": lora.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": _rng_state(gen), "config": config.to_json(), "history": json.dumps(history)}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if replay is not None:  # SQDF: the buffer is part of the state, so a resume is exact
        state["replay"] = replay.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """``mmap=True`` maps the tensors instead of reading them: for a look at the step, the config or
    the LoRA without reading the optimizer state and an SQDF replay buffer (gigabytes)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise TrainingError(f"cannot read the checkpoint {path}: {e}") from e


def train(model, vae, reward: Callable, config: TrainConfig, *, encode: Callable, prompts: list[str] | None = None,
          images: dict[tuple[int, int], list[Example]] | None = None, out_dir: str | None = None,
          resume: str | None = None, should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[dict], None] | None = None,
          on_checkpoint: Callable[[int, torch.Tensor], None] | None = None) -> TrainResult:
    cfg = config.validate()
    if cfg.objective in ("refl", "sqdf") or cfg.refl_every:
        if not prompts:
            raise ConfigError(f"{'SQDF' if cfg.objective == 'sqdf' else 'classic ReFL'} samples from prompts: "
                              "give at least one prompt")
    if cfg.objective == "imagerefl" and not images:
        raise ConfigError("ImageReFL trains on real images: give images with captions")
    device = model.load_device

    # --- the model: a clone with LoRA adapters; everything else frozen.
    # Every random number of the run (the LoRA's initial weights, noise, timestep picks, prompts,
    # batches, replay samples) comes from this one generator, never the process-wide one: on the
    # server a foreground sampler on another thread seeds and draws from that one meanwhile.
    gen = torch.Generator().manual_seed(cfg.seed)
    tuned = model.clone()
    tuned.model.requires_grad_(False)
    lora = LoraSet(tuned, cfg.rank, cfg.alpha, cfg.targets, generator=gen)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    latent_format = tuned.model.latent_format
    decode_images = make_decoder(vae, latent_format)
    preview: dict[str, torch.Tensor] = {}

    def decode(x0):  # keeps the newest decoded training image as a preview for on_checkpoint
        images = decode_images(x0)
        preview["image"] = images[0].detach()  # copied to the CPU only when a checkpoint uses it
        return images
    sigmas = comfy.samplers.calculate_sigmas(tuned.model.model_sampling, "ddim_uniform", cfg.num_steps).cpu()
    history: list[dict] = []
    step = 0
    replay = ReplayBuffer(cfg.sqdf_buffer, cfg.sqdf_window) if cfg.objective == "sqdf" else None
    consistency = None
    if cfg.objective == "sqdf" and cfg.sqdf_lcm_lora:
        consistency = sqdf.ConsistencyModel(tuned, cfg.sqdf_lcm_lora)
        log.info("SQDF: x̂0 from the consistency model %s (%d layers)", cfg.sqdf_lcm_lora, len(consistency.layers))
    elif cfg.objective == "sqdf":
        log.warning("SQDF: no LCM-LoRA given (sqdf_lcm_lora): x̂0 from the frozen reference's one-step prediction, "
                    "the paper's 'without consistency model' ablation")
    if resume:
        state = load_checkpoint(resume)
        lora.load_state_dict(state["lora"])
        if replay is not None and "replay" in state:
            replay.load_state_dict(state["replay"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(gen, state["rng"])
        step, history = int(state["step"]), json.loads(state["history"])

    # --- data: real latents encoded once (no grad); conditioning cached per caption
    # (``images``: {(h, w): [Example]} from data.load_examples / examples_from_graph; a batch
    # never mixes sizes)
    latents = {}
    for size, examples in (images or {}).items():
        with torch.no_grad():
            latents[size] = [Example(vae.encode(ex.image[None, ..., :3]).cpu(), ex.caption, ex.source)
                             for ex in examples]
    batches = BatchSampler(latents, cfg.batch_size, gen) if latents else None
    cond_cache: dict[str, list] = {}

    def pick_prompts(n: int) -> list[str]:
        return [prompts[randint(gen, 0, len(prompts) - 1)] for _ in range(n)]

    def cond(text):
        if text not in cond_cache:
            cond_cache[text] = encode(text)
        return cond_cache[text]

    negative = cond("")
    mm.load_models_gpu([vae.patcher])
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if out_dir and os.path.isdir(out_dir):  # half-written files of a killed save
        for name in os.listdir(out_dir):
            if name.endswith(".tmp"):
                os.remove(os.path.join(out_dir, name))

    def run_step(kind: str, texts: list[str], latent: torch.Tensor | None, pairs=None):
        """One micro-batch: an objective inside the sampling context; backward inside it too."""
        lengths = {cond(t)[0][0].shape[1] for t in texts}
        if len(lengths) > 1:
            raise TrainingError("captions encode to different lengths (over 75 tokens make longer conditioning); "
                                "shorten the long captions or use batch size 1")
        positive = [[torch.cat([cond(t)[0][0] for t in texts]), dict(cond(texts[0])[0][1])]]
        neg = [[negative[0][0].expand(len(texts), *negative[0][0].shape[1:]), dict(negative[0][1])]]
        if "pooled_output" in neg[0][1]:
            neg[0][1]["pooled_output"] = neg[0][1]["pooled_output"].expand(len(texts), -1)
            positive[0][1]["pooled_output"] = torch.cat([cond(t)[0][1]["pooled_output"] for t in texts])
        guider = comfy.samplers.CFGGuider(tuned)
        guider.set_conds(positive, neg)
        guider.set_cfg(cfg.cfg)
        shape = latent.shape if latent is not None else (len(texts), latent_format.latent_channels,
                                                        cfg.height // 8, cfg.width // 8)
        noise = torch.randn(shape, generator=gen)
        base_latent = latent if latent is not None else torch.zeros(shape)

        def inside(model_wrap, sig, extra_args, noise_in, latent_in):
            ctx = StepContext(model_wrap, sig, extra_args, model_wrap.inner_model.model_sampling, decode, gen,
                              lora.merged)
            with torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                                enabled=cfg.precision != "fp32"):
                if kind == "sqdf_collect":  # no loss: trajectories for the replay buffer
                    return sqdf.collect(ctx, noise_in, texts, reward, cfg)
                if kind == "refl":
                    loss, metrics = classic_refl_step(ctx, noise_in, texts, reward, cfg)
                elif kind == "sqdf_update":
                    loss, metrics = sqdf.update(ctx, pairs, reward, cfg, model_wrap, lora.disabled, consistency)
                else:
                    loss, metrics = imagerefl_step(ctx, noise_in, latent_in, texts, reward, cfg, model_wrap)
            if not torch.isfinite(loss):
                raise TrainingError(f"the {kind} loss is {loss.item()} at step {step + 1} (the reward returned "
                                    f"NaN/inf, or the model diverged); lower the learning rate. The last checkpoint is kept.")
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            return metrics

        sampler = StepSampler(inside)
        guider.sample(noise, base_latent, sampler, sigmas, seed=cfg.seed + step)
        return sampler.out

    # --- the loop
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if resume and scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    skipped = 0
    stopped = False
    with gradient_checkpointing(tuned.model.diffusion_model, cfg.grad_checkpointing):
        while step < cfg.steps:
            if should_stop is not None and should_stop():
                stopped = True
                break
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            metrics: dict = {}
            source = None
            if cfg.objective == "sqdf":  # collect fresh trajectories with the current policy (no grad)
                fresh = []
                while len(fresh) < cfg.sqdf_collect:
                    n = min(cfg.batch_size, cfg.sqdf_collect - len(fresh))
                    trajs, m = run_step("sqdf_collect", pick_prompts(n), None)
                    fresh += trajs
                    metrics["collect_reward"] = metrics.get("collect_reward", 0.0) + m["collect_reward"] * n / cfg.sqdf_collect
                metrics["collect_seconds"] = time.perf_counter() - t0
                if cfg.sqdf_use_buffer:
                    replay.add(fresh)
                    source = replay
                else:  # on-policy ablation: only this step's trajectories
                    source = ReplayBuffer(len(fresh))
                    source.add(fresh)
            for _ in range(cfg.grad_accum):
                if cfg.objective == "sqdf":
                    pairs = source.sample(cfg.batch_size, gen, num_steps=len(sigmas) - 1,  # ddim_uniform may add one
                                          prioritised=cfg.sqdf_prioritised, gamma=cfg.sqdf_gamma)
                    m = run_step("sqdf_update", [t.prompt for t, _ in pairs], None, pairs)
                elif cfg.objective == "refl":
                    m = run_step("refl", pick_prompts(cfg.batch_size), None)
                else:
                    picks = batches.next()
                    m = run_step("imagerefl", [p.caption for p in picks], torch.cat([p.image for p in picks]))
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
            if cfg.objective == "imagerefl" and cfg.refl_every and (step + 1) % cfg.refl_every == 0:
                m = run_step("refl", pick_prompts(cfg.batch_size), None)
                metrics.update({f"regulariser_{k}": v for k, v in m.items()})
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(lora.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if torch.isfinite(grad_norm):
                skipped = 0
            elif scaler is None:
                raise TrainingError(f"the gradient norm is {grad_norm.item()} at step {step + 1}; lower the learning rate "
                                    "or use fp32/bf16. The last checkpoint is kept.")
            else:  # an fp16 overflow: the scaler skips this update and lowers its scale
                skipped += 1
                if skipped >= MAX_SKIPPED_FP16_STEPS:
                    raise TrainingError(f"fp16 gradients overflowed {skipped} steps in a row (up to step {step + 1}); "
                                        "use bf16 or fp32, or lower the learning rate. The last checkpoint is kept.")
            if scaler is not None:
                scaler.step(optimizer)  # once per accumulation cycle
                scaler.update()
            else:
                optimizer.step()  # once per accumulation cycle
            step += 1
            metrics.update(step=step, grad_norm=float(grad_norm), seconds=time.perf_counter() - t0)
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            if step % cfg.save_every == 0 or step == cfg.steps:
                if ckpt_path:
                    save_checkpoint(ckpt_path, step, lora, optimizer, gen, cfg, history, scaler, replay)
                if on_checkpoint is not None and "image" in preview:
                    on_checkpoint(step, preview["image"].float().cpu())  # (3, H, W) in [0, 1]: the x̂0 the reward saw

    lora_path = None
    if out_dir:
        if ckpt_path and (stopped or step % cfg.save_every):
            save_checkpoint(ckpt_path, step, lora, optimizer, gen, cfg, history, scaler, replay)
        lora_path = os.path.join(out_dir, "lora.safetensors")
        save_lora(lora_path, lora, {"rewardtune_config": cfg.to_json(), "rewardtune_step": str(step)})
    return TrainResult(tuned, lora, step, history, stopped, lora_path)
