"""Decode-step benchmark: one token per sequence against a carried fp32 state, against the bytes moved.

    python benchmarks/bench_decode.py

A decode step must read and write every state (N x HV x K x V fp32) and read the token's q, k, v, g,
beta; its floor is those bytes at the copy bandwidth, measured in the same run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_kda import kda_decode_step

FLAGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             lower_bound=-5.0, state_v_first=True)


def chained_s(fn, x, calls=50, repeats=7):
    """Median seconds of `x = fn(x)` over back-to-back calls (after a warm-up)."""
    x = jax.block_until_ready(fn(x))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            x = fn(x)
        jax.block_until_ready(x)
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def main():
    src = jnp.zeros((2**28,), jnp.float32)
    bandwidth = 2 * src.nbytes / chained_s(jax.jit(lambda x: x + 1.0, donate_argnums=0), src, calls=20)
    device = jax.devices()[0].device_kind
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| sequences | heads | K = V | state MB | ms / step | GB/s | of the copy bandwidth |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    step = jax.jit(lambda q, k, v, g, b, s, a, d: kda_decode_step(q, k, v, g, b, s, A_log=a, dt_bias=d, **FLAGS),
                   donate_argnums=5)
    for n, h in ((1, 32), (16, 32), (64, 32), (256, 32)):
        d = 128
        ks = jax.random.split(jax.random.key(n), 5)
        q, k, v, g = (jax.random.normal(kk, (n, h, d), jnp.bfloat16) for kk in ks[:4])
        beta = jax.random.normal(ks[4], (n, h), jnp.bfloat16)
        state = jnp.zeros((n, h, d, d), jnp.float32)
        a_log, dt_bias = jnp.zeros((h,)), jnp.zeros((h, d))

        def run(state):
            return step(q, k, v, g, beta, state, a_log, dt_bias)[1]

        seconds = chained_s(run, state)
        moved = 2 * state.nbytes + n * h * (4 * d + 1) * 2 + n * h * d * 2
        print(f"| {n} | {h} | {d} | {state.nbytes / 1e6:.1f} | {seconds * 1e3:.3f} | {moved / seconds / 1e9:.0f} | "
              f"{moved / seconds / bandwidth:.0%} |")


if __name__ == "__main__":
    main()
