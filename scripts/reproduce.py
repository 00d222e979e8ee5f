"""Reproduce the papers' trade-offs in the toy world and write docs/reproduction.md.

    python scripts/reproduce.py                 # the full plan: 3 seeds, every run (~1 h on 2 cores)
    python scripts/reproduce.py --plan reduced  # what CI asserts, one seed (~minutes)

It builds (or reuses) the toy world, then trains and measures through the pack's own library
(toyworld/reproduce.py says how), and writes the report, a reward–diversity plot, sample grids
and the raw rows (JSON) into --out (default docs/).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=("full", "reduced"), default="full")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where reproduction.md and its pictures go")
    args = ap.parse_args(argv)
    runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"](comfy_cpu=True)
    import torch
    from rewardtune.toyworld import report, reproduce, world as W
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    folder = W.ensure_world(log=lambda m: print(m, flush=True))
    world = W.load(folder)
    plan = reproduce.FULL if args.plan == "full" else reproduce.REDUCED
    rep = reproduce.Reproduction(world, plan, log=lambda m: print(m, flush=True),
                                 lora_dir=os.path.join(args.out, "images", "reproduction", "loras"))
    results = rep.run()
    seconds = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    images_dir = os.path.join(args.out, "images", "reproduction")
    os.makedirs(images_dir, exist_ok=True)
    rows = [r.row() for r in results]
    name = "reproduction" if args.plan == "full" else "reproduction-reduced"
    with open(os.path.join(images_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"plan": args.plan, "seconds": seconds, "reward_scale": rep.reward_scale,
                   "reward_offset": rep.reward_offset, "rows": rows, "world": W.manifest(folder)}, f, indent=1)
    text = report.write(rep, results, seconds, images_dir, os.path.relpath(images_dir, args.out))
    with open(os.path.join(args.out, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(f"[reproduce] {args.plan} plan in {seconds / 60:.1f} min: {os.path.join(args.out, name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
