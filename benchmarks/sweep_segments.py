"""Few long sequences cut into segments: time and error against the number of segments (issue 14).

    python benchmarks/sweep_segments.py [--cases IJEG] [--shapes 65536x16] [--pieces 1,2,4,8,16,32,64] [--json out.json]
    python benchmarks/sweep_segments.py --cpu --scale 512 --pieces 1,2,8   # a smoke run on a CPU

Cases (one sequence each; bench_prefill.py's input recipe, bounded gate, fp32 initial and final
state): E 32768 tokens x 32 heads, G 131072 x 32, I 65536 x 8, J 131072 x 4 (issue 14's). For each
segment count P the call runs as `segments.split_prefill` does on the kernels: one prefill of the P
segments with transition columns, the fold of the segment summaries, the correction (the kernel on a
GPU, XLA on a CPU); P = 1 is the uncut call. The prefill runs on the kernel the cost model picks
for it (`paths.planned`), or on the one `--kernel` names. Printed: median ms of back-to-back jitted
calls (`timing.time_jax`), the speed-up over P = 1, the relative RMS error of o and of the final state
against the float64 recurrence on the first `--check-heads` heads, the kernel and the cost model's
time, the library's own choice (`paths.kernel_plan`), and the chunk-16 kernel's CTAs with the time of
one 16-token step of a chain (the call's time over waves x steps): the figures `paths.CardFigures`
holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from oracle import kda_oracle, rel_err  # noqa: E402

from jax_kda import api, cuda, paths, segments  # noqa: E402
from jax_kda.primitive import kda_prefill_inner_run  # noqa: E402
from bench_sharded import FLAGS, K, V, make_inputs  # noqa: E402  (one input recipe for the JAX benchmarks)
from timing import time_jax  # noqa: E402

CASES = {"E": (32768, 32), "G": (131072, 32), "I": (65536, 8), "J": (131072, 4)}  # tokens, heads
ARRAYS = ("q", "k", "v", "g", "beta", "initial_state")
def cut_call(x, pieces, correct):
    """A jitted call of the prefill of `x` cut into `pieces` segments (1: uncut), taking ARRAYS."""
    params = {n: a for n, a in x.items() if n not in ARRAYS}

    def call(*arrays):
        xs, opts = api.prefill_call(**dict(zip(ARRAYS, arrays)), **params, **FLAGS)
        if pieces == 1:  # the whole sequence (the library's own cut off)
            return kda_prefill_inner_run(xs, dataclasses.replace(opts, whole_sequences=True))
        o, final = segments.split_prefill(xs, opts, kda_prefill_inner_run, pieces, correct)
        return o, final

    return jax.jit(call)


def kernel_name(plan):
    return "two-pass" if plan.two_pass else "chunk-16"


def launch_shape(tokens, heads, pieces):
    """(CTAs of the prefill launch, its serial 16-token steps: waves x steps of the longest segment)."""
    sms = paths.multiprocessors()
    width = V if pieces == 1 else V + K  # the transition columns of a cut
    bounds = segments.segment_bounds(tokens, pieces)
    sequences = len(bounds) - 1
    ctas = paths.launch_ctas(sequences, heads, width, sms)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return ctas, -(-ctas // sms) * -(-longest // 16)


def float64_reference(x, heads):
    """The float64 recurrence on the first `heads` heads: (o, final state)."""
    host = {n: np.asarray(jnp.asarray(a, jnp.float32), np.float64) for n, a in x.items()}
    for n in ("q", "k", "v", "g", "beta"):
        host[n] = host[n][:, :, :heads]
    host["A_log"], host["dt_bias"] = host["A_log"][:heads], host["dt_bias"][:heads]
    host["initial_state"] = host["initial_state"][:, :heads]
    operands = [host.pop(n) for n in ("q", "k", "v", "g", "beta")]
    return kda_oracle(*operands, **host, **FLAGS)


def sweep(name, tokens, heads, pieces_list, check_heads, on_gpu):
    x = make_inputs(1, tokens, heads)
    arrays = [x[n] for n in ARRAYS]
    xs, opts = api.prefill_call(**x, **FLAGS)
    chosen = paths.kernel_plan(xs, opts)
    chosen = f"{chosen.pieces} {kernel_name(chosen)}"
    want_o, want_state = float64_reference(x, check_heads)
    correct = cuda.correct_segments if on_gpu else segments.correct_xla
    rows, uncut_ms = [], None
    for pieces in pieces_list:
        if tokens < pieces * 16:
            break
        call = cut_call(x, pieces, correct)
        o, state = call(*arrays)
        ms = time_jax(call, *arrays)
        uncut_ms = uncut_ms or ms
        ctas, steps = launch_shape(tokens, heads, pieces)
        model = paths.planned(xs, opts, pieces)
        row = dict(case=name, tokens=tokens, heads=heads, pieces=pieces, library_choice=chosen, ms=ms,
                   speedup=uncut_ms / ms, err_o=rel_err(o[:, :, :check_heads], want_o),
                   err_state=rel_err(state[:, :check_heads], want_state), kernel=kernel_name(model),
                   model_ms=model.seconds * 1e3, ctas=ctas, us_per_step=ms * 1e3 / steps)
        rows.append(row)
        print(f"| {name} | {tokens} | {heads} | {pieces} | {ms:.3f} | {row['speedup']:.2f}x | {row['err_o']:.2e} "
              f"| {row['err_state']:.2e} | {row['kernel']} | {row['model_ms']:.3f} | {chosen} | {ctas} "
              f"| {row['us_per_step']:.2f} |", flush=True)
        del o, state
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="IJEG")
    p.add_argument("--shapes", default="", help="more single sequences, TOKENSxHEADS comma-separated")
    p.add_argument("--pieces", default="1,2,4,8,16,32,64")
    p.add_argument("--check-heads", type=int, default=1, help="heads checked against float64")
    p.add_argument("--scale", type=int, default=1, help="divide every token count by this (a smoke run)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (the XLA path)")
    p.add_argument("--kernel", choices=("auto", "chunk-16", "two-pass"), default="auto",
                   help="the prefill's kernel where the two-pass kernel takes it (auto: the cost model's)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    if args.kernel != "auto":
        paths.two_pass_is_faster = lambda *launch: args.kernel == "two-pass"
    on_gpu = jax.devices()[0].platform == "gpu"
    card = jax.devices()[0].device_kind
    print(f"{card}; token counts divided by {args.scale}")
    print("| case | tokens | heads | segments | ms | vs uncut | err o | err state | kernel | model ms | library's choice "
          "| chunk-16 CTAs | us a step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    rows = []
    shapes = [(f"{t}x{h}", int(t), int(h)) for t, h in (s.split("x") for s in args.shapes.split(",") if s)]
    for name, tokens, heads in [(name, *CASES[name]) for name in args.cases] + shapes:
        rows += sweep(name, max(16, tokens // args.scale), heads, [int(s) for s in args.pieces.split(",")],
                      args.check_heads, on_gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, scale=args.scale, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
