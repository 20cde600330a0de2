"""`kda_prefill`: FLA's `chunk_kda` contract (docs/CONTRACT.md) as a JAX function, and `prefill_path`."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp

from . import paths, sharding
from .activations import finish_state, initial_state_kv
from .call import build_call
from .options import KDAOperands, KDAOptions
from .primitive import kda_prefill_bind, xla_forward
from .reference import kda_reference


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

    Returns `(o [B, T, HV, V] in q's dtype, final_state or None)`. Differentiable in reverse mode
    (`jax.grad`); forward mode (`jax.jvp`) is not supported.
    """
    x, opts = build_call(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        safe_gate=safe_gate, lower_bound=lower_bound, A_log=A_log, dt_bias=dt_bias, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, final_state_dtype=final_state_dtype, impl=impl,
    )
    if x.q.shape[0] == 0 or x.q.shape[1] == 0:
        return _no_tokens(x, opts)
    run = kda_reference if opts.impl == "reference" else _run_primitive
    if axis_name is not None:
        return sharding.context_parallel(x, opts, axis_name, run, paths.default_platform())
    mesh = sharding.explicit_mesh_of(x)
    if mesh is not None:
        return sharding.explicit_mesh_prefill(x, opts, mesh, run)
    return run(x, opts)


def _run_primitive(x: KDAOperands, opts: KDAOptions):
    results = _differentiable(x.present(), opts)(*x.flatten())
    return results[0], (results[1] if opts.output_final_state else None)


_PREFILL_SIGNATURE = inspect.signature(kda_prefill)


def prefill_call(q, k, v, g, beta, **kwargs) -> tuple[KDAOperands, KDAOptions]:
    """The operands and options of `kda_prefill(q, k, v, g, beta, **kwargs)` (`axis_name` aside)."""
    bound = _PREFILL_SIGNATURE.bind(q, k, v, g, beta, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["axis_name"]
    return build_call(**arguments)


def prefill_path(q, k, v, g, beta, **kwargs) -> str:
    """Which implementation `kda_prefill` with these arguments runs, and why: the kernels (and whether
    each sequence is cut into segments), the chunked XLA path or the token scan, and context
    parallelism when T is split over devices.

    Takes the arguments of `kda_prefill` (arrays or `jax.ShapeDtypeStruct`s, sharded or not) and
    answers for the platform of q's devices (the default backend for abstract values)."""
    x, opts = prefill_call(q, k, v, g, beta, **kwargs)
    platform = _platform_of(x.q)
    devices = sharding.token_split(x)
    axis_name = kwargs.get("axis_name")
    if axis_name is not None or devices > 1:
        split = f"T split over {devices} devices" if devices > 1 else f"T split over mesh axis {axis_name!r}"
        cp_opts = dataclasses.replace(opts, transition_columns=True)
        return f"context parallel ({split}), each segment on {paths.choose_path(x, cp_opts, platform).describe()}"
    return paths.choose_path(x, opts, platform).describe()


def _platform_of(a) -> str:
    device_set = getattr(getattr(a, "sharding", None), "device_set", None)
    return paths.platform_of(next(iter(device_set))) if device_set else paths.default_platform()


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
