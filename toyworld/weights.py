"""The world's trained weights as a small committed file (``toyworld/weights/world-<hash>.safetensors.xz``).

Matrices and convolution kernels are stored as int8 with one float16 scale per output row
(absmax / 127), the rest (biases, norms, the VAE's latent scale) as float32; the file is xz-compressed, so the
zero weights (the VAE's identity blocks, the padded context columns, the reward's unused
vocabulary) cost almost nothing. The world *is* these weights: ``build.build_world`` quantises
what it trained and every figure is measured on the dequantised networks, so nothing is lost
between a build and the committed file. The CLIP-L text encoder is not stored: it is regenerated
from its seed (``models.clip_l_state_dict``) and checked against the fingerprint kept here.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct

import torch

QUANTISED_MIN = 256          # tensors with fewer values stay float32


def quantise(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        t = t.detach().float().cpu()
        if t.ndim >= 2 and t.numel() >= QUANTISED_MIN:
            rows = t.reshape(t.shape[0], -1)
            scale = rows.abs().amax(1).clamp_min(1e-12) / 127.0
            scale = scale.half().float()                   # the stored scale is what dequantises
            out[key + ".q8"] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(t.shape)
            out[key + ".scale"] = scale.half()
        else:
            out[key] = t
    return out


def dequantise(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in packed.items():
        if key.endswith(".scale"):
            continue
        if key.endswith(".q8"):
            name = key[:-len(".q8")]
            scale = packed[name + ".scale"].float()
            out[name] = (t.float().reshape(t.shape[0], -1) * scale[:, None]).reshape(t.shape)
        else:
            out[key] = t.float() if t.is_floating_point() else t
    return out


def round_trip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the committed file gives back for ``sd``."""
    return dequantise(quantise(sd))


def save_packed(packed: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save
    data = lzma.compress(save({k: v.contiguous() for k, v in packed.items()}, metadata=metadata), preset=9)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_packed(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed tensors and the file's metadata."""
    from safetensors.torch import load
    with open(path, "rb") as f:
        raw = lzma.decompress(f.read())
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: u64 length, JSON
    return load(raw), header.get("__metadata__", {})


def fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """A hash of tensors' names, shapes and values (float32 bytes), for checking a regenerated
    network is the one the world was trained with."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().float().cpu().contiguous()
        h.update(key.encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]

