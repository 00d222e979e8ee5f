"""Diversity metrics: time against the number of embeddings (CPU), and how it grows.

For N random D=384 embeddings (DINO ViT-S/16's width): cosine diversity and Vendi, once with
ImageReFL's grouping (5 images per prompt, N/5 prompts) and once as a single group of N.
Median of --repeats runs. The cosine diversity never forms the N × N matrix (O(N·D)); Vendi uses
the D × D Gram when N > D.

    .venv/bin/python benchmarks/bench_diversity.py [--sizes 100 1000 10000 100000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from _pack import import_pack
    import_pack()
    import torch
    from rewardtune.metrics import cosine_diversity, vendi_score
    torch.manual_seed(0)
    rows = []
    for n in args.sizes:
        emb = torch.randn(n, args.dim)
        row = {"n": n}
        for name, fn, kw in (("cosine_per5", cosine_diversity, {"per_group": 5}), ("cosine_one", cosine_diversity, {}),
                             ("vendi_per5", vendi_score, {"per_group": 5}), ("vendi_one", vendi_score, {})):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn(emb, **kw)
                times.append(time.perf_counter() - t)
            row[name] = statistics.median(times)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    for a, b in zip(rows, rows[1:]):
        growth = {k: b[k] / a[k] for k in a if k != "n"}
        print(f"N {a['n']} → {b['n']}: " + ", ".join(f"{k} ×{v:.1f}" for k, v in growth.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dim": args.dim, "rows": rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
