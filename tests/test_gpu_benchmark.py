"""benchmarks/gpu_train.py works without a GPU (issue 17: "a reduced-size CPU run shows the
benchmark works"): its reduced run on the CPU builds the models through ComfyUI's classes, runs
the engine and the bare composite each in its own process, estimates the step under
FakeTensorMode, and reports all three. The figures are checked against each other: the composite
is the same work as the engine (same peak), and the estimate is the tracked peak of that work.

One objective, one timed step (~75 s on 2 cores); the full reduced run is in docs/measured.md."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(PACK_ROOT, "benchmarks", "gpu_train.py")


@pytest.mark.slow
def test_reduced_cpu_run_reports_engine_composite_and_estimate(tmp_path):
    out = tmp_path / "reduced.json"
    proc = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--reduced", "--kinds", "refl", "--steps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=PACK_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["reduced"] is True
    [row] = report["rows"]
    assert (row["model"], row["kind"]) == ("sd15", "refl")
    engine, composite, est = row["engine"], row["composite"], row["estimate_bytes"]
    for side in (engine, composite):
        assert math.isfinite(side["step_s"]) and side["step_s"] > 0
        assert side["peak"] > 100 * 2 ** 20  # the 25.8M UNet's weights alone are ~100 MiB in fp32
    # measured: estimate / composite peak 0.99997, estimate / engine peak 0.9965
    assert abs(est / composite["peak"] - 1) <= 1e-3
    assert abs(est / engine["peak"] - 1) <= 0.01
    # the estimate's own record: the real-size-style breakdown adds up, the models it built are reduced
    estimate = report["estimates"]["sd15/refl"]
    assert estimate["bytes"] == est
    assert estimate["breakdown"]["Total"] == est
    assert 20e6 < estimate["params"]["unet"] < 30e6
    # the table a user reads names both sides and their ratio
    assert "e/b" in proc.stdout and "est/engine" in proc.stdout
