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
