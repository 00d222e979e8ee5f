"""SQDF cost: one iteration (optimizer step) split into trajectory collection and the update, and
how the replay buffer's memory grows with its capacity.

Iteration: ``trainers.engine.train`` with objective sqdf on a UNet of the SD1.5 architecture (the
1M-parameter test UNet by default, ``--model sd15`` for the smallest detectable SD1.5 UNet), a small
frozen conv net as reward; the engine records ``collect_seconds`` per step, the rest of the step is
the update (replay sampling, policy + reference calls, x̂0, decode, reward, backward, AdamW). The
first step (model load) is dropped; median over the rest.

Buffer: ``ReplayBuffer.nbytes`` (the latents it holds; the rest is a few Python objects per
trajectory) after filling buffers of increasing capacity past their capacity with trajectories of
the given latent size and step count (SD1.5 at 512²: 4×64×64, 50 DDIM steps → 51 latents per
trajectory), float32 and float16 storage.

    .venv/bin/python benchmarks/bench_sqdf.py [--steps 4] [--model tiny|sd15] [--latent 16] [--collect 8]
        [--batch 4] [--num-steps 10] [--buffer-latent 64] [--buffer-steps 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is dropped)")
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--collect", type=int, default=8, help="fresh trajectories per step")
    ap.add_argument("--batch", type=int, default=4, help="update batch (pairs) and collection batch")
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buffer-latent", type=int, default=64)
    ap.add_argument("--buffer-steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from _pack import import_pack
    import_pack(comfy_cpu=True)
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    from rewardtune.testing import tiny_models as tm
    from rewardtune.trainers.config import TrainConfig
    from rewardtune.trainers.engine import train
    from rewardtune.trainers.replay import ReplayBuffer, Trajectory
    torch.set_num_threads(a.threads)

    # ---- one SQDF iteration, split
    unet_cfg, ctx_dim = (tm.SD15_UNET, 768) if a.model == "sd15" else (tm.TINY_UNET, tm.TINY_CONTEXT_DIM)
    base = tm.build_unet_model(tm.TinySD, unet_cfg, 0)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in tm._taesd_state_dict(2).items()})
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1)).requires_grad_(False)
    cfg = TrainConfig(objective="sqdf", steps=a.steps, batch_size=a.batch, grad_accum=1, lr=1e-4, rank=4, alpha=4.0,
                      num_steps=a.num_steps, cfg=5.0, sqdf_collect=a.collect, sqdf_buffer=max(64, a.collect),
                      sqdf_window=max(64, a.collect), width=8 * a.latent, height=8 * a.latent, save_every=10 ** 9)
    res = train(patcher, vae, lambda images, prompts: net(images).squeeze(1), cfg,
                encode=lambda t: tm.tiny_conditioning(sum(map(ord, t)) % 997, tokens=77, dim=ctx_dim),
                prompts=["a cat", "a dog", "a red house"])
    rows = res.history[1:]
    total = statistics.median(h["seconds"] for h in rows)
    collect = statistics.median(h["collect_seconds"] for h in rows)
    update = statistics.median(h["seconds"] - h["collect_seconds"] for h in rows)
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    print(f"SQDF iteration, CPU ({a.threads} thread), UNet {a.model} ({params / 1e6:.2f}M), latent {a.latent}², "
          f"{a.num_steps}-step schedule, CFG 5, {a.collect} trajectories collected, update batch {a.batch}, "
          f"median of {len(rows)} steps:")
    print(f"  collect {collect:.3f} s ({collect / a.collect * 1000:.0f} ms per trajectory), update {update:.3f} s, "
          f"total {total:.3f} s")

    # ---- buffer memory against capacity
    shape = (a.buffer_steps + 1, 4, a.buffer_latent, a.buffer_latent)
    memory = []
    for dtype in (torch.float32, torch.float16):
        for capacity in (16, 64, 256):
            buf = ReplayBuffer(capacity, dtype=dtype)
            for i in range(capacity + 8):  # past capacity: the oldest go, memory stays
                buf.add([Trajectory(torch.randn(shape), f"p{i}", 1.0)])
            memory.append({"dtype": str(dtype).replace("torch.", ""), "capacity": capacity, "held": len(buf),
                           "nbytes_mb": buf.nbytes() / 2 ** 20})
            del buf
    print(f"replay buffer, trajectories of {shape[0]} latents {tuple(shape[1:])}:")
    print("  dtype     capacity   held   nbytes MB")
    for m in memory:
        print(f"  {m['dtype']:<9} {m['capacity']:>8} {m['held']:>6} {m['nbytes_mb']:>11.1f}")
    print(f"  per trajectory: {memory[0]['nbytes_mb'] / 16:.2f} MB (float32)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"iteration": {"collect_s": collect, "update_s": update, "total_s": total, "model": a.model,
                                     "params": params, "latent": a.latent, "collect": a.collect, "batch": a.batch,
                                     "num_steps": a.num_steps}, "buffer": memory,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f, indent=1)


if __name__ == "__main__":
    main()
