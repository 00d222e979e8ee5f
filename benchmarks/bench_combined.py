"""Combined KSampler overhead, measured side by side in one run (CPU or GPU).

Compares, on the same model, seed and 40-step schedule (same CFG on both stages so the work is equal):
  * one Combined KSampler pass (base steps [0, k), tuned [k, N)),
  * the two-node chain KSamplerAdvanced(base, 0→k) → KSamplerAdvanced(tuned, k→N),
  * one KSampler (tuned model only).
for a tuned model that is the base + LoRA (weights swapped through hooks) and a separately loaded one.
Rounds are interleaved and the median is reported; ratios < 1.0 mean the combined pass is faster.

    .venv/bin/python benchmarks/bench_combined.py [--rounds 5] [--model sd15|tiny] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bootstrap(cpu: bool):
    from _pack import import_pack
    import_pack(comfy_cpu=cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--switch", type=int, default=30)
    ap.add_argument("--model", choices=["sd15", "tiny"], default="sd15",
                    help="sd15: the smallest detectable SD1.5 UNet (25.8M); tiny: the 0.5M test UNet")
    ap.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    ap.add_argument("--gpu", action="store_true", help="use ComfyUI's GPU device instead of --cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bootstrap(cpu=not a.gpu)

    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import nodes
    from rewardtune.sampling.combined import combined_sample
    from rewardtune.testing import tiny_models as tm

    if a.model == "sd15":
        def make(seed):
            model = tm.build_unet_model(comfy.supported_models.SD15, tm.SD15_UNET, seed)
            return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
        ctx, tokens = 768, 77
    else:
        make = lambda seed: tm.tiny_model_patcher(seed)  # noqa: E731
        ctx, tokens = tm.TINY_CONTEXT_DIM, 8
    base = make(0)
    lora_model, _ = comfy.sd.load_lora_for_models(base, None, tm.lora_state_dict(base.model, seed=1), 1.0, 0)
    separate = make(1)
    pos = tm.tiny_conditioning(1, tokens=tokens, dim=ctx)
    neg = tm.tiny_conditioning(2, tokens=tokens, dim=ctx)
    latent = {"samples": torch.zeros(1, 4, a.latent, a.latent)}
    N, k, cfg, sampler, sched = a.steps, a.switch, 7.5, "euler", "normal"
    adv = nodes.KSamplerAdvanced()
    ks = nodes.KSampler()

    def run_combined(tuned):
        return combined_sample(base, tuned, pos, neg, latent, seed=1, steps=N, sampler_name=sampler, scheduler=sched,
                               cfg_base=cfg, cfg_tuned=cfg, switch_step=k)["samples"]

    def run_chain(tuned):
        first = adv.sample(base, "enable", 1, N, cfg, sampler, sched, pos, neg, latent, 0, k, "enable")[0]
        return adv.sample(tuned, "disable", 1, N, cfg, sampler, sched, pos, neg, first, k, 10000, "disable")[0]["samples"]

    def run_one(tuned):
        return ks.sample(tuned, 1, N, cfg, sampler, sched, pos, neg, latent)[0]["samples"]

    cases = {}
    for tname, tuned in (("lora", lora_model), ("separate", separate)):
        for fname, fn in (("combined", run_combined), ("chain", run_chain), ("ksampler", run_one)):
            cases[f"{tname}/{fname}"] = (fn, tuned)
    times = {name: [] for name in cases}
    for name, (fn, tuned) in cases.items():  # warm-up (loads, caches)
        fn(tuned)
    for _ in range(a.rounds):
        for name, (fn, tuned) in cases.items():
            if torch.cuda.is_available() and a.gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(tuned)
            if torch.cuda.is_available() and a.gpu:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            assert torch.isfinite(out).all()
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"device": str(mm.get_torch_device()), "model": a.model, "steps": N, "switch": k, "latent": a.latent,
              "rounds": a.rounds, "median_s": med, "ratios": {}}
    print(f"device {result['device']}, model {a.model}, {N} steps, k={k}, latent {a.latent}x{a.latent}, "
          f"median of {a.rounds} interleaved rounds")
    for tname in ("lora", "separate"):
        c, ch, one = med[f"{tname}/combined"], med[f"{tname}/chain"], med[f"{tname}/ksampler"]
        result["ratios"][tname] = {"combined/chain": c / ch, "combined/ksampler": c / one}
        print(f"  tuned={tname:8s} combined {c:.3f}s  chain {ch:.3f}s  one KSampler {one:.3f}s  "
              f"combined/chain {c / ch:.3f}  combined/KSampler {c / one:.3f}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
