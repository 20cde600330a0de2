"""`kda_prefill`: FLA's `chunk_kda` contract (../shared/SPEC.md) as a JAX function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import cuda, sharding
from .activations import finish_state, initial_state_kv
from .options import KDAOperands, KDAOptions
from .primitive import kda_prefill_bind, xla_forward
from .reference import kda_reference
from .validation import check_cu_seqlens_values, check_operands, check_options


def kda_prefill(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False, safe_gate=False, lower_bound=None, A_log=None, dt_bias=None,
    state_v_first=False, cu_seqlens=None, final_state_dtype=None, impl="auto", axis_name=None,
):
    """Kimi Delta Attention prefill (forward), differentiable.

    Args follow FLA's `chunk_kda`: q, k `[B, T, H, K]`; v `[B, T, HV, V]` (HV a multiple of H);
    g `[B, T, HV, K]` (log-decay, or the raw gate with `use_gate_in_kernel`); beta `[B, T, HV]`;
    initial_state `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`); cu_seqlens `[N + 1]` packs N
    sequences along T when B == 1. The fused gate is softplus (`A_log` required) when `lower_bound` is
    None, else bounded: `lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`.
    `final_state_dtype` (default float32) is the dtype of the returned state.
    `impl`: "auto" (CUDA kernels on a GPU when they take the call, else the chunked XLA path),
    "cuda", "xla" (chunked pure JAX) or "reference" (token-by-token scan).
    `axis_name`: inside `shard_map`, the mesh axis (or axes) over which T is split, in order: the
    devices run the sequence's segments in parallel (context parallelism); the final state is the whole
    sequence's on every device, which `shard_map` cannot infer through the all-gather (give it
    `check_vma=False` for an `out_specs` of `P()`). Under `jit`, a T axis sharded over the mesh does
    the same without it.

    Returns `(o [B, T, HV, V] in q's dtype, final_state or None)`.
    """
    kwargs = dict(locals())
    axis_name = kwargs.pop("axis_name")
    x, opts = _normalize(**kwargs)
    if x.q.shape[0] == 0 or x.q.shape[1] == 0:
        return _no_tokens(x, opts)
    run = kda_reference if opts.impl == "reference" else _run_primitive
    if axis_name is not None:
        return sharding.context_parallel(x, opts, axis_name, jax.lax.axis_size(axis_name), run)
    mesh = sharding.explicit_mesh_of(x)
    if mesh is not None:
        return sharding.explicit_mesh_prefill(x, opts, mesh, run)
    return run(x, opts)


def _run_primitive(x: KDAOperands, opts: KDAOptions):
    results = _differentiable(x.present(), opts)(*x.flatten())
    return results[0], (results[1] if opts.output_final_state else None)


def prefill_path(q, k, v, g, beta, **kwargs) -> str:
    """Which implementation `kda_prefill` with these arguments runs on the default backend, and why.

    Takes the arguments of `kda_prefill` (arrays or `jax.ShapeDtypeStruct`s)."""
    x, opts = _normalize(q, k, v, g, beta, **kwargs)
    if opts.impl == "reference":
        return "reference (token-by-token scan)"
    xla = "xla (chunked pure JAX)"
    if opts.impl == "xla":
        return xla
    if jax.default_backend() != "gpu":
        return f"{xla}: the default backend is {jax.default_backend()}"
    reason = cuda.unsupported_reason(x, opts)
    return f"{xla}: {reason}" if reason else "cuda (jax_kda CUTLASS kernels, sm_90a)"


def _normalize(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
    allow_neg_eigval=False, safe_gate=False, lower_bound=None, A_log=None, dt_bias=None,
    state_v_first=False, cu_seqlens=None, final_state_dtype=None, impl="auto",
):
    """Checks every argument and splits the call into its arrays and its static options."""
    gate = check_options(
        use_gate_in_kernel=use_gate_in_kernel, lower_bound=lower_bound, safe_gate=safe_gate, A_log=A_log,
        dt_bias=dt_bias, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, scale=scale, impl=impl, final_state_dtype=final_state_dtype,
    )
    as_array = lambda a: a if a is None or hasattr(a, "shape") and hasattr(a, "dtype") else jnp.asarray(a)
    q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens = map(
        as_array, (q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
    )
    if dt_bias is not None and len(dt_bias.shape) == 1 and len(v.shape) == 4 and len(q.shape) == 4:
        if dt_bias.shape[0] == v.shape[2] * q.shape[3]:  # FLA's flat [HV * K]
            dt_bias = dt_bias.reshape(v.shape[2], q.shape[3])
    x = KDAOperands(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
    check_operands(x, state_v_first=state_v_first)
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, q.shape[1])
        if cu_seqlens.dtype != jnp.int32:
            x = x._replace(cu_seqlens=cu_seqlens.astype(jnp.int32))

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


def _no_tokens(x: KDAOperands, opts: KDAOptions):
    o = jnp.zeros(x.v.shape, x.q.dtype)
    if not opts.output_final_state:
        return o, None
    return o, finish_state(initial_state_kv(x, opts), opts)  # the state passes through unchanged


@functools.lru_cache(maxsize=None)
def _differentiable(present: tuple[bool, ...], opts: KDAOptions):
    """The primitive under a `custom_vjp` whose backward differentiates the chunked XLA path."""
    fields = [f for f, p in zip(KDAOperands._fields, present) if p]
    differentiable = [f != "cu_seqlens" for f in fields]

    @jax.custom_vjp
    def prefill(*args):
        return tuple(kda_prefill_bind(KDAOperands.unflatten(present, args), opts))

    def fwd(*args):
        return prefill(*args), args

    def bwd(args, cotangents):
        def forward(*diff_args):
            it = iter(diff_args)
            full = [next(it) if d else a for a, d in zip(args, differentiable)]
            return xla_forward(*full, present=present, opts=opts)

        _, vjp = jax.vjp(forward, *(a for a, d in zip(args, differentiable) if d))
        grads = iter(vjp(list(cotangents)))
        return tuple(next(grads) if d else None for d in differentiable)

    prefill.defvjp(fwd, bwd)
    return prefill
