"""Where the time of a cut prefill goes (jax_kda.segments on the kernels), for one anchor case.

    python benchmarks/profile_segments.py [E]

Times, in one process: the whole call; the call with cutting disabled; the prefill with transition
columns alone; the kernel correction and the XLA correction alone.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp

from bench_prefill import CASES, make_inputs, to_jax
from jax_kda import api, cuda, paths, segments
from jax_kda.primitive import kda_prefill_inner_run
from timing import time_jax

FUSED = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             state_v_first=True, output_final_state=True, lower_bound=-5.0)


def main(name="E"):
    seqlens, heads, dim = CASES[name]
    x, _ = make_inputs(seqlens, heads, dim)
    j = {n: to_jax(t) for n, t in x.items()}
    args = dict(A_log=j["A_log"], dt_bias=j["dt_bias"], initial_state=j["h0"], **FUSED)
    call = lambda q, k, v, g, b: api.kda_prefill(q, k, v, g, b, **args)
    qkvgb = [j[n] for n in ("q", "k", "v", "g", "beta")]
    xs, opts = api.prefill_call(*qkvgb, **args)
    pieces = paths.kernel_plan(xs, opts).pieces
    print(f"case {name}: {pieces} pieces")
    print(f"whole call        {time_jax(jax.jit(call), *qkvgb):.3f} ms")
    summarize = jax.jit(lambda *a: segments.summarize(
        xs._replace(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4], initial_state=None), opts, kda_prefill_inner_run, pieces))
    s = summarize(*qkvgb)
    print(f"prefill + columns {time_jax(summarize, *qkvgb):.3f} ms")
    entries = jnp.broadcast_to(jnp.swapaxes(j["h0"], -1, -2)[:, None], s.local.shape[:2] + s.local.shape[2:])
    kernel = jax.jit(lambda o, e: cuda.correct_segments(o, e, s.bounds))
    xla = jax.jit(lambda o, e: segments.correct_xla(o, e, s.bounds))
    print(f"kernel correction {time_jax(kernel, s.o_aug, entries):.3f} ms")
    print(f"xla correction    {time_jax(xla, s.o_aug, entries):.3f} ms")
    a, b = kernel(s.o_aug, entries), xla(s.o_aug, entries)
    print(f"corrections differ by {float(jnp.sqrt(jnp.mean((a.astype(float) - b.astype(float)) ** 2) / jnp.mean(b.astype(float) ** 2))):.1e}")
    whole = dataclasses.replace(opts, whole_sequences=True)  # the library's own cut off
    uncut = jax.jit(lambda *a: kda_prefill_inner_run(xs._replace(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4]), whole))
    print(f"uncut call        {time_jax(uncut, *qkvgb):.3f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:])
