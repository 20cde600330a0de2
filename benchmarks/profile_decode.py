"""The decode kernel on bench_decode.py's largest case, three times: the program that Nsight Compute
profiles (`gpu_session.sh profile-decode` captures the third launch).

    python benchmarks/profile_decode.py [v-first|k-first] [float32|bfloat16]
"""

import sys

import jax
import jax.numpy as jnp

from bench_decode import FLAGS, HEAD_DIM, HEADS
from jax_kda import kda_decode_step

SEQUENCES = 256
layout = sys.argv[1] if len(sys.argv) > 1 else "v-first"
state_dtype = jnp.dtype(sys.argv[2] if len(sys.argv) > 2 else "float32")
n, d = SEQUENCES, HEAD_DIM
ks = jax.random.split(jax.random.key(0), 6)
q, k, v, g = (jax.random.normal(kk, (n, HEADS, d), jnp.bfloat16) for kk in ks[:4])
beta = jax.random.normal(ks[4], (n, HEADS), jnp.bfloat16)
state = jax.random.normal(ks[5], (n, HEADS, d, d), jnp.float32).astype(state_dtype)
flags = dict(FLAGS, A_log=jnp.zeros((HEADS,)), dt_bias=jnp.zeros((HEADS, d)), state_v_first=layout == "v-first")
step = jax.jit(lambda *a: kda_decode_step(*a, impl="cuda", **flags)[1], donate_argnums=5)
for _ in range(3):
    state = jax.block_until_ready(step(q, k, v, g, beta, state))
