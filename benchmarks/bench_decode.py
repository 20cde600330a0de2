"""Decode benchmarks: generation with the notebook's model, and the bare decode step (the XLA token
step and the fused decode kernel) against its bytes.

    python benchmarks/bench_decode.py [--batches 1 64] [--steps 64] [--prompt 128]

(a) `Generator.decode` of `jax_kda.kimi_linear`'s stack (on a GPU the 4-layer model of
    notebooks/kimi_linear_prefill.ipynb): one jitted call of `--steps` greedy tokens after a prompt,
    in milliseconds per token at each batch size. Issue 11's goal: at most 1 ms per token at batch 1 on
    an H200.
(b) `kda_decode_step` alone, `impl="xla"` and `impl="cuda"`: it must read and write every state
    (N x HV x K x V) and read the token's q, k, v, g, beta and write its output; its floor is those
    bytes at the copy bandwidth, measured in the same run as a large device-to-device copy (bytes read
    plus bytes written). The state is random (not zeros) and donated, so the kernel updates it in place.
Times: medians over runs after a warm-up run, each run ended by `jax.block_until_ready` (the device has
finished); short calls are timed in groups of back-to-back calls.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from jax_kda import kda_decode_step
from jax_kda.kimi_linear import Generator, KimiLinearStack, decode_seconds_per_token, default_size, median_seconds

FLAGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             lower_bound=-5.0)
COPY_BYTES = 2**30
COPY_CALLS, STEP_CALLS = 20, 50  # back-to-back calls per timed run in (b)
HEADS, HEAD_DIM = 32, 128
# (sequences, V-first state, state dtype) in (b): the Flax layer's cache (V-first fp32) at growing
# batch, then the other layouts and dtypes at the largest.
CASES = [(1, True, jnp.float32), (16, True, jnp.float32), (64, True, jnp.float32), (256, True, jnp.float32),
         (256, False, jnp.float32), (256, True, jnp.bfloat16), (256, False, jnp.bfloat16)]


def chained_s(call, carry, calls, repeats):
    """`median_seconds` of `calls` back-to-back `carry = call(carry)`, per call: short calls are timed in
    groups so that the host's dispatch overlaps the device's work, as in a real loop."""
    def group(carry):
        for _ in range(calls):
            carry = call(carry)
        return carry

    return median_seconds(group, carry, repeats) / calls


def generation(batches, steps, prompt_len, repeats):
    size = default_size()
    gen = Generator(KimiLinearStack(**size, rngs=nnx.Rngs(0)))
    print(f"(a) generate's decode loop: {size['layers']} KDA layers, hidden {size['hidden']}, {size['heads']} "
          f"heads x {size['head_dim']}, vocab {size['vocab']}, bf16; {steps} greedy tokens per jitted call "
          f"after a {prompt_len}-token prompt (a step's cost does not depend on it)")
    print("| sequences | ms / token | tokens / s |")
    print("|---:|---:|---:|")
    for batch in batches:
        prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, size["vocab"])
        seconds = decode_seconds_per_token(gen, prompt, steps, repeats)
        print(f"| {batch} | {seconds * 1e3:.3f} | {batch / seconds:,.0f} |")


def unavailable(step, args):
    """Why `step` cannot lower here (the kernel needs a Hopper GPU), or None."""
    try:
        step.lower(*args)
        return None
    except ValueError as error:
        return str(error)


def decode_step_bandwidth(repeats):
    copy = jax.jit(jnp.copy)  # a fresh output buffer: XLA copies device to device
    bandwidth = 2 * COPY_BYTES / chained_s(copy, jnp.ones((COPY_BYTES // 4,), jnp.float32), COPY_CALLS, repeats)
    print(f"\n(b) kda_decode_step against the bytes it moves; copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + "
          f"write of a {COPY_BYTES >> 20} MiB array); {HEADS} heads, K = V = {HEAD_DIM}, bf16 q k v g beta, "
          "bounded gate")
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
            times[impl] = chained_s(lambda s: step(q, k, v, g, beta, s), random_state(), STEP_CALLS, repeats)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="sequences decoded at once in (a)")
    p.add_argument("--steps", type=int, default=64, help="greedy tokens per jitted decode call in (a)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding in (a)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(f"{jax.devices()[0].device_kind}. Times: medians of {args.repeats} runs after a warm-up run, each run "
          f"ended by jax.block_until_ready; (b) runs {COPY_CALLS} (copy) or {STEP_CALLS} (step) calls back to "
          "back per run.")
    generation(args.batches, args.steps, args.prompt, args.repeats)
    decode_step_bandwidth(args.repeats)


if __name__ == "__main__":
    main()
