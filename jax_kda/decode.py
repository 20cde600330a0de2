"""One KDA token per sequence against a carried state: the decode step.

A decode step reads and writes the whole `K x V` state of every head for one token of work, so it is
bound by memory bandwidth. It binds the KDA primitives (`jax_kda.primitive`) with `decode_step` set:
their lowering asks `jax_kda.paths` for the platform lowered for, and emits the fused decode kernel
(one pass over the state, `impl="cuda"`) or one pure-JAX token step, which XLA fuses into a few
passes. Batching, the split over a mesh and Explicit mesh axes are the prefill's; derivatives are
those of the token step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import sharding
from .call import build_call
from .options import DECODE_IMPLS, KDAOperands, KDAOptions
from .primitive import kda_prefill_bind, step_forward


def kda_decode_step(
    q, k, v, g, beta, state, *, scale=None, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
    use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, lower_bound=None, A_log=None, dt_bias=None,
    state_v_first=False, impl="auto",
):
    """Advances each sequence by one token.

    q, k `[N, H, K]`; v `[N, HV, V]`; g `[N, HV, K]`; beta `[N, HV]`; state `[N, HV, K, V]` (`[N, HV, V,
    K]` with `state_v_first`), flags as in `kda_prefill`. Returns `(o [N, HV, V] in q's dtype, new state
    in the dtype and layout of `state`)`; `kda_prefill` of one token gives the same.
    `impl`: "auto" (the decode kernel where it takes the step, else the XLA token step), "cuda" (the fused
    decode kernel: Hopper GPUs, K 64 or 128, V a multiple of 16, q/k/v, g, beta and state in bfloat16 or
    float32; an error elsewhere) or "xla" (the token step). The
    kernel writes the new state over the old one: donate the state to the jitted step (or carry it
    through a loop), or XLA copies it first.
    """
    if impl not in DECODE_IMPLS:
        raise ValueError(f"impl must be one of {DECODE_IMPLS}, got {impl!r}")
    q, k, v, g, beta, state = map(jnp.asarray, (q, k, v, g, beta, state))
    _check_decode_shapes(q, k, v, g, beta, state, dt_bias, state_v_first)
    x, opts = build_call(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale=scale, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, safe_gate=False, lower_bound=lower_bound, A_log=A_log,
        dt_bias=dt_bias, state_v_first=state_v_first, cu_seqlens=None, final_state_dtype=state.dtype, impl=impl,
    )
    opts = dataclasses.replace(opts, decode_step=True)
    mesh = sharding.explicit_mesh_of(x)
    o, new_state = _run(x, opts) if mesh is None else sharding.explicit_mesh_prefill(x, opts, mesh, _run)
    return o[:, 0], new_state


def _run(x: KDAOperands, opts: KDAOptions):
    """`(o [N, 1, HV, V], new state)` of one decode step on (this device's) operands."""
    return _differentiable(x.present(), opts)(*x.flatten())


@functools.lru_cache(maxsize=None)
def _differentiable(present: tuple[bool, ...], opts: KDAOptions):
    """The primitive under a `custom_jvp` whose derivatives are the XLA token step's (forward and
    reverse mode)."""

    @jax.custom_jvp
    def step(*args):
        return tuple(kda_prefill_bind(KDAOperands.unflatten(present, args), opts))

    @step.defjvp
    def step_jvp(primals, tangents):
        return jax.jvp(lambda *a: tuple(step_forward(*a, present=present, opts=opts)), primals, tangents)

    return step


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
