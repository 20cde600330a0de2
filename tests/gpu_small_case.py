"""A small KDA call through the CUDA kernels, run in a child process by test_cuda.py and
test_decode_cuda.py (under compute-sanitizer, or with XLA's CUDA graphs switched on through XLA_FLAGS):
`run` / `check` a packed prefill with the softplus gate (the chunk-16 kernel); with the bounded gate (the
two-pass kernel) `-two-pass` sequences of equal length, `-two-pass-packed` the packed one (streamed),
`-two-pass-packed-serial` the same with enough value heads to run its passes one after the other (its
items chain-major), `-two-pass-cut` one sequence cut into two segments (forced; its transition columns),
`-two-pass-windows` one whose factors take three windows, overlapped (a second stream, joined back by
events); `-decode` a decode step.

`run...`: the call alone. `check...`: several jitted calls, compared with the XLA path; prints "ok".
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_kda import kda_decode_step, kda_prefill, paths, prefill_path

rng = np.random.default_rng(0)
seqlens = [5, 0, 40, 1, 17]
T, H, HV, K, V = sum(seqlens), 2, 4, 128, 128
cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
args = (bf(1, T, H, K), bf(1, T, H, K), bf(1, T, HV, V), bf(1, T, HV, K), bf(1, T, HV))
kwargs = dict(
    use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
    A_log=jnp.asarray(rng.random(HV), jnp.float32), dt_bias=jnp.asarray(rng.random((HV, K)), jnp.float32),
    initial_state=jnp.asarray(rng.standard_normal((len(seqlens), HV, V, K)), jnp.float32),
    state_v_first=True, output_final_state=True, cu_seqlens=cu,
)


def prefill(impl):
    return jax.jit(lambda *a: kda_prefill(*a, impl=impl, **kwargs))


def decode(impl):
    """Two steps for each of the sequences: a V-first fp32 state, then the result K-first in bf16."""
    flags = {n: kwargs[n] for n in ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel",
                                    "A_log", "dt_bias")}

    def steps(q, k, v, g, beta, state):
        o, state = kda_decode_step(q, k, v, g, beta, state, impl=impl, state_v_first=True, **flags)
        k_first = jnp.swapaxes(state, -1, -2).astype(jnp.bfloat16)
        return (o, state) + kda_decode_step(q, k, v, g, beta, k_first, impl=impl, **flags)

    return jax.jit(steps)


def set_value_heads(hv, states):
    """The gate constants for `hv` value heads and `states` initial states of them, in kwargs."""
    kwargs["A_log"] = jnp.asarray(rng.random(hv), jnp.float32)
    kwargs["dt_bias"] = jnp.asarray(rng.random((hv, K)), jnp.float32)
    kwargs["initial_state"] = jnp.asarray(rng.standard_normal((states, hv, V, K)), jnp.float32)


decoding = sys.argv[1].endswith("decode")
if "two-pass" in sys.argv[1]:
    kwargs["lower_bound"] = -5.0
    if sys.argv[1].endswith("packed-serial"):  # 5 sequences x 16 value heads: 80 chains
        HV = 16
        set_value_heads(HV, len(seqlens))
        args = (bf(1, T, H, K), bf(1, T, H, K), bf(1, T, HV, V), bf(1, T, HV, K), bf(1, T, HV))
    elif not sys.argv[1].endswith("packed"):  # two sequences of 70 tokens (a partial last chunk of 32), one of
        # 512 tokens and one head cut in two (the smallest cut, forced: the cost model cuts 4,096 tokens 16
        # ways, 128 items with transition columns, past any test's time under the sanitizer), or one of
        # 18000 tokens with 32 value heads (three windows)
        B, T = {"cut": (1, 512), "windows": (1, 18000)}.get(sys.argv[1].split("-")[-1], (2, 70))
        if sys.argv[1].endswith("cut"):
            paths.kernel_plan = lambda x, opts: paths.planned(x, opts, 2)
        if sys.argv[1].endswith(("windows", "cut")):
            H, HV = (16, 32) if sys.argv[1].endswith("windows") else (1, 1)
            set_value_heads(HV, B)
        args = (bf(B, T, H, K), bf(B, T, H, K), bf(B, T, HV, V), bf(B, T, HV, K), bf(B, T, HV))
        del kwargs["cu_seqlens"]
        kwargs["initial_state"] = kwargs["initial_state"][:B]
    path = prefill_path(*args, **kwargs)
    assert "two-pass" in path and ("segments" in path) == sys.argv[1].endswith("cut"), path
elif decoding:
    N = len(seqlens)
    args = (bf(N, H, K), bf(N, H, K), bf(N, HV, V), bf(N, HV, K), bf(N, HV), kwargs["initial_state"])
build = decode if decoding else prefill
fast = build("cuda")
if sys.argv[1].startswith("run"):
    jax.block_until_ready(fast(*args))
else:
    slow = build("xla")
    want = slow(*args)
    for _ in range(3):
        got = fast(*args)
        for a, b in zip(got, want):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            err = np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))
            assert err < 5e-3, err
    print("ok")
