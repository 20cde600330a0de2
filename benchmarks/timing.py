"""Wall-clock timing of jitted JAX calls, as ANCHORS.md measured its JAX figures."""

from __future__ import annotations

import time

import jax
import numpy as np


def time_jax(fn, *args, budget_s=0.25, repeats=5):
    """Median milliseconds per call over `repeats` runs of back-to-back calls (after a warm-up),
    with as many calls per run (at most 50) as fit in `budget_s`."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    calls = int(max(1, min(50, budget_s / max(once, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples)) * 1e3


def device_ms(fn, *args, calls=20):
    """Median milliseconds per call on the GPU, from the profiler's device trace (CUPTI): the spans of
    the "XLA Modules" line of GPU 0 over `calls` back-to-back calls, after a warm-up. None where the
    trace has no such line (a CPU run, a profiler that cannot start)."""
    import glob
    import tempfile

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as folder:
        try:
            with jax.profiler.trace(folder):
                out = None
                for _ in range(calls):
                    out = fn(*args)
                jax.block_until_ready(out)
        except Exception:  # another trace running, no profiler plugin: no device figure
            return None
        files = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        if not files:
            return None
        planes = jax.profiler.ProfileData.from_file(files[0]).planes
    for plane in planes:
        if plane.name.startswith("/device:GPU:0"):
            for line in plane.lines:
                if line.name == "XLA Modules":
                    spans = [event.duration_ns for event in line.events]
                    # Every call's module once; a warm-up straggler or a transfer module may add some.
                    return float(np.median(spans)) * 1e-6 if len(spans) >= calls else None
    return None
