"""Where the GPU time of one jax_kda prefill call goes: each kernel's time per call, from the profiler's
device trace (CUPTI), for bench_prefill.py's cases and inputs.

    python benchmarks/kernel_times.py [--cases IJF] [--gate bounded] [--kernel auto] [--calls 20]

For each case: the path the call takes, the median span of the call's XLA module on the GPU (where the
trace has it), the kernels' sum per call, the GPU's busy time per call (the union of the kernels'
intervals: kernels that overlap on several streams count once, where their sum overstates the call),
the span per call (first kernel's start to last kernel's end, over the calls: busy time plus the gaps
between kernels and between calls, which launch order and dependencies cost), and per kernel name its
launches and GPU milliseconds per call (summed over the call, averaged over `--calls` back-to-back calls
after a warm-up). `--kernel chunk-16` or `two-pass` forces the prefill's kernel where the two-pass
kernel takes the call (as the tests' fixture does). `--batched` runs a case of equal sequences (D) as a
batch `[N, T, ...]` instead of packed by `cu_seqlens`: what packing costs.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch makes the inputs

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_prefill import CASES, LOWER_BOUND, make_inputs, to_jax  # noqa: E402
from timing import device_trace  # noqa: E402
from jax_kda import kda_prefill, paths, prefill_path  # noqa: E402

FUSED = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             state_v_first=True, output_final_state=True)


def busy_ns(intervals):
    """Length of the union of (start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def device_events(fn, args, calls):
    """(module spans in ns, {kernel name: [durations in ns]}, busy ns, span ns) of `calls` back-to-back
    calls on GPU 0."""
    trace = device_trace(fn, *args, calls=calls)
    if trace is None:
        raise RuntimeError("no device trace (another trace running, or no profiler plugin)")
    spans, kernels, intervals = trace
    span = max(end for _, end in intervals) - min(start for start, _ in intervals) if intervals else 0
    return spans, kernels, busy_ns(intervals), span


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="IJF")
    p.add_argument("--gate", choices=("bounded", "softplus"), default="bounded")
    p.add_argument("--kernel", choices=("auto", "chunk-16", "two-pass"), default="auto")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--batched", action="store_true", help="equal sequences as a batch, not packed")
    args = p.parse_args()
    if args.kernel != "auto":
        paths.two_pass_is_faster = lambda *launch: args.kernel == "two-pass"
    lower_bound = LOWER_BOUND if args.gate == "bounded" else None
    print(jax.devices()[0].device_kind)
    for name in args.cases:
        seqlens, heads, dim = CASES[name]
        x, cu = make_inputs(seqlens, heads, dim)
        j = {n: to_jax(t) for n, t in x.items()}
        jcu = to_jax(cu.int()) if len(seqlens) > 1 else None
        if args.batched and len(set(seqlens)) == 1:  # [1, N x T, ...] -> [N, T, ...]
            for n in ("q", "k", "v", "g", "beta"):
                j[n] = j[n].reshape(len(seqlens), seqlens[0], *j[n].shape[2:])
            jcu = None
        kwargs = dict(A_log=j["A_log"], dt_bias=j["dt_bias"], initial_state=j["h0"], cu_seqlens=jcu,
                      lower_bound=lower_bound, **FUSED)
        qkvgb = [j[n] for n in ("q", "k", "v", "g", "beta")]
        print(f"\ncase {name}{' (batched)' if jcu is None and len(seqlens) > 1 else ''}: "
              f"{prefill_path(*qkvgb, **kwargs)}")
        fn = jax.jit(lambda *a: kda_prefill(*a, **kwargs))
        spans, kernels, busy, span = device_events(fn, qkvgb, args.calls)
        if spans:  # the jaxlib of the card (0.11) writes no "XLA Modules" line: then the kernels' sum alone
            print(f"module span (median of {len(spans)}): {np.median(spans) * 1e-6:.3f} ms")
        print(f"kernels' sum per call: {sum(map(sum, kernels.values())) * 1e-6 / args.calls:.3f} ms, "
              f"GPU busy per call: {busy * 1e-6 / args.calls:.3f} ms, "
              f"span per call: {span * 1e-6 / args.calls:.3f} ms")
        rows = sorted(kernels.items(), key=lambda item: -sum(item[1]))
        for kernel, durations in rows:
            print(f"  {sum(durations) * 1e-6 / args.calls:8.3f} ms  {len(durations) / args.calls:5.1f} launches  "
                  f"{kernel[:110]}")


if __name__ == "__main__":
    main()
