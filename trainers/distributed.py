"""Data-parallel training under ``torchrun``: the process-group plumbing the engine and the CLI use.

    torchrun --standalone --nproc_per_node 4 scripts/train.py --checkpoint … --out runs/x

The launcher is detected from the environment torchrun sets for each process (RANK, WORLD_SIZE,
LOCAL_RANK); without it a run is one process and nothing here is used (``World()``: rank 0 of 1).

The design, in one place (the engine follows it):

* **One random stream, sliced.** Every process seeds the run's generator with the same seed and
  draws exactly what one process with the global batch (world × batch_size) would draw: prompts,
  image picks, noise, stop indices, timesteps. Each keeps its rows of the per-sample draws (rank r:
  rows r·b … (r+1)·b − 1) and uses the once-per-batch draws (the ReFL stop index, ImageReFL's t_f
  and t, the image bucket) as they are. A rank's random stream is thus derived from the seed and
  its rank, the ranks' micro-batches never overlap (disjoint rows of one global draw), and N
  processes with batch b train, by construction, what one process with batch N·b trains.
  Per-sample Gaussian noise is drawn by the objectives themselves (steps.py, objectives.py,
  sqdf.py: ``torch.randn(shape, generator=ctx.generator)``); ``SlicedNoise`` turns each such draw
  into "draw the global batch's noise, keep my rows", so every objective, present or future, is
  sharded without having to know about ranks.
* **Gradients averaged, not DDP-wrapped.** The LoRA weights live in ComfyUI weight wrappers
  (``LoraDiff`` adapters called from ``weight_function`` inside the UNet's layers), not in a module
  whose ``forward`` is the training step: DistributedDataParallel would have to wrap a module it
  never sees called, and a step calls the adapted UNet several times with gradients (ImageReFL:
  the reward step and the MSE step; gradient checkpointing re-runs layers), which DDP's
  once-per-forward reducer rejects. So each process back-propagates its micro-batches locally
  (accumulation needs no communication, like DDP's ``no_sync``) and ``average_gradients`` all-reduces
  the LoRA gradients, one flat buffer, before the optimizer step. The losses are means over the
  micro-batch, so the average of the N ranks' gradients (equal slices) is the gradient of the mean
  over the global batch: exact, not an approximation. An fp16 overflow on any rank becomes inf in
  the sum on every rank, so all skip the step together.
* Rank 0 alone writes files (checkpoint, LoRA, metrics, config); a barrier after each save keeps
  the others from running ahead of it. Every rank reads the checkpoint to resume.

``nccl`` on CUDA GPUs (each process on the GPU of its LOCAL_RANK), ``gloo`` on the CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

# A test hook, read by the CLI: "RANK:STEP" makes that rank exit at once (os._exit, no cleanup,
# as a crash would) right after finishing step STEP — on the first attempt only, so torchrun's
# --max-restarts can show the restarted run finishing. Used by tests/test_distributed.py.
TEST_EXIT_ENV = "REWARDTUNE_TEST_EXIT_AT_STEP"
TEST_EXIT_CODE = 17
# How long a process waits for the others (joining the group, then each collective), in seconds;
# unset: PyTorch's default (10 minutes for nccl, 30 for gloo).
TIMEOUT_ENV = "REWARDTUNE_DIST_TIMEOUT"


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (1: no launcher, no process group)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global draw of ``n`` per rank (``size`` × n rows)."""
        return slice(self.rank * n, (self.rank + 1) * n)


def from_environment(environ=os.environ) -> World:
    """The World torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return World()
    try:
        size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise RuntimeError(f"RANK={environ.get('RANK')!r} / WORLD_SIZE={environ.get('WORLD_SIZE')!r} are not "
                           "integers: start the run with torchrun, or unset them for one process") from None
    if not (size >= 1 and 0 <= rank < size):
        raise RuntimeError(f"RANK={rank} is not below WORLD_SIZE={size}: start the run with torchrun")
    return World(rank, size, local)


def restart_count(environ=os.environ) -> int:
    """How often torchrun has restarted this run's processes (0 on the first attempt)."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_process_group(world: World, use_gpu: bool) -> str | None:
    """Join the run's process group (torchrun's rendezvous via its environment): nccl on CUDA, with
    this process on the GPU of its LOCAL_RANK, else gloo. Returns the backend (None for one process).
    Call before ComfyUI is imported: it picks ``torch.cuda.current_device()``."""
    if not world.distributed:
        return None
    backend = "nccl" if use_gpu else "gloo"
    if use_gpu:
        torch.cuda.set_device(world.local_rank)
    if dist.is_initialized():
        return backend
    seconds = os.environ.get(TIMEOUT_ENV)
    timeout = datetime.timedelta(seconds=float(seconds)) if seconds else None
    device = torch.device("cuda", world.local_rank) if use_gpu else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store for all attempts of a run. Its keys from an attempt whose
        # processes died (the ranks' gloo addresses) are read again by the restarted processes, which
        # then connect to dead ports and hang in connectFullMesh (seen with torch 2.14 + gloo, about one
        # restart in three). A prefix per attempt gives each attempt keys of its own.
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timeout or datetime.timedelta(minutes=5))
        store = dist.PrefixStore(f"rewardtune/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{restart_count()}",
                                 base)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout,
                                device_id=device)
    else:  # launched another way: MASTER_ADDR/MASTER_PORT (env://)
        dist.init_process_group(backend, device_id=device, timeout=timeout)
    return backend


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collectives' tensors must be: the GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def average_gradients(params, world: World) -> None:
    """Each parameter's gradient replaced by its mean over the ranks (one all-reduce of a flat buffer).
    A parameter without a gradient counts as zeros, so every rank sends the same layout."""
    if not world.distributed:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # at least float32 (a float64 LoRA, the CLI's --float64 check, is averaged in float64)
    flat = torch.cat([p.grad.reshape(-1).to(torch.promote_types(p.grad.dtype, torch.float32))
                      for p in params]).to(_device())
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def average_metrics(metrics: dict, world: World) -> dict:
    """Numeric metrics averaged over the ranks (every rank gets the same numbers: the global batch's
    means, as one process with the global batch would log them)."""
    if not world.distributed:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(values)
    out = dict(metrics)
    for k, v in zip(keys, values.cpu().tolist()):
        mean = v / world.size
        out[k] = int(mean) if isinstance(metrics[k], int) and mean.is_integer() else mean  # e.g. the stop index
    return out


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if it is true on any (a Ctrl-C seen by one rank stops all at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """The ranks' equal-shaped tensors concatenated along dim 0 in rank order, on every rank
    (returned on ``t``'s device)."""
    if not world.distributed:
        return t
    local = t.contiguous().to(_device())
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


class SlicedNoise(TorchFunctionMode):
    """While active, every ``torch.randn(shape, generator=g)`` on the run's generator ``g`` draws the
    global batch's noise, shape (world × shape[0], *shape[1:]), and returns this rank's rows. Every
    per-sample draw of the objectives is batch-first, so rank r gets exactly rows r·b … of what one
    process with the global batch draws, and the generator advances alike on every rank. Other
    calls pass through untouched (a Python hop per torch call: about 2 µs, only in multi-process runs)."""

    def __init__(self, generator: torch.Generator, world: World):
        super().__init__()
        self.generator, self.world = generator, world

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is self.generator:
            shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
            full = func((self.world.size * shape[0], *shape[1:]), **kwargs)
            return full[self.world.rows(shape[0])].clone()
        return func(*args, **kwargs)
