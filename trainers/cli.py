"""Train a reward LoRA from the command line, with the same config the trainer node uses.

    python scripts/train.py --checkpoint sd15.safetensors --reward HPS_v2.1_compressed.pt \\
        --prompts prompts.txt --objective refl --steps 200 --out runs/hps

Every ``TrainConfig`` field is an option (``--lr``, ``--rank``, ``--grad-checkpointing`` …; ``--help``
lists them with what they do). Precedence, lowest first: TrainConfig's defaults < ``--preset NAME``
< ``--config run.json`` < the options, field by field (the same rule as the node: a preset is the
starting point, explicit settings win, the most specific one last). A --config file that changes
fields the preset sets is said on one "note:" line. Ctrl-C stops after
the current step and saves a checkpoint, then exits with status 130 (as a shell reports Ctrl-C; a
finished run exits 0); ``--resume`` continues it. Nothing in ``--out`` is
overwritten unless you resume it.

``--resume`` continues only the same run: the same settings (other than --steps and --save-every)
and the same models, reward model, prompts and images, checked by the run's fingerprint (stored in
fingerprint.json; trainers/fingerprint.py, the one background jobs use). A run started before
fingerprints were stored resumes with a warning. metrics.jsonl holds each step once, whatever
kills and resumes came before: a resume rewrites it from the checkpoint, a fresh run starts it anew.
Bad input is one "error: ..." line on stderr and exit status 2; Ctrl-C before training starts
exits with 130.

Several GPUs (or CPU processes): the same command under PyTorch's launcher trains data-parallel,
``--batch-size`` per process (the global batch is processes × it), rank 0 writing the files::

    torchrun --standalone --nproc_per_node 4 scripts/train.py --checkpoint … --out runs/hps --auto-resume
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 scripts/train.py …

(trainers/distributed.py: how the batch and the random draws are split, why N processes with batch b
train what one process with batch N·b trains.) ``--auto-resume`` continues the checkpoint in --out
when there is one and starts the run when there is none, so torchrun's ``--max-restarts`` restarts a
run whose process died from its last checkpoint. A checkpoint resumes only on as many processes as
wrote it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time

from .config import ConfigError, TrainConfig, resume_differences, settings_from_json
from .presets import PRESETS

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)
FINGERPRINT = "fingerprint.json"  # the run's fingerprint (trainers/fingerprint.py), next to its checkpoint


def _config_options(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("training settings (TrainConfig; they override --config and --preset; defaults "
                                  "follow the papers)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        shown = {None: "unset", "": '""', True: "on", False: "off"}.get(default, default) \
            if not isinstance(default, list) else " ".join(default)
        help = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif isinstance(default, list):
            group.add_argument(flag, nargs="+", default=None, metavar="NAME", help=help)
        else:
            kind = float if default is None else type(default)
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help)


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
    ap.add_argument("--auto-resume", action="store_true",
                    help="continue the checkpoint in --out if there is one, else start the run there (for torchrun "
                         "--max-restarts: a restarted run continues from its last checkpoint)")
    ap.add_argument("--preset", help="a paper preset, the starting point (trainers/presets.py): " + "; ".join(PRESETS))
    ap.add_argument("--config", help="a JSON object of settings (e.g. a run's config.json): overrides the preset; "
                                     "the options below override it")
    ap.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_DIR, or the one this pack is in)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU")
    ap.add_argument("--skip-memory-check", action="store_true",
                    help="start without estimating the step's memory peak against the GPU (or --memory-budget-gb); "
                         "the estimate runs on the CPU before the first step, seconds for SD1.5, minutes for SDXL")
    ap.add_argument("--float64", action="store_true",
                    help="a checking mode, not for training: the UNet, text encoder, VAE, reward model and LoRA in "
                         "float64 (with --precision fp32), so that runs which differ only in float32 rounding (e.g. "
                         "N torchrun processes against one process with N times the batch) agree to ~1e-12. "
                         "Slow; memory doubles")
    _config_options(ap)
    return ap


def read_config_file(path: str) -> dict:
    """A --config file as a dict of settings, or a ConfigError that says what to fix."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist: give the path of a JSON file of settings "
                          "(e.g. a run's config.json)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text: give a JSON file of settings") from None
    except OSError as e:
        raise ConfigError(f"cannot read --config {path} ({e.strerror}): give a JSON file of settings") from None
    return settings_from_json(text, f"--config {path}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: defaults < --preset < --config < options (``TrainConfig.resolve``)."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name) is not None}
    sources = []
    if args.config:
        settings = read_config_file(args.config)
        sources.append((f"--config {args.config}", settings))
        preset = PRESETS.get(args.preset or "", {})
        changed = sorted(k for k in settings if k in preset and k not in options and settings[k] != preset[k])
        if changed:  # say it: a run's config.json holds every field, so it replaces the whole preset
            print(f"note: --config {args.config} sets {', '.join(changed)} differently from the preset "
                  f"{args.preset!r}: the file's values are used (options override both)", file=sys.stderr, flush=True)
    sources.append(("the command line", options))
    return TrainConfig.resolve(args.preset, *sources)


def find_comfyui(explicit: str | None) -> str:
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for c in (explicit, os.environ.get("COMFYUI_DIR"), os.path.dirname(os.path.dirname(pack))):
        if c and os.path.exists(os.path.join(c, "main.py")) and os.path.isdir(os.path.join(c, "comfy")):
            return os.path.abspath(c)
    raise ConfigError("ComfyUI not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_DIR")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_interrupted = threading.Event()
_training = threading.Event()  # set once training starts: errors after that may differ between processes


def _refuse(e: Exception) -> int:
    """Bad input: one "error:" line on stderr, status 2. Under torchrun every process meets the same
    input before training and refuses it alike, so only rank 0 prints it (not once per process); each
    also hands it to torchrun's error file, so its failure summary shows the message instead of a
    link. An error during training is printed by the process that met it."""
    text = f"error: {_one_line(e)}"
    if os.environ.get("RANK", "0") == "0" or _training.is_set():
        print(text, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each process
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": text, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    return 2


def _interrupt_start_up(signum, frame):
    """SIGINT before training starts: stop start-up. The KeyboardInterrupt may land inside a
    library's bare ``except:`` (ComfyUI's imports have some) and be swallowed, so the flag is also
    checked between the start-up stages (``_check_interrupt``)."""
    _interrupted.set()
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    _interrupted.clear()
    _training.clear()
    own = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if own else None
    try:
        if own and previous is not signal.SIG_IGN:  # nohup/&: left ignored
            signal.signal(signal.SIGINT, _interrupt_start_up)
        args = build_parser().parse_args(argv)
        from .data import DatasetError
        try:
            return _run(args)
        except (ConfigError, DatasetError) as e:
            return _refuse(e)
        except Exception as e:  # the library's own errors (imported only once ComfyUI is set up): a message
            if type(e).__name__ in ("TrainingError", "RewardModelError", "RewardInputError"):
                return _refuse(e)
            raise
    except KeyboardInterrupt:  # before training starts (then Ctrl-C stops after a step instead)
        print("\ninterrupted before training started: nothing was trained or changed", file=sys.stderr)
        return INTERRUPTED
    finally:
        if own and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _load_models(args: argparse.Namespace):
    import comfy.sd
    import comfy.utils
    for path in (args.checkpoint, args.reward):
        if not os.path.exists(path):
            raise ConfigError(f"{path} does not exist")
    hint = "pass a full Stable Diffusion checkpoint (a .safetensors with UNet, text encoder and VAE) as --checkpoint"
    dtype = _load_dtype(args)
    options = {"dtype": dtype} if dtype is not None else {}  # ComfyUI's own choice (from the file, the device) else
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True,
                                                                 model_options=options, te_model_options=options)[:3]
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{args.checkpoint} is not a checkpoint ComfyUI can load ({first}): {hint}") from e
    if model is None or clip is None:
        raise ConfigError(f"{args.checkpoint} is not a full checkpoint with a UNet and a text encoder: {hint}")
    if args.vae:
        try:
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae, safe_load=True), dtype=dtype)
        except Exception as e:
            raise ConfigError(f"cannot load the VAE {args.vae} ({type(e).__name__}: {e}): pass a VAE .safetensors "
                              "as --vae, or leave it out to use the checkpoint's") from e
    if vae is None:
        raise ConfigError(f"{args.checkpoint} has no VAE: pass --vae")
    if dtype is not None and vae.vae_dtype != dtype:  # the checkpoint's VAE is built in ComfyUI's VAE dtype
        vae.first_stage_model.to(dtype)
        vae.vae_dtype = dtype
    return model, clip, vae


def _load_dtype(args: argparse.Namespace):
    """The dtype every model is loaded in: float64 under --float64, else None (ComfyUI's choice)."""
    import torch
    return torch.float64 if args.float64 else None


def _write_text(path: str, text: str) -> None:
    """Atomically: a kill leaves the old file or the new one."""
    from .atomic import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def _checkpoint_step(path: str):
    try:
        import torch
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return "?"


def _check_fingerprint(out: str, identity: dict, resume: bool, write: bool = True) -> None:
    """--resume: the run's stored fingerprint must match these inputs (refused, naming what
    differs). A run of an earlier version has none: it resumes with a warning. Either way the
    fingerprint of these inputs is stored for the next resume (``write``: torchrun's rank 0 only;
    the others only check)."""
    from .fingerprint import differ, differences, record
    path = os.path.join(out, FINGERPRINT)
    if resume and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if not isinstance(stored, dict) or not isinstance(stored.get("parts"), dict):
                raise ValueError("no fingerprint parts in it")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path} ({e}): delete it to resume without checking the models, "
                              "prompts and images") from None
        diff = differences(stored, identity)
        if diff:
            raise ConfigError(f"--resume: {out} was trained with other inputs: {differ(diff)}. Give the ones it was "
                              "started with, or start a new run with another --out")
    elif resume and write:
        print(f"warning: {out} was started by an older version that stored no fingerprint, so its models, "
              "prompts and images cannot be checked: resuming with the ones given now (recorded from now on)",
              file=sys.stderr, flush=True)
    if write:
        _write_text(path, json.dumps(record(identity), indent=1))


def _import_comfy(comfy_dir: str, cpu: bool) -> None:
    """ComfyUI importable from ``comfy_dir``, its own argument parsing off (these are not its flags)."""
    print(f"loading ComfyUI from {comfy_dir} …", flush=True)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = cpu


def _saved_checkpoint(ckpt: str, config: TrainConfig, out: str, world) -> dict:
    """The checkpoint a --resume continues (tensors mapped, not read), refused when it was trained
    with other settings than ``config`` or by another number of processes."""
    from .engine import check_world_size, load_checkpoint
    saved = load_checkpoint(ckpt, mmap=True)
    check_world_size(saved, world, config.batch_size)
    diff = resume_differences(TrainConfig.from_json(saved["config"]), config)
    if diff:
        raise ConfigError("the checkpoint was trained with other settings (" + "; ".join(diff) +
                          "): pass --config " + os.path.join(out, "config.json") + " to resume it as it was")
    return saved


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.float64 and config.precision != "fp32":
        raise ConfigError(f"--float64 runs in float64 throughout: it cannot use precision {config.precision} "
                          "(autocast to a half type); pass --precision fp32 or leave out --float64")
    comfy_dir = find_comfyui(args.comfyui)
    from .data import load_examples, parse_prompts
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file: give the path of a folder for the run (created if it does "
                          "not exist), e.g. runs/hps")
    ckpt = os.path.join(args.out, "checkpoint.pt")
    resume = args.resume or (args.auto_resume and os.path.exists(ckpt))
    if os.path.exists(ckpt) and not resume:
        raise ConfigError(f"{args.out} already holds a run (checkpoint at step {_checkpoint_step(ckpt)}): "
                          "pass --resume to continue it, or choose another --out")
    if resume and not os.path.exists(ckpt):
        raise ConfigError(f"--resume: there is no checkpoint in {args.out}")
    prompts = parse_prompts(args.prompts) if args.prompts else None
    images = load_examples(args.data, config.width, config.height, not args.no_bucketing) if args.data else None
    config.check_inputs(has_prompts=bool(prompts), has_images=bool(images),
                        give_prompts="pass --prompts (a .txt file, or the prompts themselves, one per line)",
                        give_images="pass --data, a folder of images with same-named .txt captions")

    from . import distributed
    world = distributed.from_environment()
    if world.distributed:
        import torch
        backend = distributed.init_process_group(world, use_gpu=not args.cpu and torch.cuda.is_available())
        if world.is_main:
            print(f"torchrun: {world.size} processes ({backend}), global batch {world.size} × {config.batch_size}",
                  flush=True)
    try:
        return _train(args, config, comfy_dir, ckpt, resume, prompts, images, world)
    finally:
        distributed.destroy_process_group()


def _test_exit_step(world) -> int | None:
    """The step after which this rank exits hard, if the test hook (distributed.TEST_EXIT_ENV,
    "RANK:STEP") names it, on the first attempt only."""
    from .distributed import TEST_EXIT_ENV, restart_count
    spec = os.environ.get(TEST_EXIT_ENV, "")
    if not spec or restart_count() > 0:
        return None
    rank, step = (int(x) for x in spec.split(":"))
    return step if rank == world.rank else None


def _check_memory(config, model, vae, reward_model, world) -> str:
    """The trainer node's check before a run (``memory.check_budget``): refuses a step that will
    not fit the GPU, or --memory-budget-gb, saying what to lower. Under torchrun rank 0 estimates
    (on the CPU, once) and tells the others."""
    import torch.distributed
    from . import memory
    result = [None, None]  # (the line, the refusal)
    if world.is_main:
        try:
            result[0] = memory.check_budget(config, model, vae, reward_model,
                                            where="--memory-budget-gb, or --skip-memory-check",
                                            on_estimate=lambda text: print(f"memory: {text}", flush=True))[0]
        except ConfigError as e:
            result[1] = str(e)
    if world.distributed:
        torch.distributed.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise ConfigError(result[1])
    return result[0]


def _train(args, config, comfy_dir, ckpt, resume, prompts, images, world) -> int:
    import torch.distributed
    _import_comfy(comfy_dir, args.cpu)
    from .engine import reward_from_model, train
    from .fingerprint import run_identity
    from .history import checkpoint_history, rewrite_log
    _check_interrupt()
    saved = _saved_checkpoint(ckpt, config, args.out, world) if resume else None

    import comfy.model_management as mm
    from ..rewards import load_reward_model
    _check_interrupt()
    model, clip, vae = _load_models(args)
    from .lora import check_rank
    check_rank(model.model.diffusion_model, config.rank, config.targets)  # before a budget estimate builds the LoRA
    _check_interrupt()
    reward_model = load_reward_model(args.reward, args.reward_type, clip_vision_path=args.aesthetic_clip,
                                     device=mm.get_torch_device(), dtype=_load_dtype(args) or torch.float32)
    reward = reward_from_model(reward_model, config.reward_scale, config.reward_offset)
    identity = run_identity(config, model=model, vae=vae, clip=clip, reward_model=reward_model, prompts=prompts,
                            images=images)

    main = world.is_main  # torchrun: rank 0 writes the run's files, every rank checks the inputs
    if not args.skip_memory_check:
        line = _check_memory(config, model, vae, reward_model, world)
        if main:
            print(line, flush=True)

    # from here on Ctrl-C stops after the current step and saves: nothing below is left half-done
    _check_interrupt()
    _training.set()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: (print("\nstopping after this step …", flush=True), stop.set()))
    if main:
        os.makedirs(args.out, exist_ok=True)
    _check_fingerprint(args.out, identity, resume, write=main)
    if main:
        _write_text(os.path.join(args.out, "config.json"), config.to_json())
        # the checkpoint's history (a resume repeats the steps after it; a kill may have torn the last
        # line), or empty for a fresh run (a run killed before its first checkpoint leaves lines no
        # checkpoint holds): the jobs do the same
        rewrite_log(os.path.join(args.out, "metrics.jsonl"), checkpoint_history(saved))
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a", encoding="utf-8") if main \
        else contextlib.nullcontext()
    exit_at = _test_exit_step(world)

    def on_step(m: dict) -> None:
        if m["step"] == exit_at:  # the test hook: a crash of this rank right after the step
            from .distributed import TEST_EXIT_CODE, TEST_EXIT_ENV
            print(f"{TEST_EXIT_ENV}: rank {world.rank} exits after step {exit_at} (a test hook)", file=sys.stderr,
                  flush=True)
            os._exit(TEST_EXIT_CODE)
        if not main:
            return
        metrics_file.write(json.dumps(m) + "\n")
        metrics_file.flush()
        print(f"step {m['step']}/{config.steps}  reward {m['reward']:+.4f}  grad {m['grad_norm']:.3g}  "
              f"{m['seconds']:.2f}s", flush=True)

    try:
        with metrics_file:
            result = train(model, vae, reward, config,
                           encode=lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t)),
                           prompts=prompts, images=images, out_dir=args.out, resume=ckpt if resume else None,
                           should_stop=stop.is_set, on_step=on_step, world=world)
    except (torch.distributed.DistError, RuntimeError) as e:  # another process of the run died: say so
        # gloo reports a lost peer as a plain RuntimeError from its transport ("Connection reset by peer")
        lost = isinstance(e, torch.distributed.DistError) or any(
            s in str(e) for s in ("by peer", "gloo/transport", "NCCL", "Connection refused"))
        if not (world.distributed and lost):
            raise
        last = f"step {_checkpoint_step(ckpt)}" if os.path.exists(ckpt) else "none yet"
        print(f"error: rank {world.rank} lost the other processes of the run ({_one_line(e)[:200]}): one of them "
              f"stopped or was killed (its own error is above). The last checkpoint ({last}) in {args.out} is "
              "intact: run the same command with --auto-resume to continue it", file=sys.stderr, flush=True)
        return 1
    if main:
        state = "stopped at" if result.stopped else "finished"
        print(f"{state} step {result.step}: LoRA {result.lora_path}, checkpoint {ckpt}")
    # stopped by Ctrl-C: the shell's status for it, so a script can tell it from a finished run
    return INTERRUPTED if result.stopped else 0
