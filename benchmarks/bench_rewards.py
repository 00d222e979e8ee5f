"""ImageReward throughput: RewardTune vs the reference `image-reward` package, side by side.

Both score the same 8 random 512×512 images with the same random weights (written by the
reference package in the official ImageReward.pt layout). Each side runs in its own process (the
reference needs its own venv, scripts/oracles.sh), rounds are interleaved, the median is
reported. The reference goes through its public path, ``score(prompt, [PIL images])``
(``inference_rank``: PIL preprocessing, one image per forward); RewardTune through
``score(images, prompt)`` on a ComfyUI IMAGE batch. Peak memory is the process's peak RSS on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

    .venv/bin/python benchmarks/bench_rewards.py [--rounds 3] [--iters 3] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_PY = os.path.join(ROOT, ".rt", "oracle-imagereward", "bin", "python")
ORACLE = os.path.join(ROOT, "testing", "oracles", "imagereward_ref.py")
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def ours(weights: str, batch: int, iters: int, threads: int, device: str, dtype: str) -> dict:
    """Worker: RewardTune's ImageReward on the same kind of input, one JSON line."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    from _pack import import_pack
    import_pack()
    from rewardtune.rewards import load_reward_model
    model = load_reward_model(weights, device=device, dtype=getattr(torch, dtype))
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0, 1, (batch, 512, 512, 3)).astype(np.float32)).to(device)
    seconds = []
    with torch.no_grad():
        for i in range(iters + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.score(images, PROMPT)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call is a warm-up
                seconds.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": batch / statistics.median(seconds), "peak_mb": peak, "seconds": seconds}


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # weights path: run as the RewardTune worker
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(ours(args.worker, args.batch, args.iters, args.threads, args.device, args.dtype)))
        return
    if not os.path.exists(ORACLE_PY):
        sys.exit("the reference venv is missing: run `bash scripts/oracles.sh` first")
    work = tempfile.mkdtemp(prefix="rt-bench-ir-")
    subprocess.run([ORACLE_PY, ORACLE, "dump", "--out", work, "--seed", "0"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    weights = os.path.join(work, "ImageReward.pt")
    ref_cmd = [ORACLE_PY, ORACLE, "bench", "--weights", weights, "--med-config",
               os.path.join(work, "med_config.json"), "--batch", str(args.batch), "--iters", str(args.iters),
               "--threads", str(args.threads), "--device", args.device]
    our_cmd = [sys.executable, os.path.abspath(__file__), "--worker", weights, "--batch", str(args.batch),
               "--iters", str(args.iters), "--threads", str(args.threads), "--device", args.device,
               "--dtype", args.dtype]
    results = {"reference": [], "rewardtune": []}
    for r in range(args.rounds):
        for name, cmd in (("reference", ref_cmd), ("rewardtune", our_cmd)):
            res = run_json(cmd)
            results[name].append(res)
            print(f"round {r}: {name:10s} {res['images_per_s']:.2f} images/s, "
                  f"peak {res.get('peak_mb', res.get('peak_rss_mb')):.0f} MB", flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in results.items()}
    peak = {k: max(x.get("peak_mb", x.get("peak_rss_mb", 0)) for x in v) for k, v in results.items()}
    summary = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
               "images_per_s": med, "speedup": med["rewardtune"] / med["reference"], "peak_mb": peak,
               "rounds": results}
    print(f"ImageReward, batch {args.batch} at 512²: RewardTune {med['rewardtune']:.2f} images/s, reference "
          f"{med['reference']:.2f} images/s → {summary['speedup']:.2f}×; peak memory {peak['rewardtune']:.0f} MB "
          f"vs {peak['reference']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
