"""From a caller's arguments to one KDA call: its arrays (`KDAOperands`) and its static options.

The one options builder of the package: `kda_prefill`, `prefill_path` and `kda_decode_step` all build
their call here. It checks every argument (`jax_kda.validation`) and brings the arrays to the forms the
rest of the package relies on, once: `cu_seqlens` int32, `dt_bias` `[HV, K]`.
"""

from __future__ import annotations

import jax.numpy as jnp

from .options import KDAOperands, KDAOptions
from .validation import check_cu_seqlens_values, check_operands, check_options, int32_cu_seqlens


def _as_array(a):
    """Arrays, tracers and `jax.ShapeDtypeStruct`s as they are; anything else (lists, scalars) as an array."""
    if a is None or hasattr(a, "shape") and hasattr(a, "dtype"):
        return a
    return jnp.asarray(a)


def build_call(
    q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate, lower_bound, A_log, dt_bias, state_v_first,
    cu_seqlens, final_state_dtype, impl,
) -> tuple[KDAOperands, KDAOptions]:
    """Checks a call's arguments (those of `kda_prefill`, defaults resolved by the caller) and splits it
    into its arrays and its static options."""
    gate = check_options(
        use_gate_in_kernel=use_gate_in_kernel, lower_bound=lower_bound, safe_gate=safe_gate, A_log=A_log,
        dt_bias=dt_bias, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, scale=scale, impl=impl, final_state_dtype=final_state_dtype,
    )
    q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens = map(
        _as_array, (q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
    )
    if dt_bias is not None and len(dt_bias.shape) == 1 and len(v.shape) == 4 and len(q.shape) == 4:
        if dt_bias.shape[0] == v.shape[2] * q.shape[3]:  # FLA's flat [HV * K]
            dt_bias = dt_bias.reshape(v.shape[2], q.shape[3])
    if cu_seqlens is not None:
        cu_seqlens = int32_cu_seqlens(cu_seqlens, q.shape[1] if len(q.shape) == 4 else 0)
    x = KDAOperands(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
    check_operands(x, state_v_first=state_v_first)
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, q.shape[1])

    opts = KDAOptions(
        scale=float(q.shape[3] ** -0.5 if scale is None else scale),
        use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
        gate=gate,
        lower_bound=None if lower_bound is None else float(lower_bound),
        safe_gate=bool(safe_gate),
        use_beta_sigmoid=bool(use_beta_sigmoid_in_kernel),
        allow_neg_eigval=bool(allow_neg_eigval),
        state_v_first=bool(state_v_first),
        output_final_state=bool(output_final_state),
        final_state_dtype=jnp.dtype(final_state_dtype or jnp.float32).name,
        impl=impl,
    )
    return x, opts
