"""Sharded KDA prefill: time against the number of devices, for the splits of issues 5 and 13.

    python benchmarks/bench_sharded.py [--json out.json] [--cases A-heads,G-tokens] [--devices 1,2,4]
    python benchmarks/bench_sharded.py --scale 1024 --cpu-devices 4     # a quick run on a CPU

Cases (ANCHORS.md's input recipe: bounded gate, L2 norm and beta sigmoid fused, fp32 initial and final
state), each on 1, 2, 4, ... of this host's devices, and compared with the one-device result in the
same process (relative RMS difference of the outputs and of the final state, separately):
- `A-heads`: case A (1 x 8192 tokens, 96 heads) split by heads;
- `A-batch`: case A's tokens as a batch of 8 sequences of 1024, split by batch;
- `G-tokens`: case G (1 x 131072 tokens, 32 heads) split by sequence (context parallelism);
- `M-tokens`: one sequence of 1M tokens with 32 heads split by sequence.
Times: median milliseconds of back-to-back jitted calls (`timing.time_jax`, wall clock around the
calls and one `block_until_ready`, so every device's work is inside). `--scale N` divides every token
count by N (a smoke run); the JSON records it.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_kda import kda_prefill
from timing import time_jax

K = V = 128
FLAGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             lower_bound=-5.0, state_v_first=True, output_final_state=True)
# name: (sequences, tokens per sequence, heads, the axis split over the devices)
CASES = {
    "A-heads": (1, 8192, 96, "heads"),
    "A-batch": (8, 1024, 96, "batch"),
    "G-tokens": (1, 131072, 32, "tokens"),
    "M-tokens": (1, 1 << 20, 32, "tokens"),
}
# The operands' axes: batch, tokens, heads, channels (state: batch, heads, V, K).
_AXES = dict(q="bthk", k="bthk", v="bthk", g="bthk", beta="bth", A_log="h", dt_bias="hk", initial_state="bhvk")


def make_inputs(batch, tokens, heads, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    shape = (batch, tokens, heads, K)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(jax.random.normal(k, shape))
    return dict(
        q=unit(ks[0]).astype(jnp.bfloat16), k=unit(ks[1]).astype(jnp.bfloat16),
        v=jax.random.normal(ks[2], shape, jnp.bfloat16), g=jax.random.normal(ks[3], shape, jnp.bfloat16),
        beta=jax.random.normal(ks[4], shape[:3], jnp.bfloat16), A_log=jax.random.uniform(ks[5], (heads,)),
        dt_bias=jax.random.uniform(ks[6], (heads, K)),
        initial_state=0.1 * jax.random.normal(ks[7], (batch, heads, V, K)),
    )


def place(x, mesh, split):
    """Puts each operand on `mesh`, its `split` axis ("batch", "heads" or "tokens") over the mesh axis."""
    letter = {"batch": "b", "heads": "h", "tokens": "t"}[split]
    spec = lambda axes: P(*("d" if a == letter else None for a in axes))
    return {n: jax.device_put(a, NamedSharding(mesh, spec(_AXES[n]))) for n, a in x.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def run_case(name, devices, counts, scale):
    batch, tokens, heads, split = CASES[name]
    tokens = max(1, tokens // scale)
    x = make_inputs(batch, tokens, heads)
    prefill = jax.jit(lambda x: kda_prefill(**x, **FLAGS))
    rows, base, base_ms = [], None, None
    for c in counts:
        mesh = jax.make_mesh((c,), ("d",), axis_types=(AxisType.Auto,), devices=devices[:c])
        xs = place(x, mesh, split)
        o, s = prefill(xs)
        o, s = np.asarray(o, np.float32), np.asarray(s)
        if base is None:
            base = (o, s)
        ms = time_jax(prefill, xs)
        base_ms = base_ms or ms
        rows.append(dict(case=name, split=split, sequences=batch, tokens=tokens, heads=heads, devices=c, ms=ms,
                         speedup=base_ms / ms, diff_o=rel(o, base[0]), diff_state=rel(s, base[1])))
        r = rows[-1]
        print(f"| {name} | {split} | {batch} x {tokens} | {heads} | {c} | {ms:.3f} | {r['speedup']:.2f}x "
              f"| {r['diff_o']:.1e} | {r['diff_state']:.1e} |", flush=True)
        del xs, o, s
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated names of CASES")
    p.add_argument("--devices", help="comma-separated device counts (default 1, 2, 4, 8 up to what there is)")
    p.add_argument("--scale", type=int, default=1, help="divide every token count by this (a smoke run)")
    p.add_argument("--cpu-devices", type=int, help="run on this many CPU devices instead of the default backend")
    args = p.parse_args()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_platforms", "cpu")
    devices = jax.devices()
    wanted = [int(c) for c in args.devices.split(",")] if args.devices else [1, 2, 4, 8]
    counts = [c for c in wanted if c <= len(devices)]
    card = devices[0].device_kind
    print(f"{len(devices)} x {card}; token counts divided by {args.scale}")
    print("| case | split | sequences x tokens | heads | devices | ms | speed-up | rel. diff o | rel. diff state |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [row for name in names for row in run_case(name, devices, counts, args.scale)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, devices_on_host=len(devices), scale=args.scale, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
