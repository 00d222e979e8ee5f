"""Train a reward LoRA from the command line, with the same config the trainer node uses.

    python scripts/train.py --checkpoint sd15.safetensors --reward HPS_v2.1_compressed.pt \\
        --prompts prompts.txt --objective refl --steps 200 --out runs/hps

Every ``TrainConfig`` field is an option (``--lr``, ``--rank``, ``--grad-checkpointing`` …);
``--preset NAME`` then ``--config run.json`` set the base and the options override them. Ctrl-C stops after
the current step and saves a checkpoint; ``--resume`` continues it. Nothing in ``--out`` is
overwritten unless you resume it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading

from .config import ConfigError, TrainConfig, resume_differences
from .presets import PRESETS


def _config_options(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("training settings (TrainConfig; defaults follow the papers)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            group.add_argument(flag, nargs="+", default=None, metavar="NAME")
        else:
            kind = float if default is None else type(default)
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a ComfyUI checkpoint (UNet + CLIP + VAE) .safetensors")
    ap.add_argument("--vae", help="a VAE file to use instead of the checkpoint's")
    ap.add_argument("--reward", required=True, help="a reward model file (ImageReward, HPSv2, PickScore, aesthetic)")
    ap.add_argument("--reward-type", default="auto", help="auto (read from the file) or the reward's type")
    ap.add_argument("--aesthetic-clip", help="the CLIP ViT-L/14 file the aesthetic predictor runs on")
    ap.add_argument("--prompts", help="prompts for ReFL: a .txt file or the prompts themselves, one per line")
    ap.add_argument("--data", help="ImageReFL: a folder of images with same-named .txt captions")
    ap.add_argument("--no-bucketing", action="store_true", help="resize every image to width × height")
    ap.add_argument("--out", required=True, help="the run folder: checkpoint.pt, lora.safetensors, metrics.jsonl")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    ap.add_argument("--preset", help="a paper preset (see trainers/presets.py): " + "; ".join(PRESETS))
    ap.add_argument("--config", help="a JSON config (e.g. a run's config.json); options override it")
    ap.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_DIR, or the one this pack is in)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU")
    _config_options(ap)
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
        base.update(PRESETS[args.preset])
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            base = json.load(f)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            base[f.name] = value
    return TrainConfig.from_json(json.dumps(base))


def find_comfyui(explicit: str | None) -> str:
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for c in (explicit, os.environ.get("COMFYUI_DIR"), os.path.dirname(os.path.dirname(pack))):
        if c and os.path.exists(os.path.join(c, "main.py")) and os.path.isdir(os.path.join(c, "comfy")):
            return os.path.abspath(c)
    raise ConfigError("ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_DIR")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DatasetError
    try:
        return _run(args)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the library's own errors (imported only once ComfyUI is set up): a message
        if type(e).__name__ in ("TrainingError", "RewardModelError", "RewardInputError"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    comfy_dir = find_comfyui(args.comfyui)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = args.cpu

    from .data import load_examples, parse_prompts
    from .engine import load_checkpoint, reward_from_model, train
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt) and not args.resume:
        raise ConfigError(f"{args.out} already holds a run (checkpoint at step {load_checkpoint(ckpt, mmap=True)['step']}): "
                          "pass --resume to continue it, or choose another --out")
    if args.resume:
        if not os.path.exists(ckpt):
            raise ConfigError(f"--resume: there is no checkpoint in {args.out}")
        diff = resume_differences(TrainConfig.from_json(load_checkpoint(ckpt, mmap=True)["config"]), config)
        if diff:
            raise ConfigError("the checkpoint was trained with other settings (" + "; ".join(diff) +
                              "): pass --config " + os.path.join(args.out, "config.json") + " to resume it as it was")
    prompts = parse_prompts(args.prompts) if args.prompts else None
    images = load_examples(args.data, config.width, config.height, not args.no_bucketing) if args.data else None

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from ..rewards import load_reward_model
    for path in (args.checkpoint, args.reward):
        if not os.path.exists(path):
            raise ConfigError(f"{path} does not exist")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
    if model is None or clip is None:
        raise ConfigError(f"{args.checkpoint} is not a full checkpoint with a UNet and a text encoder")
    if args.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae, safe_load=True))
    if vae is None:
        raise ConfigError(f"{args.checkpoint} has no VAE: pass --vae")
    reward_model = load_reward_model(args.reward, args.reward_type, clip_vision_path=args.aesthetic_clip,
                                     device=mm.get_torch_device())
    reward = reward_from_model(reward_model, config.reward_scale, config.reward_offset)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json())
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: (print("\nstopping after this step …", flush=True), stop.set()))
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a", encoding="utf-8")

    def on_step(m: dict) -> None:
        metrics_file.write(json.dumps(m) + "\n")
        metrics_file.flush()
        print(f"step {m['step']}/{config.steps}  reward {m['reward']:+.4f}  grad {m['grad_norm']:.3g}  "
              f"{m['seconds']:.2f}s", flush=True)

    with metrics_file:
        result = train(model, vae, reward, config, encode=lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t)),
                       prompts=prompts, images=images, out_dir=args.out, resume=ckpt if args.resume else None,
                       should_stop=stop.is_set, on_step=on_step)
    state = "stopped at" if result.stopped else "finished"
    print(f"{state} step {result.step}: LoRA {result.lora_path}, checkpoint {ckpt}")
    return 0
