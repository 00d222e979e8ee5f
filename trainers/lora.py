"""Trainable LoRA adapters on a ComfyUI MODEL, saved in the layout the core LoraLoader reads."""
from __future__ import annotations

import contextlib

import torch
from comfy.weight_adapter.lora import LoraDiff

from .atomic import atomic_write
from .config import ConfigError


# the UNet's attention projections: the papers' LoRA targets (SD1.5, SDXL), TrainConfig's default
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
AUTO = "auto"


def _linear(module) -> bool:
    """A layer ComfyUI can patch (its ops have ``weight_function``) with a 2-D weight."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "weight_function") and weight is not None and weight.ndim == 2


def target_modules(diffusion_model: torch.nn.Module, targets) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs that get a LoRA, sorted by name.

    ``targets`` are endings of module names (``to_q``, ``img_attn.qkv``…); the value ``auto``
    stands for: the attention projections ``UNET_ATTENTION`` where the model has them (every
    ComfyUI UNet: SD1.5, SDXL — the papers' choice), otherwise every linear layer inside the
    model's transformer blocks, i.e. the modules of its top-level block lists (Flux
    ``double_blocks`` / ``single_blocks``, MMDiT ``joint_blocks``, NextDiT ``layers`` and refiners:
    attention q/k/v/out, MLPs and modulation). The papers' default list (``UNET_ATTENTION``)
    on a model without such layers (a flow transformer) is read as ``auto``, so TrainConfig's
    default works for every family. No family names: only module names and types."""
    named = sorted(((n, m) for n, m in diffusion_model.named_modules() if n and _linear(m)), key=lambda kv: kv[0])
    targets = tuple(targets)
    attention = [(n, m) for n, m in named if n.endswith(UNET_ATTENTION)]
    if AUTO in targets or (set(targets) == set(UNET_ATTENTION) and not attention):
        if attention:
            picked = attention
        else:
            lists = [name for name, child in diffusion_model.named_children() if isinstance(child, torch.nn.ModuleList)]
            picked = [(n, m) for n, m in named if n.split(".", 1)[0] in lists]
        rest = tuple(t for t in targets if t != AUTO and t not in UNET_ATTENTION)
        extra = [(n, m) for n, m in named if rest and n.endswith(rest) and (n, m) not in picked]
        return sorted(picked + extra, key=lambda kv: kv[0])
    return [(n, m) for n, m in named if n.endswith(targets)]


def _dims(module) -> tuple[int, int]:
    return module.weight.shape[0], module.weight.shape[1:].numel()


def check_rank(diffusion_model: torch.nn.Module, rank: int, targets) -> list[tuple[str, torch.nn.Module]]:
    """The layers ``targets`` pick (``target_modules``), after checking that ``rank`` fits them: a
    LoRA update of an out × in weight has rank at most min(out, in), so a larger rank trains nothing
    more and only costs memory (rank 100,000,000 on SD1.5 asked for 1.28 TB). Refused against the
    smallest picked layer, naming it and the bound, before any adapter exists: the trainer node and
    the CLI call it before a run starts, the LoRA set when it is built."""
    picked = target_modules(diffusion_model, targets)
    if not picked:
        raise ConfigError(f"no linear layer of this model matches the LoRA targets {list(targets)}; "
                          'use ["auto"] for every linear layer of its transformer blocks')
    name, module = min(picked, key=lambda nm: min(_dims(nm[1])))
    out_dim, in_dim = _dims(module)
    bound = min(out_dim, in_dim)
    if rank > bound:
        raise ConfigError(f"LoRA rank {rank} is more than the layers it adapts can use: the smallest, {name} "
                          f"({out_dim} × {in_dim}), takes a rank of at most {bound} (an update of an out × in "
                          f"weight has rank at most min(out, in); more only costs memory). Set rank to {bound} or "
                          "less (the papers use 4 to 64)")
    return picked


class LoraSet:
    """LoRA adapters (ComfyUI's own ``LoraDiff``) wrapped around the matching weights of a patcher.

    The adapters are float32 — float64 where the adapted weight is float64 (the CLI's ``--float64``
    check) — never a half type: the optimizer steps them in their own dtype, which fp16/bf16
    weights would make too coarse for training.

    ``lora_down`` starts at zero, so the tuned model starts equal to the base; ``lora_up`` starts
    as ComfyUI's ``create_train`` makes it (Kaiming-uniform, a = √5), drawn from ``generator`` —
    never from the process-wide generator, which a sampler on another thread seeds and draws from
    (see ``new_adapter``). ``alpha`` is kept fixed (ComfyUI's trainer leaves it trainable; classic
    LoRA does not train it)."""

    def __init__(self, patcher, rank: int, alpha: float, targets: list[str], generator: torch.Generator | None = None):
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.adapters: dict[str, torch.nn.Module] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        for name, module in check_rank(patcher.model.diffusion_model, rank, targets):
            adapter = new_adapter(module.weight, rank, alpha, generator)
            adapter.lora_up.weight.requires_grad_(True)
            adapter.lora_down.weight.requires_grad_(True)
            adapter.alpha.requires_grad_(False)
            adapter.to(module.weight.device)
            patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", adapter)
            self.adapters[name] = adapter
            self.modules[name] = module

    @contextlib.contextmanager
    def merged(self):
        """For no-grad calls: each adapted weight merged once (W + (α/r)·up·down, by the module's
        own weight functions) and the wrappers off, instead of ComfyUI re-merging on every call
        (a copy of W and a matmul per layer per call, ~65% of the engine's overhead over bare
        torch in benchmarks/bench_train.py). Use only while the patcher is loaded and no other
        thread runs the same modules; everything is restored on exit."""
        saved = []
        try:
            with torch.no_grad():
                for module in self.modules.values():
                    functions = list(getattr(module, "weight_function", []))
                    if not functions:
                        continue
                    original = module.weight.data
                    merged = original
                    for f in functions:
                        merged = f(merged)
                    saved.append((module, original, functions))
                    module.weight.data = merged.to(original.dtype)
                    module.weight_function = []
            yield
        finally:
            for module, original, functions in saved:
                module.weight.data = original
                module.weight_function = functions

    @contextlib.contextmanager
    def disabled(self):
        """The reference model: this LoRA's wrappers taken off the adapted modules (other weight
        functions, e.g. ComfyUI's low-VRAM patches, stay), restored on exit. Same UNet, no copy."""
        saved = []
        try:
            mine = set(map(id, self.adapters.values()))
            for module in self.modules.values():
                functions = list(getattr(module, "weight_function", []))
                saved.append((module, functions))
                module.weight_function = [f for f in functions if id(f) not in mine]
            yield
        finally:
            for module, functions in saved:
                module.weight_function = functions

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """ComfyUI's LoRA layout: diffusion_model.<module>.lora_up/.lora_down/.alpha, in the
        adapters' dtype (float32; float64 under ``--float64``, which ComfyUI loads as well), so a
        checkpoint resumes bit for bit."""
        sd = {}
        for name, a in self.adapters.items():
            key = f"diffusion_model.{name}"
            sd[f"{key}.lora_up.weight"] = a.lora_up.weight.detach().cpu().contiguous()
            sd[f"{key}.lora_down.weight"] = a.lora_down.weight.detach().cpu().contiguous()
            sd[f"{key}.alpha"] = a.alpha.detach().to(a.lora_up.weight.dtype).cpu().reshape(())
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name, a in self.adapters.items():
            key = f"diffusion_model.{name}"
            try:
                a.lora_up.weight.copy_(sd[f"{key}.lora_up.weight"])
                a.lora_down.weight.copy_(sd[f"{key}.lora_down.weight"])
            except KeyError as e:
                raise ConfigError(f"the checkpoint's LoRA lacks {e.args[0]} (other rank or targets?)") from e


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 for a float64 weight, float32 for every other (fp32, fp16, bf16, fp8 weights)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def new_adapter(weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> torch.nn.Module:
    """What ``LoRAAdapter.create_train`` returns (a ``LoraDiff``: up (out, r) Kaiming-uniform with
    a = √5, down (r, in) zero, fixed α), with every random number from ``generator`` (on the CPU,
    so a seed gives the same LoRA on any device). ``create_train`` draws from the process-wide
    generator, and so does ``LoraDiff``'s own ``nn.Linear`` initialisation (overwritten at once):
    the adapter is therefore built on the meta device, where initialisers draw nothing, and then
    given real storage, in ``adapter_dtype(weight)``."""
    out_dim, in_dim = weight.shape[0], weight.shape[1:].numel()
    up = torch.empty(out_dim, rank, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(up, a=5 ** 0.5, generator=generator)  # drawn in float32 whatever the dtype:
    dtype = adapter_dtype(weight)                                        # the same seed, the same start
    up = up.to(dtype)
    down = torch.zeros(rank, in_dim, dtype=dtype)
    with torch.device("meta"):
        adapter = LoraDiff((up.to("meta"), down.to("meta"), alpha, None, None, None))
    adapter = adapter.to_empty(device=weight.device).to(dtype)
    with torch.no_grad():
        adapter.lora_up.weight.copy_(up)
        adapter.lora_down.weight.copy_(down)
        adapter.alpha.fill_(alpha)
    return adapter


def save_lora(path: str, lora: LoraSet, metadata: dict[str, str] | None = None) -> None:
    import safetensors.torch
    sd = lora.state_dict()
    atomic_write(path, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata=metadata or {}))
