"""Sharded KDA prefill: time against the number of GPUs, for the two splits of issue 5.

    python benchmarks/bench_sharded.py [--json out.json]

Case A of ANCHORS.md (8192 tokens x 96 heads) split by heads, and case G (131072 tokens x 32 heads)
split by sequence (context parallel), on 1, 2, 4, ... of this host's devices, with ANCHORS.md's input
recipe (bounded gate, L2 norm and beta sigmoid fused, fp32 initial and final state). Each sharded
result is compared with the one-device result (relative RMS difference).
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
CASES = {"A": (8192, 96, "heads"), "G": (131072, 32, "tokens")}  # tokens, heads, split


def make_inputs(tokens, heads, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    shape = (1, tokens, heads, K)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(jax.random.normal(k, shape))
    return dict(
        q=unit(ks[0]).astype(jnp.bfloat16), k=unit(ks[1]).astype(jnp.bfloat16),
        v=jax.random.normal(ks[2], shape, jnp.bfloat16), g=jax.random.normal(ks[3], shape, jnp.bfloat16),
        beta=jax.random.normal(ks[4], shape[:3], jnp.bfloat16), A_log=jax.random.uniform(ks[5], (heads,)),
        dt_bias=jax.random.uniform(ks[6], (heads, K)),
        initial_state=0.1 * jax.random.normal(ks[7], (1, heads, V, K)),
    )


def place(x, mesh, split):
    t, h = ("d", None) if split == "tokens" else (None, "d")
    specs = dict(q=(None, t, h, None), k=(None, t, h, None), v=(None, t, h, None), g=(None, t, h, None),
                 beta=(None, t, h), A_log=(h,), dt_bias=(h, None), initial_state=(None, h, None, None))
    return {n: jax.device_put(a, NamedSharding(mesh, P(*specs[n]))) for n, a in x.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    devices = jax.devices()
    counts = [c for c in (1, 2, 4, 8) if c <= len(devices)]
    prefill = jax.jit(lambda x: kda_prefill(**x, **FLAGS))
    rows = []
    print(f"{len(devices)} x {devices[0].device_kind}")
    print("| case | split | devices | ms | speed-up | rel. diff vs 1 device |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (tokens, heads, split) in CASES.items():
        x = make_inputs(tokens, heads)
        base = base_ms = None
        for c in counts:
            mesh = jax.make_mesh((c,), ("d",), axis_types=(AxisType.Auto,), devices=devices[:c])
            xs = place(x, mesh, split)
            o, s = prefill(xs)
            if base is None:
                base = (np.asarray(o, np.float32), np.asarray(s))
            diff = max(rel(o, base[0]), rel(s, base[1]))
            ms = time_jax(prefill, xs)
            base_ms = base_ms or ms
            rows.append(dict(case=name, split=split, devices=c, ms=ms, diff=diff, card=devices[0].device_kind))
            print(f"| {name} | {split} | {c} | {ms:.3f} | {base_ms / ms:.2f}x | {diff:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
