"""Real-size training cost: step time and peak memory of the engine next to the bare-torch composite of
the same work, per objective, plus the memory estimate made on the CPU without a GPU.

Models are built through ComfyUI's own classes with random weights (nothing is downloaded):

* SD1.5: ``comfy.supported_models.SD15`` → ``BaseModel`` with ComfyUI's ``UNetModel`` (859.5M), the
  SD VAE (``AutoencoderKL``, 83.7M), 512², batch 4;
* SDXL: ``comfy.supported_models.SDXL`` (2567.5M UNet), the same VAE layout, 1024², batch 1;
* reward: HPSv2's architecture (OpenCLIP ViT-H-14, 986M) in the pack's ``HPSv2`` reward class;
* LoRA rank 8 (α 8) on to_q/k/v/out.0, bf16 autocast, gradient checkpointing of the UNet, AdamW.

Per objective (ReFL; ImageReFL; SQDF collection — the no-grad trajectories, and SQDF update):

1. **estimate** (always, on the CPU): ``trainers.memory.estimate`` on fake copies of the real-size
   models under ``FakeTensorMode`` with PyTorch's MemTracker — no memory is allocated, the models
   themselves are built under ``FakeTensorMode`` (2.6B parameters cost nothing);
2. **run** (``--device cuda``, or ``--device cpu --reduced``): the engine (``trainers.engine.train``)
   and the composite (``trainers.memory.CompositeStep``, plain torch calls on the same ComfyUI
   modules) each in its own process, so each peak is its own: ``torch.cuda.max_memory_allocated``
   on a GPU, the MemTracker's peak on the CPU. Step = time between consecutive steps after one
   warm-up step; median.
3. ``--compile`` (CUDA): the composite's no-grad denoiser through ``torch.compile`` (mode
   ``reduce-overhead``: CUDA graphs, the shapes are static) and its speed-up over eager. The
   engine's calls go through ComfyUI's sampler; compiling them needs a hook in the engine (see the
   report), so the engine is timed eager.

Schedules: ReFL and ImageReFL on the papers' 40-step DDPM grid, CFG 7.5, with the random windows
fixed to their middle (ReFL stop 35 of 40; ImageReFL start 30, t_f 35) so both sides do the same
number of UNet calls; SQDF on its preset's 50 steps, CFG 5, collecting one batch per step.
``--reduced`` (CPU): the smallest UNet ComfyUI detects as SD1.5 (25.8M, 64², batch 2) and as SDXL
(64², batch 1), a TAESD VAE, a small conv reward, a 10-step grid, fp32: shows the benchmark works.

    python benchmarks/gpu_train.py --device cuda [--compile] [--json out.json]     # on a GPU
    python benchmarks/gpu_train.py --device cpu --reduced                         # ~2 minutes
    python benchmarks/gpu_train.py --estimate-only                                # real-size estimates
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("refl", "imagerefl", "sqdf_collect", "sqdf_update")
GiB = 2 ** 30
# issue 17's targets (a bare diffusers composite on an H100): seconds per step, peak GiB
TARGETS = {("sd15", "refl"): (2.8, 8), ("sd15", "imagerefl"): (0.87, 8),
           ("sdxl", "refl"): (7.1, 12), ("sdxl", "imagerefl"): (2.5, 12)}

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                 context_dim=768, use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                 use_temporal_resblock=False, use_spatial_transformer=True, legacy=False, num_heads=8,
                 num_head_channels=-1, use_checkpoint=False)
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                 use_temporal_attention=False, use_temporal_resblock=False, use_spatial_transformer=True,
                 legacy=False, num_heads=-1, num_head_channels=64, use_checkpoint=False)
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
HPS_V2 = dict(embed_dim=1024, vision_cfg=dict(image_size=224, patch_size=14, width=1280, layers=32, head_width=80),
              text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24))


def bootstrap(cpu: bool):
    """Import this checkout as ``rewardtune`` (a private link, as the tests do) and set ComfyUI up."""
    pkgs = tempfile.mkdtemp(prefix="rt-gpu-train-")
    os.symlink(ROOT, os.path.join(pkgs, "rewardtune"))
    sys.path.insert(0, pkgs)
    from rewardtune.testing.comfy_host import prepare_comfy_import
    prepare_comfy_import(cpu=cpu)


# ----------------------------------------------------------------------------- sizes and configs
def spec(model: str, reduced: bool) -> dict:
    from rewardtune.testing import tiny_models as tm
    if reduced:
        return {"sd15": dict(unet=tm.SD15_UNET, family="SD15", batch=2, side=64, ctx=768, pooled=None),
                "sdxl": dict(unet=tm.SDXL_UNET, family="SDXL", batch=1, side=64, ctx=2048, pooled=1280)}[model]
    return {"sd15": dict(unet=SD15_UNET, family="SD15", batch=4, side=512, ctx=768, pooled=None),
            "sdxl": dict(unet=SDXL_UNET, family="SDXL", batch=1, side=1024, ctx=2048, pooled=1280)}[model]


def config(kind: str, s: dict, reduced: bool, precision: str, steps: int = 1):
    from rewardtune.trainers.config import TrainConfig
    n, stop, start = (10, 7, 4) if reduced else (40, 35, 30)
    common = dict(steps=steps, batch_size=s["batch"], grad_accum=1, lr=1e-4, rank=8, alpha=8.0, width=s["side"],
                  height=s["side"], precision=precision, grad_checkpointing=True, save_every=10 ** 9)
    if kind.startswith("sqdf"):
        return TrainConfig(objective="sqdf", num_steps=10 if reduced else 50, cfg=5.0, sqdf_collect=s["batch"],
                           sqdf_buffer=64, sqdf_window=64, **common).validate()
    return TrainConfig(objective=kind, num_steps=n, cfg=7.5, refl_stop_min=stop, refl_stop_max=stop,
                       imagerefl_start=start, imagerefl_tf_min=stop, imagerefl_tf_max=stop, **common).validate()


# ----------------------------------------------------------------------------- models
def _init_(module, seed: int, device):
    """Random weights on their device (fan-in scaled, a small output layer, unit norms), fast."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(max(p[0].numel(), 1)) * (0.1 if name.startswith("out.") else 1.0)
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
            elif "norm" in name or name.endswith(("weight", "gamma")):
                p.fill_(1.0)
            else:
                p.zero_()


def build(model: str, reduced: bool, device: str, fake_mode=None):
    """(MODEL patcher or BaseModel, VAE, reward module) for ``model``. With ``fake_mode``: every
    weight a fake tensor (nothing allocated), for the estimate."""
    import contextlib
    import torch
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from rewardtune.testing import tiny_models as tm
    s = spec(model, reduced)
    dtype = torch.float32 if reduced else torch.bfloat16
    model_config = getattr(comfy.supported_models, s["family"])(dict(s["unet"]))
    model_config.set_inference_dtype(dtype, None)
    fake = fake_mode is not None
    with (fake_mode if fake else contextlib.nullcontext()):
        base = model_config.get_model({}, device=torch.device(device))
    if fake:  # the σ table from real values (the schedule needs them)
        base.model_sampling = comfy.model_base.model_sampling(model_config, base.model_type)
    else:
        _init_(base.diffusion_model, 0, device)
    # VAE
    if reduced:
        vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        if fake:  # bf16, ComfyUI's VAE dtype on recent NVIDIA GPUs (``.to`` cannot swap fake weights: a fake copy)
            from rewardtune.trainers.memory import fake_copy
            with fake_mode:
                vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
            vae = fake_copy(vae, fake_mode, "cpu", dtype=torch.bfloat16)
        else:
            with torch.device(device):
                first_stage = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
            _init_(first_stage, 1, device)
            vae = comfy.sd.VAE(sd={k: v.cpu() for k, v in first_stage.state_dict().items()})
            del first_stage
    # reward
    if reduced:
        reward = small_reward()  # (the estimate fake-copies it)
    else:
        from open_clip.model import CLIP
        from rewardtune.rewards.clip_rewards import HPSv2
        if fake:
            from rewardtune.trainers.memory import fake_copy
            with fake_mode:
                clip = CLIP(**HPS_V2)
            clip = fake_copy(clip, fake_mode, "cpu", dtype=torch.bfloat16)
        else:
            with torch.device(device):
                clip = CLIP(**HPS_V2).to(torch.bfloat16)
            _init_(clip, 2, device)
        reward = HPSv2(clip, 77)
    reward.requires_grad_(False)
    if fake:
        return base, vae, reward
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, vae, reward.to(device)


def small_reward():
    import torch

    class SmallReward(torch.nn.Module):
        """A small frozen conv net: images (B, 3, H, W) → (B,)."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
                                           torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.SiLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)

        def forward(self, images, prompts=None):
            return self.net(images).squeeze(1)
    return SmallReward()


def reward_fn(reward):
    if hasattr(reward, "training_reward"):
        return lambda images, prompts: reward.training_reward(images, prompts, layout="BCHW")
    return reward


# ----------------------------------------------------------------------------- 1. the estimate
# Other decodes the estimate can also price, for comparison (the engine decodes one image at a time,
# each decoder block checkpointed): result key → (column, memory.estimate options, what the line says)
DECODE_VARIANTS = {
    "batched_decode_bytes": ("batched", dict(decode_per_image=False),
                             "the batch decoded at once (decode_checkpointing off)"),
    "no_block_decode_bytes": ("no blocks", dict(decode_blocks=False),
                              "per image without the decoder's block checkpoints"),
}


def estimates(models, kinds, reduced: bool, precision: str, variants=()) -> dict:
    """Each (model, kind)'s estimate, and that of each of ``variants`` (keys of DECODE_VARIANTS)."""
    import torch
    from rewardtune.trainers import memory
    out = {}
    for model in models:
        mode = memory.new_fake_mode()
        t0 = time.perf_counter()
        base, vae, reward = build(model, reduced, "cpu", fake_mode=mode)
        params = {"unet": sum(p.numel() for p in base.diffusion_model.parameters()),
                  "vae": sum(p.numel() for p in getattr(vae, "first_stage_model", vae).parameters()),
                  "reward": sum(p.numel() for p in reward.parameters())}
        built = time.perf_counter() - t0
        for kind in kinds:
            t0 = time.perf_counter()
            cfg = config(kind, spec(model, reduced), reduced, precision)
            est = memory.estimate(base, vae, reward, cfg, kinds=[kind])
            out[(model, kind)] = dict(bytes=est.per_kind[kind], breakdown=est.breakdown[kind], params=params,
                                      seconds=time.perf_counter() - t0, build_seconds=built)
            print(f"estimate {model} {kind}: {est.per_kind[kind] / GiB:.2f} GiB "
                  f"({time.perf_counter() - t0:.0f} s on the CPU)", flush=True)
            for key in variants if kind != "sqdf_collect" else ():  # the collection decodes without gradients
                _, options, what = DECODE_VARIANTS[key]
                alt = memory.estimate(base, vae, reward, cfg, kinds=[kind], **options)
                out[(model, kind)][key] = alt.per_kind[kind]
                print(f"estimate {model} {kind}, {what}: {alt.per_kind[kind] / GiB:.2f} GiB", flush=True)
        del base, vae, reward
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


# ----------------------------------------------------------------------------- 2. a worker process
T0 = time.perf_counter()


def worker(a):
    """One side (engine or composite) for one model, every objective; prints one JSON line."""
    import torch
    import comfy.model_management as mm
    from rewardtune.testing import tiny_models as tm
    from rewardtune.trainers import memory
    from rewardtune.trainers.data import examples_from_graph
    from rewardtune.trainers.engine import train
    torch.set_num_threads(a.threads) if a.threads else None
    cuda = a.device == "cuda"
    dev = mm.get_torch_device()
    s = spec(a.model, a.reduced)
    patcher, vae, reward = build(a.model, a.reduced, str(dev))
    r = reward_fn(reward)
    precision = "fp32" if a.reduced else "bf16"
    kinds = a.kinds.split(",")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def encode(text):
        return tm.tiny_conditioning(sum(map(ord, text)) % 997, tokens=77, dim=s["ctx"], pooled=s["pooled"])

    images = examples_from_graph(torch.rand(s["batch"], s["side"], s["side"], 3, generator=torch.Generator().manual_seed(4)),
                                 [f"caption {i}" for i in range(s["batch"])], s["side"], s["side"])
    prompts = ["a cat", "a dog", "a red house"]
    results = {}
    k = a.steps
    for kind in kinds:
        if a.worker == "engine" and kind == "sqdf_update" and "sqdf_collect" in results:
            continue  # one engine SQDF run gives both parts
        cfg = config(kind, s, a.reduced, precision, steps=k + 1)
        if a.worker == "engine":
            stamps, hist = [], []

            def on_step(m):
                sync()
                stamps.append(time.perf_counter())
                hist.append(m)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train(patcher, vae, r, cfg, encode=encode, prompts=prompts,
                  images=images if kind == "imagerefl" else None, on_step=on_step)
            peak = torch.cuda.max_memory_allocated() if cuda else None
            reserved = torch.cuda.max_memory_reserved() if cuda else None
            if not cuda:  # the tracker's peak of one step (its own run: the tracker slows every op)
                cfg1 = config(kind, s, a.reduced, precision, steps=1)
                peak, _ = memory.tracked_peak(
                    lambda: train(patcher, vae, r, cfg1, encode=encode, prompts=prompts,
                                  images=images if kind == "imagerefl" else None),
                    patcher.model.diffusion_model, vae.first_stage_model, reward if isinstance(reward, torch.nn.Module) else None)
            steps = [b - a_ for a_, b in zip(stamps, stamps[1:])]
            if kind.startswith("sqdf"):
                collect = [m["collect_seconds"] for m in hist[1:]]
                results["sqdf_collect"] = dict(step_s=statistics.median(collect), peak=peak, reserved=reserved,
                                               note="engine SQDF step (collection + update): one peak")
                results["sqdf_update"] = dict(step_s=statistics.median([t - c for t, c in zip(steps, collect)]),
                                              peak=peak, reserved=reserved, note=results["sqdf_collect"]["note"])
            else:
                results[kind] = dict(step_s=statistics.median(steps), peak=peak, reserved=reserved)
        else:
            modes = ["eager"] + (["compiled"] if a.compile else [])
            mm.load_models_gpu([vae.patcher])  # the VAE on the device, as the engine has it
            for mode in modes:
                work = memory.workload_from(patcher.model, vae, reward)
                work.diffusion_model.to(dev)
                nograd = None
                if mode == "compiled":
                    nograd = torch.compile(work.diffusion_model, mode="reduce-overhead" if cuda else "default",
                                           dynamic=False)
                step = memory.CompositeStep(work, cfg, dev, nograd_unet=nograd)
                step.warm_optimizer()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                stamps = []
                for i in range(k + 1 + (1 if mode == "compiled" else 0)):  # compiled: one more warm-up
                    step.step(kind)
                    sync()
                    stamps.append(time.perf_counter())
                steps = [b - a_ for a_, b in zip(stamps, stamps[1:])][-k:]
                peak = torch.cuda.max_memory_allocated() if cuda else step.tracked(kind)[0]
                reserved = torch.cuda.max_memory_reserved() if cuda else None
                results[kind if mode == "eager" else f"{kind}/compiled"] = dict(
                    step_s=statistics.median(steps), peak=peak, reserved=reserved)
                for m in work.diffusion_model.modules():  # take this composite's LoRA off again
                    m.__dict__.pop("weight_function", None)
                del step
                if cuda:
                    torch.cuda.empty_cache()
        print(f"[{a.worker} {a.model}] {kind}: done after {time.perf_counter() - T0:.0f} s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(results), flush=True)


def run_side(side: str, model: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model", model, "--device", a.device,
           "--steps", str(a.steps), "--kinds", ",".join(a.kinds), "--threads", str(a.threads)]
    cmd += ["--reduced"] if a.reduced else []
    cmd += ["--compile"] if a.compile else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"the {side} worker for {model} failed (exit {proc.returncode})")
    print(f"{side} {model}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(line[0][len("RESULT "):])


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reduced", action="store_true", help="small models (CPU): shows the benchmark works")
    ap.add_argument("--estimate-only", action="store_true", help="only the CPU estimate (real size unless --reduced)")
    ap.add_argument("--no-estimate", action="store_true")
    ap.add_argument("--batched-decode", action="store_true",
                    help="also estimate the step with the batch decoded at once (decode_checkpointing off; the "
                         "engine decodes one image at a time with checkpointing by default): what that saves")
    ap.add_argument("--no-block-decode", action="store_true",
                    help="also estimate the step with each image decoded under one checkpoint, without the "
                         "block-wise checkpoints inside the decoder (the decode before them): what they save")
    ap.add_argument("--models", default=None, help="sd15,sdxl (default; --reduced: sd15 only, the reduced SDXL "
                                                    "UNet is 10× larger and slow on a CPU)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="objectives: " + ", ".join(KINDS))
    ap.add_argument("--compile", action="store_true", help="also the composite with a compiled no-grad denoiser")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 on the CPU — on a shared machine 2+ threads stall in OpenMP "
                         "barriers —, torch's default on CUDA)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["engine", "composite"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    bootstrap(cpu=a.device == "cpu")
    if a.threads is None:
        a.threads = 1 if a.device == "cpu" else 0
    if a.worker:
        return worker(a)
    a.kinds = a.kinds.split(",")
    models = (a.models or ("sd15" if a.reduced else "sd15,sdxl")).split(",")
    if a.device == "cpu" and not a.reduced and not a.estimate_only:
        a.estimate_only = True
        print("no real-size run on the CPU: estimates only (add --reduced for a small CPU run)")
    t_all = time.perf_counter()
    result = {"device": a.device, "reduced": a.reduced, "models": models, "kinds": a.kinds}
    variants = [key for key, on in (("batched_decode_bytes", a.batched_decode),
                                    ("no_block_decode_bytes", a.no_block_decode)) if on]
    est = {} if a.no_estimate else estimates(models, a.kinds, a.reduced, "fp32" if a.reduced else "bf16", variants)
    runs = {}
    if not a.estimate_only:
        for model in models:
            runs[model] = {side: run_side(side, model, a) for side in ("engine", "composite")}

    # ------------------------------------------------------------------ report
    size = "reduced" if a.reduced else "real size"
    print(f"\n{size}, device {a.device}, LoRA rank 8, {'fp32' if a.reduced else 'bf16'}, gradient checkpointing; "
          f"GiB = 2^30 bytes")
    shown = [key for key in DECODE_VARIANTS if any(key in v for v in est.values())]
    head = f"{'model':6s} {'objective':13s} {'estimate':>9s}" + "".join(f" {DECODE_VARIANTS[k][0]:>9s}" for k in shown)
    if runs:
        head += f" {'engine s':>9s} {'bare s':>8s} {'e/b':>5s} {'engine GiB':>10s} {'bare GiB':>9s} {'est/engine':>10s}"
        if a.compile:
            head += f" {'compiled s':>10s} {'speed-up':>8s}"
    if a.device == "cuda" and not a.reduced:
        head += "  target (s, GiB)"
    print(head)
    rows = []
    for model in models:
        for kind in a.kinds:
            e = est.get((model, kind), {}).get("bytes")
            row = dict(model=model, kind=kind, estimate_bytes=e)
            line = f"{model:6s} {kind:13s} {(e / GiB if e else float('nan')):9.2f}"
            for key in shown:
                b = row[key] = est.get((model, kind), {}).get(key)
                line += f" {(b / GiB if b else float('nan')):9.2f}"
            if runs:
                eng, bare = runs[model]["engine"].get(kind, {}), runs[model]["composite"].get(kind, {})
                row.update(engine=eng, composite=bare)
                ep, bp = eng.get("peak") or float("nan"), bare.get("peak") or float("nan")
                line += (f" {eng.get('step_s', float('nan')):9.3f} {bare.get('step_s', float('nan')):8.3f} "
                         f"{eng.get('step_s', float('nan')) / bare.get('step_s', float('nan')):5.2f} "
                         f"{ep / GiB:10.2f} {bp / GiB:9.2f} {(e or float('nan')) / ep:10.3f}")
                if a.compile:
                    c = runs[model]["composite"].get(f"{kind}/compiled", {})
                    row["compiled"] = c
                    line += f" {c.get('step_s', float('nan')):10.3f} {bare.get('step_s', float('nan')) / c.get('step_s', float('nan')):8.2f}"
            t = TARGETS.get((model, kind))
            if a.device == "cuda" and not a.reduced and t:
                line += f"  ≤ {t[0]} s, ≤ {t[1]} GiB"
            rows.append(row)
            print(line)
    if any("note" in (r.get("engine") or {}) for r in rows):
        print("engine SQDF: one step = collection + update; its peak is that of the whole step (shown on both rows)")
    if est:
        first = next(iter(est.values()))
        print("estimate: FakeTensorMode + MemTracker on the CPU, models built fake ("
              + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in first["params"].items()) + " for the first model)")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    result["rows"] = rows
    result["estimates"] = {f"{m}/{k}": v for (m, k), v in est.items()}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
