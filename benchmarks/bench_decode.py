"""Decode benchmarks: generation with the notebook's model, and the bare decode step against its bytes.

    python benchmarks/bench_decode.py [--batches 1 64] [--steps 64] [--prompt 128]

(a) `Generator.decode` of `jax_kda.kimi_linear`'s stack (on a GPU the 4-layer model of
    notebooks/kimi_linear_prefill.ipynb): one jitted call of `--steps` greedy tokens after a prompt,
    in milliseconds per token at each batch size. Issue 11's goal: at most 1 ms per token at batch 1 on
    an H200.
(b) `kda_decode_step` alone: it must read and write every state (N x HV x V x K fp32) and read the
    token's q, k, v, g, beta and write its output; its floor is those bytes at the device's copy
    bandwidth, measured in the same run as a large device-to-device copy.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from jax_kda import kda_decode_step
from jax_kda.kimi_linear import Generator, KimiLinearStack, decode_seconds_per_token, default_size, median_seconds

FLAGS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
             lower_bound=-5.0, state_v_first=True)
COPY_BYTES = 2**30
COPY_CALLS, STEP_CALLS = 20, 50  # back-to-back calls per timed run in (b)


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


def decode_step_bandwidth(repeats):
    copy = jax.jit(jnp.copy)  # a fresh output buffer: XLA copies device to device
    source = jnp.zeros((COPY_BYTES // 4,), jnp.float32)
    bandwidth = 2 * COPY_BYTES / chained_s(copy, source, COPY_CALLS, repeats)
    print(f"\n(b) kda_decode_step against the bytes it moves; copy bandwidth {bandwidth / 1e9:,.0f} GB/s "
          f"(read + write of a {COPY_BYTES >> 20} MiB array)")
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
        moved = 2 * state.nbytes + n * h * (4 * d + 1) * 2 + n * h * d * 2  # state, q k v g beta, output
        call = lambda state: step(q, k, v, g, beta, state, a_log, dt_bias)[1]
        seconds = chained_s(call, state, STEP_CALLS, repeats)
        print(f"| {n} | {h} | {d} | {state.nbytes / 1e6:.1f} | {seconds * 1e3:.3f} | {moved / seconds / 1e9:.0f} | "
              f"{moved / seconds / bandwidth:.0%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="sequences decoded at once in (a)")
    p.add_argument("--steps", type=int, default=64, help="greedy tokens per jitted decode call in (a)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding in (a)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(f"{jax.devices()[0].device_kind}. Times: medians of {args.repeats} runs after a warm-up run, each run "
          f"ended by jax.block_until_ready (the device has finished); (b) runs {COPY_CALLS} (copy) or "
          f"{STEP_CALLS} (step) calls back to back per run.")
    generation(args.batches, args.steps, args.prompt, args.repeats)
    decode_step_bandwidth(args.repeats)


if __name__ == "__main__":
    main()
