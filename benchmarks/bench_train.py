"""Training-step overhead: the engine's optimizer step vs a bare-torch lower bound, in one run.

Engine: ``trainers.engine.train`` (each micro-batch inside ComfyUI's CFGGuider.sample, LoRA as the
patcher's weight wrappers). Bare: the same work called directly on a copy of the same UNet with
plain-torch LoRA on the same layers (merged weight W + (α/r)·up·down: once per no-grad denoise, as
the engine's LoraSet.merged does, and per forward in the graph-building calls): the same no-grad DDPM steps (cond and uncond batched in one UNet call, ComfyUI's
model_sampling scalings), one CFG forward with grad, the VAE decoder, the reward, backward,
clip_grad_norm_, AdamW.step; for ImageReFL also the conditional diffusion-loss forward.
Both sides use the same config: fixed stop index (refl_stop_min == refl_stop_max, and
imagerefl_tf_min == imagerefl_tf_max), so the number of UNet calls is the same.

A step is the time between consecutive ``on_step`` callbacks (bare: between consecutive steps),
so cloning, LoRA creation, encoding and other setup are excluded; each round runs 1 + k steps on
each side and drops the first (model load, optimizer state). Rounds are interleaved (the order
alternates); the median over all timed steps of a side is reported; ratio = engine / bare.
One torch thread by default: on a shared 2-core machine two threads stall in OpenMP barriers
whenever the other core is busy (single UNet calls then vary 100x).

``--model flux``: the tiny Flux dev transformer of testing/tiny_flow_models.py (1.0M parameters, a
16-channel TAESD, T5-shaped conditioning of 77 tokens with pooled output and guidance 3.5); both
sides take the rectified-flow step (``steps.sampling_steps``) and LoRA on every linear layer of
the transformer blocks (targets "auto"). Both sides run their blocks inside the engine's block
wrapper (``checkpointing.gradient_checkpointing``: saved tensors copied, or checkpointed with
``--grad-checkpointing``) and with ComfyUI's ``in_training`` flag, which DiT blocks need to be
differentiable at all.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps-per-round 3] [--model tiny|sd15|flux]
        [--latent 16] [--threads N] [--objective refl|imagerefl|both] [--device cpu|cuda]
        [--precision fp32|bf16|fp16] [--grad-checkpointing] [--profile] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a cat", "a dog", "a red house"]


def bootstrap(cpu: bool):
    from _pack import import_pack
    import_pack(comfy_cpu=cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=3, help="timed optimizer steps per round and side")
    ap.add_argument("--model", choices=["tiny", "sd15", "flux"], default="tiny",
                    help="tiny: the 1M-parameter test UNet; sd15: the smallest detectable SD1.5 UNet (25.8M); "
                         "flux: the 1.0M-parameter tiny Flux dev transformer")
    ap.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); on a shared CPU 2+ threads can stall in OpenMP barriers")
    ap.add_argument("--objective", choices=["refl", "imagerefl", "both"], default="both")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="TrainConfig.grad_checkpointing; the bare side checkpoints the same UNet blocks")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, one more round of each side under cProfile (top functions by cumulative time)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bootstrap(cpu=a.device == "cpu")

    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    import comfy.sd
    from rewardtune.testing import tiny_models as tm
    from rewardtune.trainers.config import TrainConfig
    from rewardtune.trainers.data import examples_from_graph
    from rewardtune.trainers.engine import train
    from rewardtune.trainers.objectives import diffusion_mse, imagerefl_loss, refl_loss
    from rewardtune.trainers.lora import target_modules
    from rewardtune.trainers.steps import comfy_training_mode, sampling_steps
    # the engine's block wrapper (saved tensors copied, or torch.utils.checkpoint on the blocks)
    from rewardtune.trainers.checkpointing import gradient_checkpointing as checkpointing

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    dev = mm.get_torch_device()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ shared setup
    flux = a.model == "flux"
    if flux:
        from rewardtune.testing import tiny_flow_models as tf
        base_model = tf.build_flow_model("flux_dev", 0)
        vae = tf.tiny_flow_vae(2)
    else:
        unet_cfg, ctx_dim = (tm.SD15_UNET, 768) if a.model == "sd15" else (tm.TINY_UNET, tm.TINY_CONTEXT_DIM)
        base_model = tm.build_unet_model(tm.TinySD, unet_cfg, 0)
        vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    patcher = comfy.model_patcher.ModelPatcher(base_model, load_device=dev, offload_device=mm.unet_offload_device())
    unet_params = sum(p.numel() for p in base_model.diffusion_model.parameters())
    latent_channels = base_model.latent_format.latent_channels

    def encode(text):  # 77 tokens like CLIP
        if flux:
            return tf.flow_conditioning(base_model, sum(map(ord, text)) % 997, tokens=77, guidance=3.5)
        return tm.tiny_conditioning(sum(map(ord, text)) % 997, tokens=77, dim=ctx_dim)

    torch.manual_seed(1)
    reward_net = torch.nn.Sequential(  # a small frozen conv net: images (B, 3, H, W) → (B,)
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.SiLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1)).to(dev).requires_grad_(False)

    def reward(images, prompts):
        return reward_net(images).squeeze(1)

    side = a.latent * 8
    g = torch.Generator().manual_seed(4)
    images = examples_from_graph(torch.rand(3, side, side, 3, generator=g), PROMPTS, side, side)  # one bucket
    stop, start = 7, 4

    def config(objective, steps):
        return TrainConfig(objective=objective, steps=steps, batch_size=2, grad_accum=1, lr=1e-4, rank=4, alpha=4.0,
                           num_steps=10, cfg=5.0, refl_stop_min=stop, refl_stop_max=stop, imagerefl_start=start,
                           imagerefl_tf_min=stop, imagerefl_tf_max=stop, width=side, height=side, save_every=10**9,
                           precision=a.precision, grad_checkpointing=a.grad_checkpointing,
                           **({"targets": ["auto"]} if flux else {})).validate()

    # ------------------------------------------------------------------ bare torch
    class LoraLinear(torch.nn.Module):
        """Plain-torch LoRA on a frozen linear: F.linear(x, W + (α/r)·up·down, b)."""

        def __init__(self, base, rank, alpha):
            super().__init__()
            self.base, self.scale = base, alpha / rank
            self.up = torch.nn.Parameter(torch.empty(base.weight.shape[0], rank, device=base.weight.device))
            self.down = torch.nn.Parameter(torch.zeros(rank, base.weight.shape[1], device=base.weight.device))
            self.reset()

        def reset(self):
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(self.up, a=5 ** 0.5)
                self.down.zero_()

        frozen = None  # the merged weight while no-grad calls run

        def forward(self, x):
            w = self.frozen if self.frozen is not None else self.base.weight + self.scale * (self.up @ self.down)
            return torch.nn.functional.linear(x, w, self.base.bias)

    cfg0 = config("refl", 1)
    unet = copy.deepcopy(base_model.diffusion_model).to(dev).requires_grad_(False)  # before any patching
    loras = []
    for name, module in target_modules(unet, cfg0.targets):  # LoraSet's choice
        parent_name, _, child = name.rpartition(".")
        lora = LoraLinear(module, cfg0.rank, cfg0.alpha)
        setattr(unet.get_submodule(parent_name), child, lora)
        loras.append(lora)
    ms, latent_format = copy.deepcopy(base_model.model_sampling).to(dev), base_model.latent_format
    step = sampling_steps(ms).step
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", cfg0.num_steps).to(dev)  # the engine's are on dev too
    first_stage = vae.first_stage_model
    mm.load_models_gpu([vae.patcher])
    with torch.no_grad():
        bare_latents = [latent_format.process_in(vae.encode(ex.image[None])).to(dev) for ex in images[(side, side)]]
    conds = torch.cat([encode(p)[0][0] for p in PROMPTS[:2]]).to(dev)   # batch 2: two captions
    uncond = encode("")[0][0].expand(2, -1, -1).to(dev)
    cu = torch.cat([conds, uncond])
    if flux:  # pooled CLIP output per sample, and the guidance embedding
        pooled = {id(conds): torch.cat([encode(p)[0][1]["pooled_output"] for p in PROMPTS[:2]]).to(dev)}
        pooled[id(cu)] = torch.cat([pooled[id(conds)], encode("")[0][1]["pooled_output"].expand(2, -1).to(dev)])
    bare_gen = torch.Generator().manual_seed(0)

    def unet_x0(x, sigma, context):
        extra = {}
        if flux:
            extra = dict(y=pooled[id(context)], guidance=torch.full((x.shape[0],), 3.5, device=dev))
        out = unet(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), context=context, **extra)
        return ms.calculate_denoised(sigma, out, x)

    def cfg_x0(x, s, cfg):  # cond and uncond in one batch, as calc_cond_batch does
        out = unet_x0(torch.cat([x, x]), s.expand(2 * x.shape[0]).to(x), cu)
        c, u = out.chunk(2)
        return u + (c - u) * cfg

    def denoise(x, i0, i1, cfg):
        with torch.no_grad():
            for lora in loras:
                lora.frozen = lora.base.weight + lora.scale * (lora.up @ lora.down)
            for i in range(i0, i1):
                x0 = cfg_x0(x, sigmas[i], cfg)
                x = step(x, x0, sigmas[i], sigmas[i + 1], torch.randn(x.shape, generator=bare_gen).to(x))
            for lora in loras:
                lora.frozen = None
        return x

    def decode(x0):
        img = first_stage.decode(latent_format.process_out(x0).to(vae.vae_dtype)).float()
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0)

    def bare_step(objective, cfg, opt, params, scaler):
        opt.zero_grad(set_to_none=True)
        noise = torch.randn((2, latent_channels, a.latent, a.latent), generator=bare_gen).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                            enabled=cfg.precision != "fp32"):
            if objective == "refl":
                x = denoise(ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), True), 0, stop, cfg.cfg)
                r = reward(decode(cfg_x0(x.detach(), sigmas[stop], cfg.cfg)), PROMPTS[:2])
                loss = refl_loss(r, cfg.refl_lambda, cfg.refl_weight)
            else:
                lat = torch.cat(bare_latents[:2])
                x = denoise(ms.noise_scaling(sigmas[start], noise, lat, False), start, stop, cfg.cfg)
                r = reward(decode(cfg_x0(x.detach(), sigmas[stop], cfg.cfg)), PROMPTS[:2])
                t = int(torch.randint(0, len(ms.sigmas), (1,), generator=bare_gen))
                sig = torch.full((2,), float(ms.sigmas[t])).to(lat)
                eps = torch.randn(lat.shape, generator=bare_gen).to(lat)
                mse = diffusion_mse(unet_x0(ms.noise_scaling(sig, eps, lat, False), sig, conds), lat, sig)  # cond only
                loss = imagerefl_loss(mse, r, cfg.loss_scale, cfg.mse_weight)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        else:  # fp16: loss scaling as the engine does
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()

    def run_bare(objective, k, profiler=None):
        cfg = config(objective, k + 1)
        for lora in loras:
            lora.reset()
        params = [p for lora in loras for p in (lora.up, lora.down)]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(dev.type) if cfg.precision == "fp16" else None
        stamps = []
        with comfy_training_mode(), checkpointing(unet, cfg.grad_checkpointing):
            for _ in range(k + 1):
                bare_step(objective, cfg, opt, params, scaler)
                sync()
                stamps.append(time.perf_counter())
                if profiler is not None and len(stamps) == 1:
                    profiler.enable()
        if profiler is not None:
            profiler.disable()
        return [b - a_ for a_, b in zip(stamps, stamps[1:])]

    # ------------------------------------------------------------------ engine
    def run_engine(objective, k, profiler=None):
        stamps = []

        def on_step(metrics):
            sync()
            stamps.append(time.perf_counter())
            if profiler is not None and len(stamps) == 1:
                profiler.enable()
        res = train(patcher, vae, reward, config(objective, k + 1), encode=encode, prompts=PROMPTS[:2],
                    images=images if objective == "imagerefl" else None, on_step=on_step)
        if profiler is not None:
            profiler.disable()
        assert res.step == k + 1  # the engine itself stops on a non-finite loss
        return [b - a_ for a_, b in zip(stamps, stamps[1:])]

    # ------------------------------------------------------------------ rounds
    objectives = ["refl", "imagerefl"] if a.objective == "both" else [a.objective]
    k = a.steps_per_round
    times = {f"{o}/{s}": [] for o in objectives for s in ("engine", "bare")}
    peak = {}
    for o in objectives:  # warm-up: first loads, allocator, attention backend selection
        run_engine(o, 0)
        run_bare(o, 0)
    for rnd in range(a.rounds):
        for o in objectives:
            sides = [("engine", run_engine), ("bare", run_bare)]
            for s, fn in (sides if rnd % 2 == 0 else sides[::-1]):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                step_times = fn(o, k)
                times[f"{o}/{s}"] += step_times
                if cuda:
                    peak[f"{o}/{s}"] = max(peak.get(f"{o}/{s}", 0), torch.cuda.max_memory_allocated() / 2**20)
            print(f"round {rnd + 1}: {o} engine {statistics.median(times[f'{o}/engine'][-k:]):.3f}s "
                  f"bare {statistics.median(times[f'{o}/bare'][-k:]):.3f}s", flush=True)

    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"device": str(dev), "model": a.model, "unet_params": unet_params, "latent": a.latent,
              "batch": 2, "num_steps": 10, "stop": stop, "imagerefl_start": start, "cfg": 5.0,
              "lora": {"rank": 4, "layers": len(loras)}, "precision": a.precision,
              "grad_checkpointing": a.grad_checkpointing, "threads": torch.get_num_threads(), "rounds": a.rounds,
              "steps_per_round": k, "loadavg": os.getloadavg(), "median_step_s": med, "step_s": times,
              "ratio": {o: med[f"{o}/engine"] / med[f"{o}/bare"] for o in objectives},
              "ratio_per_round": {o: [sum(times[f"{o}/engine"][i:i + k]) / sum(times[f"{o}/bare"][i:i + k])
                                      for i in range(0, len(times[f"{o}/bare"]), k)] for o in objectives}}
    if cuda:
        result["peak_mib"] = peak
    print(f"\ndevice {dev}, UNet {a.model} ({unet_params / 1e6:.2f}M params, {len(loras)} LoRA layers rank 4), "
          f"latent {a.latent}x{a.latent}, batch 2, 10 steps, stop {stop}, CFG 5, {a.precision}, "
          f"threads {torch.get_num_threads()}, median of {a.rounds} interleaved rounds x {k} steps per side")
    print(f"{'objective':10s} {'engine s/step':>14s} {'bare s/step':>12s} {'ratio':>7s}"
          + ("  peak MiB e/b" if cuda else ""))
    for o in objectives:
        e, b = med[f"{o}/engine"], med[f"{o}/bare"]
        mem = f"  {peak[f'{o}/engine']:.0f}/{peak[f'{o}/bare']:.0f}" if cuda else ""
        print(f"{o:10s} {e:14.3f} {b:12.3f} {e / b:7.3f}{mem}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)

    if a.profile:
        for o in objectives:
            for s, fn, top in (("engine", run_engine, 25), ("bare", run_bare, 12)):
                prof = cProfile.Profile()
                fn(o, k, prof)
                print(f"\n--- {s} {o}: {k} steps under cProfile, top {top} by cumulative time")
                pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
