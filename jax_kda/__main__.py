"""`python -m jax_kda`: one KDA prefill on realistic shapes, checked and timed on the default backend.

Inputs follow FlashKDA's benchmark recipe (bf16 l2-normalised q, k; raw gate, beta logits fused in the
kernel; bounded gate with lower_bound -5). A GPU runs Kimi-Linear-sized heads (case A of ANCHORS.md:
8192 tokens x 96 heads); a CPU a smaller problem so that the run stays short.

`python -m jax_kda --model`: a Kimi-Linear-style stack with random weights (jax_kda.kimi_linear; on a GPU
the 4-layer model of the notebook) prefills a prompt, then decodes greedily in one jit at each batch size
of --decode-batches; prints the prefill time and the milliseconds per decode step (needs flax).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import kda_prefill
from .api import prefill_path


def make_inputs(key, batch, tokens, heads, head_dim):
    ks = jax.random.split(key, 8)
    shape = (batch, tokens, heads, head_dim)
    unit = lambda k: jax.nn.standardize(jax.random.normal(k, shape), axis=-1) / head_dim**0.5
    return dict(
        q=unit(ks[0]).astype(jnp.bfloat16),
        k=unit(ks[1]).astype(jnp.bfloat16),
        v=jax.random.normal(ks[2], shape, jnp.bfloat16),
        g=jax.random.normal(ks[3], shape, jnp.bfloat16),
        beta=jax.random.normal(ks[4], shape[:3], jnp.bfloat16),
        A_log=jax.random.uniform(ks[5], (heads,), jnp.float32),
        dt_bias=jax.random.uniform(ks[6], (heads, head_dim), jnp.float32),
        initial_state=jax.random.normal(ks[7], (batch, heads, head_dim, head_dim), jnp.float32) * 0.1,
    )


FLAGS = dict(
    use_qk_l2norm_in_kernel=True,
    use_gate_in_kernel=True,
    use_beta_sigmoid_in_kernel=True,
    lower_bound=-5.0,
    state_v_first=True,
    output_final_state=True,
)


def main(argv=None) -> int:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(prog="python -m jax_kda", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, help="prompt length (default 8192 on a GPU; 2048, or 512 with --model, on a CPU)")
    p.add_argument("--heads", type=int, default=96 if on_gpu else 8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impl", default="auto", choices=["auto", "cuda", "xla"])
    p.add_argument("--repeats", type=int, default=10 if on_gpu else 3)
    p.add_argument("--check-tokens", type=int, default=512, help="prefix checked against the reference")
    p.add_argument("--check-heads", type=int, default=2)
    p.add_argument("--model", action="store_true", help="prefill and decode with a Kimi-Linear-style stack")
    p.add_argument("--decode-tokens", type=int, default=64 if on_gpu else 16, help="tokens per timed decode call")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64], help="sequences decoded at once")
    args = p.parse_args(argv)
    if args.model:
        args.tokens = args.tokens or (8192 if on_gpu else 512)
        return run_model(args)
    args.tokens = args.tokens or (8192 if on_gpu else 2048)

    x = make_inputs(jax.random.key(0), args.batch, args.tokens, args.heads, args.head_dim)
    run = jax.jit(lambda x: kda_prefill(**x, **FLAGS, impl=args.impl))
    o, final = run(x)  # compile and warm up
    o.block_until_ready()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))

    # Outputs are causal, so a prefix of the tokens checks against the reference run on that prefix.
    nt, nh = min(args.check_tokens, args.tokens), min(args.check_heads, args.heads)
    part = {n: (a[:, :nt, :nh] if a.ndim == 4 and n != "initial_state" else a) for n, a in x.items()}
    part["beta"] = x["beta"][:, :nt, :nh]
    part.update(A_log=x["A_log"][:nh], dt_bias=x["dt_bias"][:nh], initial_state=x["initial_state"][:, :nh])
    ref_o, _ = jax.jit(lambda x: kda_prefill(**x, **FLAGS, impl="reference"))(part)
    diff = np.asarray(o[:, :nt, :nh], np.float32) - np.asarray(ref_o, np.float32)
    err = float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(np.asarray(ref_o, np.float32) ** 2)))

    device = jax.devices()[0]
    path = prefill_path(**x, **FLAGS, impl=args.impl)
    tokens = args.batch * args.tokens
    print(f"backend      {jax.default_backend()} ({device.device_kind})")
    print(f"path         {path}")
    print(f"problem      B={args.batch} T={args.tokens} H={args.heads} K=V={args.head_dim}, bf16, "
          "bounded gate, l2norm and beta sigmoid fused")
    print(f"time         {seconds * 1e3:.3f} ms (median of {args.repeats})")
    print(f"throughput   {tokens / seconds:,.0f} tokens/s ({tokens * args.heads / seconds:,.0f} token-heads/s)")
    print(f"check        rel. RMS error {err:.2e} vs the reference on {nt} tokens x {nh} heads "
          f"({'ok' if err < 5e-3 else 'FAILED'})")
    return 0 if err < 5e-3 else 1


def run_model(args) -> int:
    from flax import nnx

    from .kimi_linear import Generator, KimiLinearStack, decode_seconds_per_token, default_size, median_seconds

    size = default_size()
    model = KimiLinearStack(**size, rngs=nnx.Rngs(0))
    gen = Generator(model)
    prompt = lambda batch: jax.random.randint(jax.random.key(1), (batch, args.tokens), 0, size["vocab"])

    # Each prefill continues from the caches the previous one returned: the same work every time.
    tokens = prompt(args.batch)
    prefill_s = median_seconds(lambda caches: gen.prefill(tokens, caches)[1], model.init_cache(args.batch),
                               args.repeats)

    device = jax.devices()[0]
    print(f"backend      {jax.default_backend()} ({device.device_kind})")
    print(f"model        {size['layers']} KDA layers, hidden {size['hidden']}, {size['heads']} heads x "
          f"{size['head_dim']}, vocab {size['vocab']}, random weights, bf16")
    print(f"timing       median of {args.repeats} calls after a warm-up call, each ended by jax.block_until_ready")
    print(f"prefill      {args.batch} x {args.tokens} tokens in {prefill_s * 1e3:.2f} ms: "
          f"{args.batch * args.tokens / prefill_s:,.0f} tokens/s (LM head on the last token only)")

    for batch in args.decode_batches:
        tokens = prompt(batch)
        step_s = decode_seconds_per_token(gen, tokens, args.decode_tokens, args.repeats)
        generate_s = median_seconds(lambda _: gen.generate(tokens, args.decode_tokens).tokens, None, args.repeats)
        print(f"decode       {args.decode_tokens} greedy steps of {batch} sequences in one jit: "
              f"{step_s * 1e3:.3f} ms per step ({batch / step_s:,.0f} tokens/s)")
        print(f"generate     {batch} x {args.tokens} prompt tokens, then {args.decode_tokens} decoded: "
              f"{generate_s * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
