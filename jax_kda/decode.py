"""One KDA token per sequence against a carried state: the decode step.

A decode step reads and writes the whole `K x V` state of every head for one token of work, so it is
bound by memory bandwidth; it is written as plain JAX that XLA fuses into a few passes over the state.
"""

from __future__ import annotations

import jax.numpy as jnp

from .activations import finish_state, prepare
from .call import build_call
from .reference import _token_step


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
    q, k, v, g, beta, state = map(jnp.asarray, (q, k, v, g, beta, state))
    _check_decode_shapes(q, k, v, g, beta, state, dt_bias, state_v_first)
    x, opts = build_call(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale=scale, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, safe_gate=False, lower_bound=lower_bound, A_log=A_log,
        dt_bias=dt_bias, state_v_first=state_v_first, cu_seqlens=None, final_state_dtype=state.dtype, impl="xla",
    )
    p = prepare(x, opts)
    new_state, o = _token_step(p.initial_state, p.q[:, 0], p.k[:, 0], p.v[:, 0], p.a[:, 0], p.beta[:, 0])
    return o.astype(q.dtype), finish_state(new_state, opts)


def _check_decode_shapes(q, k, v, g, beta, state, dt_bias, state_v_first):
    """The decode step's shapes, in its own layout and argument names."""
    if q.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"the decode step takes one token per sequence: q, k [N, H, K], v [N, HV, V], g [N, HV, K], "
            f"beta [N, HV]; got q {q.shape}, v {v.shape}"
        )
    (n, h, kd), (hv, vd) = q.shape, v.shape[1:]
    state_layout = ("[N, HV, V, K]", (n, hv, vd, kd)) if state_v_first else ("[N, HV, K, V]", (n, hv, kd, vd))
    for name, arr, layout, want in (
        ("k", k, "[N, H, K] (the shape of q)", (n, h, kd)),
        ("v", v, "[N, HV, V]", (n, hv, vd)),
        ("g", g, "[N, HV, K]", (n, hv, kd)),
        ("beta", beta, "[N, HV]", (n, hv)),
        ("state", state, state_layout[0], state_layout[1]),
    ):
        if arr.shape != want:
            raise ValueError(f"{name} must have shape {layout} = {want}, got {arr.shape}")
    if h == 0 or hv % h:
        raise ValueError(f"v has HV = {hv} value heads, which must be a positive multiple of the H = {h} heads of q")
    if dt_bias is not None and jnp.shape(dt_bias) not in ((hv, kd), (hv * kd,)):
        raise ValueError(f"dt_bias must have shape [HV, K] = {(hv, kd)} or [HV * K] = ({hv * kd},), "
                         f"got {jnp.shape(dt_bias)}")
