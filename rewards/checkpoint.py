"""Reading reward-model weight files and telling which reward a file holds.

Weights are read only through safetensors or ``torch.load(weights_only=True)``: a pickle that
needs code to unpickle is refused, never executed.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")

# What the official files are called, for error messages that tell the user what to put where.
OFFICIAL_FILES = {
    "imagereward": "ImageReward.pt (THUDM/ImageReward)",
    "hpsv2": "HPS_v2_compressed.pt (xswu/HPSv2)",
    "hpsv2.1": "HPS_v2.1_compressed.pt (xswu/HPSv2)",
    "pickscore": "a PickScore_v1 folder with config.json + model.safetensors (yuvalkirstain/PickScore_v1)",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor), "
                 "plus CLIP ViT-L/14 (e.g. clip_vision/clip-vit-large-patch14.safetensors)",
}


class RewardModelError(ValueError):
    """A reward-model file that cannot be used, with what to do about it."""


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    # Training checkpoints wrap the weights: {"state_dict": {...}} (HPSv2), {"model": {...}}.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise RewardModelError(f"{path} does not hold a dictionary of weights")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise RewardModelError(f"{path} holds no weight tensors")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def resolve_weights_file(path: str) -> str:
    """A file, or an HF-style folder holding model.safetensors / pytorch_model.bin."""
    if os.path.isdir(path):
        for name in HF_WEIGHT_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise RewardModelError(
            f"the folder {path} holds none of {', '.join(HF_WEIGHT_NAMES)}; "
            "point at the weights file itself, or download the model folder completely")
    if not os.path.isfile(path):
        raise RewardModelError(f"no such file: {path}")
    return path


def _why(e: Exception) -> str:
    """An exception as words: some (EOFError, KeyError) have an empty or bare message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text and not isinstance(e, KeyError) else type(e).__name__


def check_weights_file(path: str) -> None:
    """Say what a file is when it cannot be weights, before a loader fails on it with a bare
    message: empty, a Git LFS pointer, or (for the PyTorch formats) not a zip or pickle at all."""
    size = os.path.getsize(path)
    if size == 0:
        raise RewardModelError(f"{path} is empty (0 bytes): the download or copy was cut short. Download the "
                               "file again and replace it")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise RewardModelError(f"{path} is a Git LFS pointer ({size} bytes of text standing in for the weights), "
                               "not the weights: download the file itself (git lfs pull, or the model page's "
                               "download link)")
    # torch.save writes a zip archive (PK..); the legacy format starts with a pickle protocol mark
    if not path.endswith(".safetensors") and not head.startswith((b"PK", b"\x80")):
        looks = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "other data"
        raise RewardModelError(f"{path} is not a PyTorch weights file (it holds {looks}, e.g. an error page or "
                               "a note saved under the model's name): download the weights again")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read weights from .safetensors / .pt / .pth / .bin / .ckpt (or an HF folder)."""
    path = resolve_weights_file(path)
    check_weights_file(path)
    if path.endswith(".safetensors"):
        import safetensors.torch
        try:
            return _unwrap(safetensors.torch.load_file(path, device="cpu"), path)
        except RewardModelError:
            raise
        except Exception as e:  # truncated or not a safetensors file
            raise RewardModelError(f"cannot read {path} as safetensors ({_why(e)}): the file is damaged or not "
                                   "safetensors; download it again") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the zip format; the legacy format loads without it
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _unsafe(path, e) from e
        except Exception as e:
            raise _unreadable(path, e) from e
    except pickle.UnpicklingError as e:
        raise _unsafe(path, e) from e
    except Exception as e:
        raise _unreadable(path, e) from e
    return _unwrap(obj, path)


def _unreadable(path: str, e: Exception) -> RewardModelError:
    return RewardModelError(f"cannot read {path} as a PyTorch weights file ({_why(e)}): it is truncated or "
                            "damaged; download it again")


# what torch's weights-only unpickler itself builds tensors and containers with
_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset")


def pickled_callables(path: str) -> list[str]:
    """The Python callables a pickle names (module.name), read from its opcodes without running any
    (``pickletools``): a legacy pickle file, or the ``data.pkl`` of torch's zip format. Best effort:
    [] when the file cannot be parsed."""
    import pickletools
    import zipfile
    found, strings = [], []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(64 * 2 ** 20)
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a damaged or truncated pickle: what was read so far
        pass
    return found


def code_in_pickle(path: str, e: Exception) -> str:
    """Why a file that ``torch.load(weights_only=True)`` refused is refused: loading it would run
    code, the callables its pickle names (e.g. ``posix.system``; from torch's message or the
    pickle's opcodes). torch's own message advises loading it with ``weights_only=False``, which for
    such a file runs that code: not passed on."""
    named = re.findall(r"GLOBAL ([\w.]+)", str(e)) or pickled_callables(path)
    unsafe = list(dict.fromkeys(n for n in named if not n.startswith(_SAFE_GLOBALS)))
    what = f" (it calls {', '.join(unsafe[:3])})" if unsafe else ""
    return (f"{path} is refused: loading it would run code stored in the file{what}. A weights file needs no "
            "code, so RewardTune reads only plain tensors and never runs it. Use the official weights file; if this "
            "one is your own, save its state dict (or a .safetensors file) from the program that made it")


def _unsafe(path: str, e: Exception) -> RewardModelError:
    return RewardModelError(code_in_pickle(path, e))


def read_folder_config(path: str) -> dict | None:
    """config.json next to the weights (HF-style folder), if there is one."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            return json.load(f)
    return None


def count_indices(sd, pattern: str) -> int:
    """How many distinct values the regex group takes over the keys (e.g. the number of layers)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _has(keys, *prefixes) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def describe_other_file(keys) -> str | None:
    """What a non-reward file looks like, so the error can say where it belongs."""
    if _has(keys, "model.diffusion_model."):
        return "a Stable Diffusion checkpoint (put it in models/checkpoints)"
    if _has(keys, "lora_unet_", "lora_te_") or any(".lora_up." in k or ".lora_A." in k for k in keys):
        return "a LoRA (put it in models/loras)"
    if _has(keys, "input_blocks.", "double_blocks.", "joint_blocks."):
        return "a diffusion model (put it in models/diffusion_models)"
    if _has(keys, "encoder.down.", "decoder.up.", "first_stage_model.", "decoder.conv_in"):
        return "a VAE (put it in models/vae)"
    if _has(keys, "cond_stage_model.", "conditioner.", "text_model.") and not _has(keys, "vision_model."):
        return "a text encoder (put it in models/text_encoders)"
    return None


def detect_reward_type(sd: dict[str, torch.Tensor]) -> str:
    """Reward type from the key layout: imagereward, hpsv2, pickscore, aesthetic or clip_vision."""
    keys = list(sd)
    if _has(keys, "blip.visual_encoder.") and "mlp.layers.0.weight" in sd:
        return "imagereward"
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "hpsv2"
    if "vision_model.embeddings.patch_embedding.weight" in sd and _has(keys, "text_model."):
        return "pickscore"
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return "clip_vision"
    if keys and all(k.startswith("layers.") for k in keys) and "layers.0.weight" in sd:
        return "aesthetic"
    other = describe_other_file(keys)
    if other:
        raise RewardModelError(f"this file looks like {other}, not a reward model")
    raise RewardModelError(
        "cannot tell which reward model this file holds (first keys: "
        f"{', '.join(keys[:4])}). Expected one of: "
        + "; ".join(f"{k}: {v}" for k, v in OFFICIAL_FILES.items()))
