"""The toy world from the command line.

    python scripts/toyworld.py path            # where this recipe's world is (built or not)
    python scripts/toyworld.py ensure          # build it if this machine has none (~15 min, 2 cores)
    python scripts/toyworld.py build --out D   # build a fresh copy into D (e.g. to check the recipe)
    python scripts/toyworld.py info            # its manifest: recipe, stage times, measured figures

Run through the pack's venv (scripts/setup.sh); ComfyUI is imported on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("path", "ensure", "build", "info"))
    ap.add_argument("--out", help="build: the folder to write (must not exist)")
    args = ap.parse_args(argv)
    runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"](comfy_cpu=True)
    from rewardtune.toyworld import world as W
    folder = W.world_dir()
    if args.command == "path":
        print(folder)
        return 0
    if args.command == "info":
        if not W.is_built(folder):
            print(f"not built: {folder} (run `python scripts/toyworld.py ensure`)", file=sys.stderr)
            return 1
        print(json.dumps(W.manifest(folder), indent=1, sort_keys=True))
        return 0
    if args.command == "ensure":
        print(W.ensure_world(log=lambda m: print(m, flush=True)))
        return 0
    if not args.out:
        ap.error("build needs --out")
    if os.path.exists(args.out):
        ap.error(f"{args.out} exists: give a new folder")
    from rewardtune.toyworld.build import build_world
    os.makedirs(args.out)
    manifest = build_world(args.out, log=lambda m: print(f"[toyworld] {m}", flush=True))
    print(json.dumps(manifest["seconds"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
