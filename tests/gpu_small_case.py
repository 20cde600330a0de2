"""A small packed KDA prefill through the CUDA kernels, run in a child process by test_cuda.py
(under compute-sanitizer, or with XLA's CUDA graphs switched on through XLA_FLAGS).

`run`: the call alone. `check`: several jitted calls, compared with the XLA path; prints "ok".
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_kda import kda_prefill

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

fast = jax.jit(lambda *a: kda_prefill(*a, impl="cuda", **kwargs))
if sys.argv[1] == "run":
    jax.block_until_ready(fast(*args))
else:
    slow = jax.jit(lambda *a: kda_prefill(*a, impl="xla", **kwargs))
    want = slow(*args)
    for _ in range(3):
        got = fast(*args)
        for a, b in zip(got, want):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            err = np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))
            assert err < 5e-3, err
    print("ok")
