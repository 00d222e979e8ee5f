"""Off-policy replay buffer for SQDF: whole no-grad denoising trajectories in a FIFO, sampled as
(trajectory, step) pairs. Plain torch, no ComfyUI.

Memory: a trajectory holds N+1 latents. SD1.5 at 512² with N = 50 is 51·4·64·64 values, 3.3 MB in
float32, so the paper's window of 1024 trajectories is about 3.4 GB of host memory (SDXL at 1024²:
about 13.7 GB). ``dtype=torch.float16`` halves that. The cost: every stored value is rounded to 11
significant bits (relative error ≤ 2⁻¹¹ ≈ 5e-4; the range, ±65504, covers σ_max-scaled noise), so
a replayed x_t is slightly off the state the policy actually visited and replay is no longer
bit-exact with collection. Sampled latents come back in the storage dtype: cast before use.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_STATE_VERSION = 1


@dataclass
class Trajectory:
    """``latents[k]`` is x at schedule index k, shape (N+1, C, H, W): 0 is pure noise, N the final
    sample. ``reward`` is the scaled reward s·(R+o) of the decoded x_N."""
    latents: torch.Tensor
    prompt: str
    reward: float
    noise_seed: int | None = None


class ReplayBuffer:
    """FIFO of at most ``capacity`` trajectories (the oldest goes first); ``sample`` draws only from
    the ``window`` most recent (None: all). Latents are kept on the CPU in ``dtype`` (float32 or
    float16, see the module docstring for the trade). Stored and sampled trajectories are shared,
    not copied: treat them as read-only."""

    def __init__(self, capacity: int, window: int | None = None, dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be at least 1, got {capacity}")
        if window is not None and window < 1:
            raise ValueError(f"replay buffer window must be at least 1 (or None for all), got {window}")
        if dtype not in _DTYPES:
            raise ValueError(f"replay buffer dtype must be torch.float32 or torch.float16, got {dtype}")
        self.capacity, self.window, self.dtype = int(capacity), window, dtype
        self._items: list[Trajectory] = []
        self.last_sample_fell_back = False  # set by sample(): prioritised found no positive weight

    def __len__(self) -> int:
        return len(self._items)

    @property
    def trajectories(self) -> tuple[Trajectory, ...]:
        """The stored trajectories, oldest first."""
        return tuple(self._items)

    def _shape(self) -> torch.Size | None:
        return self._items[0].latents.shape if self._items else None

    def nbytes(self) -> int:
        return sum(t.latents.numel() * t.latents.element_size() for t in self._items)

    def _checked(self, trajs: list[Trajectory], shape: torch.Size | None, copy: bool) -> list[Trajectory]:
        """The records validated (same latent shape as ``shape``, or as the first) and normalised,
        or a ValueError before anything is stored."""
        out = []
        for i, t in enumerate(trajs):
            lat = t.latents
            if not (isinstance(lat, torch.Tensor) and lat.is_floating_point() and lat.dim() == 4 and lat.shape[0] >= 2):
                got = tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__
                raise ValueError(f"trajectory {i}: latents must be a float tensor of shape (N+1, C, H, W) "
                                 f"with N ≥ 1, got {got}")
            shape = lat.shape if shape is None else shape
            if lat.shape != shape:
                raise ValueError(f"trajectory {i}: latents shape {tuple(lat.shape)} does not match the "
                                 f"buffer's {tuple(shape)} (one model, resolution and step count per buffer)")
            reward = float(t.reward)
            if not math.isfinite(reward):
                raise ValueError(f"trajectory {i}: reward must be finite, got {reward}")
            # a copy on add: the buffer owns compact storage (not a view pinning the caller's batch);
            # plain str/int so state_dict stays loadable with weights_only=True
            out.append(Trajectory(lat.detach().to("cpu", self.dtype, copy=copy), str(t.prompt), reward,
                                  None if t.noise_seed is None else int(t.noise_seed)))
        return out

    def add(self, trajs: list[Trajectory]) -> None:
        """Append trajectories (oldest first); past capacity the oldest are dropped."""
        self._items = (self._items + self._checked(list(trajs), self._shape(), copy=True))[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator, *, num_steps: int, prioritised: bool = False,
               gamma: float = 1.0) -> list[tuple[Trajectory, int]]:
        """``n`` (trajectory, t) pairs drawn with replacement from the window. t ∈ [0, N−1] is the
        transition x_t → x_{t+1} in schedule order (t = 0 the noisiest); N = ``num_steps`` must be
        the stored trajectories' step count.

        * uniform: P(i, t) = 1 / (W·N) over the W trajectories of the window;
        * prioritised: P(i, t) ∝ max(r_i, 0) · γ^(N−1−t), N−1−t being the steps left after the
          transition (the last one weighs r_i). Trajectories with r_i ≤ 0 are never drawn; if no
          weight is positive it falls back to uniform, sets ``last_sample_fell_back`` and warns.

        Randomness comes only from ``generator`` (a CPU generator), so a saved generator state
        replays the same draws."""
        if n < 1:
            raise ValueError(f"the number of samples must be at least 1, got {n}")
        if not self._items:
            raise ValueError("the replay buffer is empty: collect trajectories first")
        stored = self._shape()[0] - 1
        if num_steps != stored:
            raise ValueError(f"num_steps={num_steps} does not match the stored trajectories' {stored} steps")
        if prioritised and not 0 < gamma <= 1:
            raise ValueError(f"gamma (discount) must be in (0, 1], got {gamma}")
        pool = self._items[-self.window:] if self.window else self._items
        self.last_sample_fell_back = False
        if prioritised:
            r = torch.tensor([max(t.reward, 0.0) for t in pool], dtype=torch.float64)
            if r.sum() > 0:
                # the weight factorises, r_i · γ^(N−1−t): trajectory and step are independent draws
                steps = torch.pow(torch.tensor(float(gamma), dtype=torch.float64),
                                  torch.arange(num_steps - 1, -1, -1, dtype=torch.float64))
                idx = torch.multinomial(r, n, replacement=True, generator=generator)
                ts = torch.multinomial(steps, n, replacement=True, generator=generator)
                return [(pool[i], t) for i, t in zip(idx.tolist(), ts.tolist())]
            self.last_sample_fell_back = True
            warnings.warn("prioritised replay: no trajectory in the window has a positive reward; "
                          "sampling uniformly", RuntimeWarning, stacklevel=2)
        idx = torch.randint(len(pool), (n,), generator=generator)
        ts = torch.randint(num_steps, (n,), generator=generator)
        return [(pool[i], t) for i, t in zip(idx.tolist(), ts.tolist())]

    def state_dict(self) -> dict:
        """Tensors, lists, str, int, float and None only: ``torch.load(weights_only=True)`` reads it."""
        return {"version": _STATE_VERSION, "capacity": self.capacity, "window": self.window,
                "dtype": _DTYPES[self.dtype],
                "latents": [t.latents for t in self._items], "prompts": [t.prompt for t in self._items],
                "rewards": [t.reward for t in self._items], "noise_seeds": [t.noise_seed for t in self._items]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved state. Capacity, window and dtype must equal this
        buffer's: a resumed run then samples exactly as the interrupted one would have."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported replay buffer state version {state.get('version')!r}")
        mine = {"capacity": self.capacity, "window": self.window, "dtype": _DTYPES[self.dtype]}
        diff = [f"{k} saved {state.get(k)!r}, configured {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError("the saved replay buffer does not match this one: " + "; ".join(diff))
        cols = [state[k] for k in ("latents", "prompts", "rewards", "noise_seeds")]
        if len({len(c) for c in cols}) != 1 or len(cols[0]) > self.capacity:
            raise ValueError("corrupt replay buffer state: column lengths differ or exceed the capacity")
        # no copy: the loaded tensors are already the buffer's dtype, and copying would double peak memory
        self._items = self._checked([Trajectory(*row) for row in zip(*cols)], None, copy=False)
