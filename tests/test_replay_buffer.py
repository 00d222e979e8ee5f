"""SQDF replay buffer (no ComfyUI): FIFO and window, uniform and prioritised sampling statistics,
reproducibility, the weights_only checkpoint round trip, memory accounting and input errors."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardtune.trainers.replay import ReplayBuffer, Trajectory

N = 4                      # denoising steps: latents hold N+1 states
SHAPE = (N + 1, 2, 3, 3)   # (N+1, C, H, W), tiny


def traj(k: int, reward: float = 1.0, shape=SHAPE, seed: int | None = None) -> Trajectory:
    """Trajectory ``k``: prompt "p{k}", random latents (seeded by k)."""
    g = torch.Generator().manual_seed(k)
    return Trajectory(torch.randn(shape, generator=g), f"p{k}", reward, seed)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompts(buf: ReplayBuffer) -> list[str]:
    return [t.prompt for t in buf.trajectories]


# ----------------------------------------------------------------------------- FIFO and window
@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 6), max_size=8))
def test_fifo_keeps_the_last_capacity_trajectories_in_order(capacity, batch_sizes):
    buf, k = ReplayBuffer(capacity), 0
    for size in batch_sizes:
        buf.add([traj(k + j) for j in range(size)])
        k += size
    expected = [f"p{j}" for j in range(k)][-capacity:] if k else []
    assert prompts(buf) == expected and len(buf) == min(capacity, k)


@pytest.mark.filterwarnings("ignore:prioritised replay")  # a window of zero rewards: uniform fallback
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 10), st.integers(1, 20), st.integers(0, 2 ** 31 - 1))
def test_only_the_window_is_sampled(capacity, window, total, seed):
    buf = ReplayBuffer(capacity, window)
    buf.add([traj(k, reward=float(k % 3)) for k in range(total)])
    recent = set(prompts(buf)[-window:])
    for prioritised in (False, True):
        pairs = buf.sample(64, gen(seed), num_steps=N, prioritised=prioritised, gamma=0.8)
        assert {t.prompt for t, _ in pairs} <= recent
        assert all(0 <= i < N for _, i in pairs)


def test_uniform_sampling_statistics():
    """6 stored, window 4, N = 4: 16 equally likely cells. Pearson's χ² with 15 degrees of freedom
    exceeds 56.5 with probability 1e-6 (scipy.stats.chi2.isf(1e-6, 15)); the seed is fixed anyway."""
    buf = ReplayBuffer(8, window=4)
    buf.add([traj(k) for k in range(6)])
    n = 32_000
    counts = Counter((t.prompt, i) for t, i in buf.sample(n, gen(1), num_steps=N))
    cells = [(f"p{k}", i) for k in range(2, 6) for i in range(N)]
    assert set(counts) == set(cells)
    expected = n / len(cells)
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in cells)
    assert chi2 < 56.5, chi2


# ----------------------------------------------------------------------------- prioritised
@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_prioritised_frequencies_match_the_weights(gamma):
    """P(i, t) = max(r_i, 0)·γ^(N−1−t) / Z. Each cell's count is Binomial(n, p): it must lie within
    4 standard errors √(n·p(1−p)) of n·p (two-sided 6e-5 per cell, < 2e-3 over all 20 cells for any
    seed). Cells of non-positive reward must be exactly empty."""
    rewards = [2.0, 0.5, 0.0, -1.0, 1.25]
    buf = ReplayBuffer(8)
    buf.add([traj(k, r) for k, r in enumerate(rewards)])
    n = 100_000
    counts = Counter((t.prompt, i) for t, i in buf.sample(n, gen(7), num_steps=N, prioritised=True, gamma=gamma))
    weights = {(f"p{k}", i): max(r, 0.0) * gamma ** (N - 1 - i) for k, r in enumerate(rewards) for i in range(N)}
    z = sum(weights.values())
    for cell, w in weights.items():
        p = w / z
        if p == 0:
            assert counts[cell] == 0, cell
        else:
            assert abs(counts[cell] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (cell, counts[cell], n * p)
    assert not buf.last_sample_fell_back


def test_prioritised_with_no_positive_reward_falls_back_to_uniform():
    buf = ReplayBuffer(4)
    buf.add([traj(0, 0.0), traj(1, -2.0), traj(2, 0.0)])
    with pytest.warns(RuntimeWarning, match="no trajectory in the window has a positive reward"):
        pairs = buf.sample(3000, gen(3), num_steps=N, prioritised=True, gamma=0.5)
    assert buf.last_sample_fell_back
    counts = Counter(t.prompt for t, _ in pairs)
    steps = Counter(i for _, i in pairs)
    # uniform over 3 trajectories and 4 steps: ±4 standard errors
    assert all(abs(counts[f"p{k}"] - 1000) <= 4 * math.sqrt(3000 * (1 / 3) * (2 / 3)) for k in range(3))
    assert all(abs(steps[i] - 750) <= 4 * math.sqrt(3000 * 0.25 * 0.75) for i in range(N))
    # the same draws as an explicit uniform sample; the flag clears on the next normal sample
    assert [(t.prompt, i) for t, i in pairs] == [(t.prompt, i) for t, i in buf.sample(3000, gen(3), num_steps=N)]
    assert not buf.last_sample_fell_back


def test_prioritised_only_draws_positive_rewards_even_in_a_window():
    buf = ReplayBuffer(6, window=2)
    buf.add([traj(0, 5.0), traj(1, 5.0), traj(2, -1.0), traj(3, 0.5)])  # window: p2 (r<0), p3
    assert {t.prompt for t, _ in buf.sample(500, gen(), num_steps=N, prioritised=True)} == {"p3"}


# ----------------------------------------------------------------------------- reproducibility
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.booleans())
def test_same_generator_state_gives_same_samples(seed, prioritised):
    buf = ReplayBuffer(10, window=6)
    buf.add([traj(k, reward=k - 2.5) for k in range(9)])
    g = gen(seed)
    buf.sample(5, g, num_steps=N, prioritised=prioritised, gamma=0.9)  # advance, then snapshot
    snapshot = g.get_state()
    first = buf.sample(40, g, num_steps=N, prioritised=prioritised, gamma=0.9)
    g.set_state(snapshot)
    second = buf.sample(40, g, num_steps=N, prioritised=prioritised, gamma=0.9)
    assert [(t.prompt, i) for t, i in first] == [(t.prompt, i) for t, i in second]


def _plain(obj) -> bool:
    """Only what torch.load(weights_only=True) accepts without allow-listing: no custom classes."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, str, int, float))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_round_trip_is_exact(tmp_path, dtype):
    buf = ReplayBuffer(4, window=3, dtype=dtype)
    buf.add([traj(k, reward=k * 0.7 - 1.0, seed=None if k % 2 else 1000 + k) for k in range(6)])
    state = buf.state_dict()
    assert _plain(state)
    torch.save(state, tmp_path / "replay.pt")
    loaded = ReplayBuffer(4, window=3, dtype=dtype)
    loaded.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))

    assert len(loaded) == len(buf) == 4 and loaded.nbytes() == buf.nbytes()
    for a, b in zip(buf.trajectories, loaded.trajectories):
        assert a.latents.dtype == b.latents.dtype == dtype and torch.equal(a.latents, b.latents)
        assert (a.prompt, a.reward, a.noise_seed) == (b.prompt, b.reward, b.noise_seed)
    for prioritised in (False, True):
        g1, g2 = gen(11), gen(11)
        assert ([(t.prompt, i) for t, i in buf.sample(50, g1, num_steps=N, prioritised=prioritised, gamma=0.7)]
                == [(t.prompt, i) for t, i in loaded.sample(50, g2, num_steps=N, prioritised=prioritised, gamma=0.7)])
    # and FIFO continues identically after the resume
    for b in (buf, loaded):
        b.add([traj(6), traj(7)])
    assert prompts(buf) == prompts(loaded) == ["p4", "p5", "p6", "p7"]


def test_load_state_dict_rejects_a_different_configuration():
    buf = ReplayBuffer(4, window=3)
    buf.add([traj(0)])
    state = buf.state_dict()
    for other, word in ((ReplayBuffer(5, 3), "capacity"), (ReplayBuffer(4, None), "window"),
                        (ReplayBuffer(4, 3, torch.float16), "dtype")):
        with pytest.raises(ValueError, match=f"does not match this one: {word} saved"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        buf.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="column lengths differ"):
        buf.load_state_dict({**state, "prompts": []})
    assert prompts(buf) == ["p0"]  # a rejected state leaves the buffer as it was


# ----------------------------------------------------------------------------- memory
def test_nbytes_linear_until_capacity_and_halved_by_float16():
    per = math.prod(SHAPE) * 4
    b32, b16 = ReplayBuffer(3), ReplayBuffer(3, dtype=torch.float16)
    assert b32.nbytes() == b16.nbytes() == 0
    for k in range(5):
        for b in (b32, b16):
            b.add([traj(k)])
        assert b32.nbytes() == min(k + 1, 3) * per
        assert b16.nbytes() * 2 == b32.nbytes()
    assert all(t.latents.dtype == torch.float16 and t.latents.device.type == "cpu" for t in b16.trajectories)


def test_add_copies_the_latents():
    src = traj(0)
    buf = ReplayBuffer(2)
    buf.add([src])
    src.latents.zero_()  # a caller reusing its tensor must not change what was stored
    assert buf.trajectories[0].latents.abs().sum() > 0


# ----------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="window must be at least 1"):
        ReplayBuffer(4, window=0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float16"):
        ReplayBuffer(4, dtype=torch.int64)

    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match="the replay buffer is empty: collect trajectories first"):
        buf.sample(1, gen(), num_steps=N)
    with pytest.raises(ValueError, match=r"latents must be a float tensor of shape \(N\+1, C, H, W\)"):
        buf.add([Trajectory(torch.zeros(2, 3, 3), "p", 1.0)])
    with pytest.raises(ValueError, match=r"latents must be a float tensor"):
        buf.add([Trajectory(torch.zeros(1, 2, 3, 3), "p", 1.0)])  # N = 0: no transition
    with pytest.raises(ValueError, match=r"trajectory 1: latents shape \(5, 2, 4, 4\) does not match"):
        buf.add([traj(0), traj(1, shape=(N + 1, 2, 4, 4))])
    assert len(buf) == 0  # a rejected batch stores nothing
    with pytest.raises(ValueError, match="reward must be finite"):
        buf.add([traj(0, reward=float("nan"))])

    buf.add([traj(0), traj(1)])
    with pytest.raises(ValueError, match=r"trajectory 0: latents shape \(3, 2, 3, 3\) does not match .* \(5, 2, 3, 3\)"):
        buf.add([traj(2, shape=(3, 2, 3, 3))])
    with pytest.raises(ValueError, match="number of samples must be at least 1, got 0"):
        buf.sample(0, gen(), num_steps=N)
    with pytest.raises(ValueError, match="num_steps=3 does not match the stored trajectories' 4 steps"):
        buf.sample(1, gen(), num_steps=3)
    with pytest.raises(ValueError, match=r"gamma \(discount\) must be in \(0, 1\]"):
        buf.sample(1, gen(), num_steps=N, prioritised=True, gamma=0.0)
    assert prompts(buf) == ["p0", "p1"]
