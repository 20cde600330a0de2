"""Decode-step benchmark: the XLA token step and the fused decode kernel against the bytes they move.

    python benchmarks/bench_decode.py

A decode step must read and write every state (N x HV x K x V) and read the token's q, k, v, g, beta
and write its output; its floor is those bytes at the copy bandwidth, measured in the same run as a
large device-to-device copy (bytes read plus bytes written). Times are medians over runs of
back-to-back calls, each run ended by `jax.block_until_ready`, after a warm-up call; the state is
random (not zeros) and donated, so the kernel updates it in place.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_kda import kda_decode_step

FLAGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             lower_bound=-5.0)
COPY_BYTES = 2**30
COPY_CALLS, STEP_CALLS, REPEATS = 20, 50, 7
HEADS, HEAD_DIM = 32, 128
# (sequences, state layout, state dtype): the Flax layer's cache (V-first fp32) at growing batch, then
# the other layouts and dtypes at the largest.
CASES = [(1, True, jnp.float32), (16, True, jnp.float32), (64, True, jnp.float32), (256, True, jnp.float32),
         (256, False, jnp.float32), (256, True, jnp.bfloat16), (256, False, jnp.bfloat16)]


def chained_s(call, carry, calls, repeats=REPEATS):
    """Median seconds per call of `carry = call(carry)` run `calls` times back to back (after a warm-up)."""
    carry = jax.block_until_ready(call(carry))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            carry = call(carry)
        jax.block_until_ready(carry)
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def copy_bandwidth() -> float:
    copy = jax.jit(jnp.copy)  # a fresh output buffer: XLA copies device to device
    return 2 * COPY_BYTES / chained_s(copy, jnp.ones((COPY_BYTES // 4,), jnp.float32), COPY_CALLS)


def unavailable(step, args):
    """Why `step` cannot lower here (the kernel needs a Hopper GPU), or None."""
    try:
        step.lower(*args)
        return None
    except ValueError as error:
        return str(error)


def main():
    bandwidth = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write of a "
          f"{COPY_BYTES >> 20} MiB array); {HEADS} heads, K = V = {HEAD_DIM}, bf16 q k v g beta, bounded gate")
    print("| sequences | state | state MB | xla ms | xla of copy | cuda ms | cuda of copy | cuda speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    skipped = None
    for n, v_first, state_dtype in CASES:
        d = HEAD_DIM
        ks = jax.random.split(jax.random.key(n), 6)
        q, k, v, g = (jax.random.normal(kk, (n, HEADS, d), jnp.bfloat16) for kk in ks[:4])
        beta = jax.random.normal(ks[4], (n, HEADS), jnp.bfloat16)
        random_state = lambda: jax.random.normal(ks[5], (n, HEADS, d, d), jnp.float32).astype(state_dtype)
        state_bytes = n * HEADS * d * d * jnp.dtype(state_dtype).itemsize
        flags = dict(FLAGS, A_log=jnp.zeros((HEADS,)), dt_bias=jnp.zeros((HEADS, d)), state_v_first=v_first)
        moved = 2 * state_bytes + sum(a.nbytes for a in (q, k, v, g, beta)) + n * HEADS * d * 2  # + o (bf16)
        times = {}
        for impl in ("xla", "cuda"):
            step = jax.jit(lambda *a, impl=impl: kda_decode_step(*a, impl=impl, **flags)[1], donate_argnums=5)
            why = unavailable(step, (q, k, v, g, beta, jax.ShapeDtypeStruct((n, HEADS, d, d), state_dtype)))
            if why is not None:
                skipped = why
                continue
            times[impl] = chained_s(lambda s: step(q, k, v, g, beta, s), random_state(), STEP_CALLS)
        cells = []
        for impl in ("xla", "cuda"):
            s = times.get(impl)
            cells += ["-", "-"] if s is None else [f"{s * 1e3:.3f}", f"{moved / s / bandwidth:.0%}"]
        speedup = f"{times['xla'] / times['cuda']:.2f}x" if len(times) == 2 else "-"
        layout = "V-first" if v_first else "K-first"
        print(f"| {n} | {layout} {jnp.dtype(state_dtype).name} | {state_bytes / 1e6:.1f} | {' | '.join(cells)} | "
              f"{speedup} |")
    if skipped:
        print(f"\ncuda: not run here: {skipped}")


if __name__ == "__main__":
    main()
