"""One anchor case through jax_kda's kernels, three times: the program that Nsight Compute profiles
(`gpu_session.sh profile` captures the third launch).

    python benchmarks/profile_prefill.py [CASE]
"""

import sys

import jax

from bench_prefill import CASES, LOWER_BOUND, make_inputs, to_jax
from jax_kda import kda_prefill

seqlens, heads, dim = CASES[sys.argv[1] if len(sys.argv) > 1 else "F"]
x, cu = make_inputs(seqlens, heads, dim)
args = {n: to_jax(t) for n, t in x.items()}
run = jax.jit(lambda a, cu: kda_prefill(
    a["q"], a["k"], a["v"], a["g"], a["beta"], A_log=a["A_log"], dt_bias=a["dt_bias"], initial_state=a["h0"],
    cu_seqlens=cu, lower_bound=LOWER_BOUND, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
    use_beta_sigmoid_in_kernel=True, state_v_first=True, output_final_state=True, impl="cuda"))
cu = to_jax(cu.int()) if len(seqlens) > 1 else None
for _ in range(3):
    jax.block_until_ready(run(args, cu))
