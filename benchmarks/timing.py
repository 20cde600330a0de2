"""Timing of jitted JAX calls: wall clock over back-to-back calls, as ANCHORS.md measured its JAX figures
(time_jax), and the GPU's own from the profiler's device trace (device_trace, device_ms)."""

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


def device_trace(fn, *args, calls=20):
    """The profiler's device trace (CUPTI) of `calls` back-to-back calls of `fn` on GPU 0, after a warm-up:
    (the spans of its "XLA Modules" line, {kernel name: [durations]}, [(start, end) of every kernel]), in
    ns; None where no trace could be taken (another trace running, no profiler plugin)."""
    import collections
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
    spans, kernels, intervals = [], collections.defaultdict(list), []
    for plane in planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            if line.name == "XLA Modules":
                spans += [event.duration_ns for event in line.events]
            elif line.name.startswith("Stream"):
                for event in line.events:
                    kernels[event.name].append(event.duration_ns)
                    intervals.append((event.start_ns, event.end_ns))
    return spans, kernels, intervals


def device_ms(fn, *args, calls=20):
    """Milliseconds per call on the GPU, from the device trace (device_trace): the median span of each
    call's XLA module where the trace has that line; else (the jaxlib of the H200 machine, 0.11, writes
    none) the calls' span on the device, the first kernel's start to the last one's end, over `calls`.
    None without a GPU trace (a CPU run)."""
    trace = device_trace(fn, *args, calls=calls)
    if trace is None:
        return None
    spans, _, intervals = trace
    if len(spans) >= calls:  # every call's module once; a warm-up straggler or a transfer module may add some
        return float(np.median(spans)) * 1e-6
    if not intervals:
        return None
    return (max(end for _, end in intervals) - min(start for start, _ in intervals)) / calls * 1e-6
