"""CPU prefill benchmark: the chunked `xla` path against the token-by-token `reference` scan.

    python benchmarks/bench_cpu.py [--tokens 256 512 ...] [--heads 8 32] [--chunks 16 32] [--json out.json]

Inputs are those of `python -m jax_kda` (bf16 l2-normalised q, k; v, g, beta randn; fused bounded gate
with lower_bound -5, L2 norm and beta sigmoid; an fp32 initial state, the final state written back);
B = 1, K = V = 128. Columns: `kda_prefill(impl="xla")` and `impl="reference"`, and the chunked path
called directly at each size of `--chunks` (default `CPU_CHUNK`, what `xla` runs on a CPU). Times
are medians over repeated jitted calls after a warm-up (benchmarks/timing.py), in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from jax_kda import api, kda_prefill  # noqa: E402
from jax_kda.__main__ import FLAGS, make_inputs  # noqa: E402
from jax_kda.chunked import CPU_CHUNK, kda_chunked  # noqa: E402
from timing import time_jax  # noqa: E402

HEAD_DIM = 128
IMPLS = ("xla", "reference")


def runners(chunks):
    run = {impl: (lambda x, impl=impl: kda_prefill(**x, **FLAGS, impl=impl)) for impl in IMPLS}
    for c in chunks:
        run[f"chunk={c}"] = lambda x, c=c: kda_chunked(*api.prefill_call(**x, **FLAGS), chunk=c)
    return {name: jax.jit(fn) for name, fn in run.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, nargs="+", default=[8, 32])
    p.add_argument("--chunks", type=int, nargs="*", default=[CPU_CHUNK])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    fns = runners(args.chunks)
    cols = list(fns)
    print(f"CPU: {os.cpu_count()} cores, jax {jax.__version__}; milliseconds, median of {args.repeats}")
    print("| T | H | " + " | ".join(cols) + " | reference / fastest chunked |")
    print("|---:|---:|" + "---:|" * (len(cols) + 1))
    rows = []
    for heads in args.heads:
        for tokens in args.tokens:
            x = make_inputs(jax.random.key(0), 1, tokens, heads, HEAD_DIM)
            row = dict(T=tokens, H=heads)
            for name, fn in fns.items():
                row[name] = time_jax(fn, x, budget_s=0.5, repeats=args.repeats)
            fastest = min(row[c] for c in cols if c != "reference")
            rows.append(row)
            cells = [f"{row[c]:.1f}" for c in cols] + [f"{row['reference'] / fastest:.2f}"]
            print(f"| {tokens} | {heads} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cores=os.cpu_count(), jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
