"""One KDA token per sequence against a carried state: the decode step.

A decode step reads and writes the whole `K x V` state of every head for one token of work, so it is
bound by memory bandwidth; it is written as plain JAX that XLA fuses into a few passes over the state.
"""

from __future__ import annotations

import jax.numpy as jnp

from .activations import finish_state, prepare
from .options import KDAOperands, KDAOptions
from .reference import _token_step
from .validation import check_operands, check_options


def kda_decode_step(
    q, k, v, g, beta, state, *, scale=None, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
    use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, lower_bound=None, A_log=None, dt_bias=None,
    state_v_first=False,
):
    """Advances each sequence by one token.

    q, k `[N, H, K]`; v `[N, HV, V]`; g `[N, HV, K]`; beta `[N, HV]`; state `[N, HV, K, V]` (`[N, HV, V,
    K]` with `state_v_first`), flags as in `kda_prefill`. Returns `(o [N, HV, V] in q's dtype, new state
    in the dtype and layout of `state`)`; `kda_prefill` of one token gives the same.
    """
    gate = check_options(
        use_gate_in_kernel=use_gate_in_kernel, lower_bound=lower_bound, safe_gate=False, A_log=A_log,
        dt_bias=dt_bias, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        scale=scale, impl="auto", final_state_dtype=None,
    )
    q, k, v, g, beta, state = map(jnp.asarray, (q, k, v, g, beta, state))
    if q.ndim != 3 or v.ndim != 3 or beta.ndim != 2:
        raise ValueError(
            f"the decode step takes one token per sequence: q, k [N, H, K], v [N, HV, V], g [N, HV, K], "
            f"beta [N, HV]; got q {q.shape}, v {v.shape}, beta {beta.shape}"
        )
    if dt_bias is not None:
        dt_bias = jnp.asarray(dt_bias).reshape(v.shape[1], q.shape[2])
    x = KDAOperands(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                    None if A_log is None else jnp.asarray(A_log), dt_bias, state)
    check_operands(x, state_v_first=state_v_first)
    opts = KDAOptions(
        scale=float(q.shape[2] ** -0.5 if scale is None else scale), use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
        gate=gate, lower_bound=None if lower_bound is None else float(lower_bound), safe_gate=False,
        use_beta_sigmoid=bool(use_beta_sigmoid_in_kernel), allow_neg_eigval=bool(allow_neg_eigval),
        state_v_first=bool(state_v_first), output_final_state=True, final_state_dtype=state.dtype.name, impl="xla",
    )
    p = prepare(x, opts)
    new_state, o = _token_step(p.initial_state, p.q[:, 0], p.k[:, 0], p.v[:, 0], p.a[:, 0], p.beta[:, 0])
    return o.astype(q.dtype), finish_state(new_state, opts)

