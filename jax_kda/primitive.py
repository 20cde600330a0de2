"""The KDA prefill primitives, and every rule they have, registered in one place (the end of this module).

As in TransformerEngine's JAX primitives there are two. The outer `kda_prefill` is what the API
binds: it has an eager implementation, abstract evaluation and a batching rule, and lowers through
`custom_partitioning` with a Shardy rule (`jax_kda.sharding`), which splits it over a mesh. The inner
`kda_prefill_inner` is the per-device computation: its lowering asks `jax_kda.paths.choose_path` for the
platform it lowers for, and emits the CUDA kernels (`jax_kda.cuda`: one FFI custom call, or a call cut
into segments and joined by a correction kernel), the chunked pure-JAX path or the token scan.
The decode step (`jax_kda.decode`) binds the same two with `opts.decode_step`: one token per sequence,
lowered to the decode kernel (an FFI custom call) or one pure-JAX token step.

Operands cross both as the present fields of `KDAOperands` (the `present` parameter says which);
`opts` carries everything static. Results are `[o]`, or `[o, final_state]` when
`opts.output_final_state`; with `opts.transition_columns` their V axis is V + K (`jax_kda.segments`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import contract, cuda, paths, sharding
from .chunked import CHUNK, kda_chunked
from .options import KDAOperands, KDAOptions
from .reference import kda_reference, kda_token_step
from .validation import check_operands

kda_prefill_p = Primitive("kda_prefill")
kda_prefill_p.multiple_results = True
kda_prefill_inner_p = Primitive("kda_prefill_inner")
kda_prefill_inner_p.multiple_results = True


def kda_prefill_bind(x: KDAOperands, opts: KDAOptions) -> list[jax.Array]:
    return kda_prefill_p.bind(*x.flatten(), present=x.present(), opts=opts)


def kda_prefill_inner_bind(x: KDAOperands, opts: KDAOptions) -> list[jax.Array]:
    return kda_prefill_inner_p.bind(*x.flatten(), present=x.present(), opts=opts)


def kda_prefill_inner_run(x: KDAOperands, opts: KDAOptions):
    """The inner primitive as `(o, final_state or None)`."""
    results = kda_prefill_inner_bind(x, opts)
    return results[0], (results[1] if opts.output_final_state else None)


def result_shapes(x: KDAOperands, opts: KDAOptions) -> list[jax.ShapeDtypeStruct]:
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    if opts.transition_columns:
        vd += kd
    out = [jax.ShapeDtypeStruct((b, t, hv, vd), x.q.dtype)]
    if opts.output_final_state:
        state = (vd, kd) if opts.state_v_first else (kd, vd)
        out.append(jax.ShapeDtypeStruct((x.num_sequences, hv, *state), jnp.dtype(opts.final_state_dtype)))
    return out


def _abstract_eval(*avals, present, opts):
    x = KDAOperands.unflatten(present, avals)
    check_operands(x, state_v_first=opts.state_v_first)
    if opts.transition_columns and x.initial_state is not None:
        raise ValueError("transition columns start from a zero state: initial_state must be None")
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in result_shapes(x, opts)]


def xla_forward(*args, present, opts, chunk=CHUNK):
    """The chunked pure-JAX path on flat operands, returning flat results."""
    o, final = kda_chunked(KDAOperands.unflatten(present, args), opts, chunk)
    return [o] if final is None else [o, final]


def scan_forward(*args, present, opts):
    """The token-by-token scan on flat operands, returning flat results."""
    o, final = kda_reference(KDAOperands.unflatten(present, args), opts)
    return [o] if final is None else [o, final]


def step_forward(*args, present, opts):
    """The decode step's XLA path (one token step) on flat operands, returning flat results."""
    return list(kda_token_step(KDAOperands.unflatten(present, args), opts))


@functools.lru_cache(maxsize=None)
def _compiled(present, opts):
    return jax.jit(functools.partial(kda_prefill_p.bind, present=present, opts=opts))


def _eager(*args, present, opts):
    return _compiled(present, opts)(*args)


# ---------------------------------------------------------------------------------------------
# Batching: a vmapped axis folds into an axis the primitive already has, so one call serves all.
#   - per-head parameters (A_log, dt_bias) batched: fold into the head axes;
#   - packed sequences (cu_seqlens): fold into T, with the boundaries of each copy shifted;
#   - otherwise: fold into the batch axis B.

NOT_MAPPED = None  # how JAX marks an operand that vmap does not map


def _moved(arr, dim, size):
    """`arr` with its batch dimension first, broadcast when it has none."""
    if dim is NOT_MAPPED:
        return jnp.broadcast_to(arr, (size,) + arr.shape)
    return jnp.moveaxis(arr, dim, 0)


def _merge(arr, axis):
    """`[n, ..., d_axis, ...]` to `[..., n * d_axis, ...]`: batch axis 0 merged into `axis` (>= 1)."""
    arr = jnp.moveaxis(arr, 0, axis - 1)
    shape = arr.shape
    return arr.reshape(shape[: axis - 1] + (shape[axis - 1] * shape[axis],) + shape[axis + 1 :])


def _split(arr, axis, size):
    """Inverse of `_merge`: `[..., size * d, ...]` at `axis - 1` to `[size, ..., d, ...]`."""
    shape = arr.shape
    arr = arr.reshape(shape[: axis - 1] + (size, shape[axis - 1] // size) + shape[axis:])
    return jnp.moveaxis(arr, axis - 1, 0)


def _batch(args, dims, *, present, opts):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not NOT_MAPPED)
    x = KDAOperands.unflatten(present, args)
    xd = KDAOperands.unflatten(present, dims)
    mapped = lambda f: getattr(x, f) is not None and getattr(xd, f) is not NOT_MAPPED
    move = lambda f: _moved(getattr(x, f), getattr(xd, f), size)
    token_fields = ("q", "k", "v", "g", "beta")

    heads_fold = mapped("A_log") or mapped("dt_bias")
    if heads_fold and mapped("cu_seqlens"):
        # Different boundaries and different head parameters per lane: no single call holds both.
        return _batch_by_map(args, dims, present=present, opts=opts, size=size), [0] * len(
            result_shapes(x, opts)
        )

    if heads_fold:
        new = {f: _merge(move(f), 3) for f in token_fields}  # [B, T, n*H(V), ...]
        new["A_log"] = None if x.A_log is None else _merge(move("A_log"), 1)
        new["dt_bias"] = None if x.dt_bias is None else _merge(move("dt_bias"), 1)
        state_axis, out_axis = 2, 3
        if x.cu_seqlens is not None:
            new["cu_seqlens"] = x.cu_seqlens
    elif x.cu_seqlens is not None:
        moved = {f: move(f) for f in token_fields}
        t = moved["q"].shape[2]
        new = {f: _merge(a, 2) for f, a in moved.items()}  # [1, n*T, ...]
        cu = move("cu_seqlens")
        shifted = cu[:, :-1] + (jnp.arange(size, dtype=cu.dtype) * t)[:, None]
        new["cu_seqlens"] = jnp.concatenate([shifted.reshape(-1), jnp.array([size * t], cu.dtype)])
        state_axis, out_axis = 1, 2
    else:
        new = {f: _merge(move(f), 1) for f in token_fields}  # [n*B, ...]
        state_axis, out_axis = 1, 1
    if not heads_fold:
        new["A_log"], new["dt_bias"] = x.A_log, x.dt_bias
    if x.initial_state is not None:
        new["initial_state"] = _merge(move("initial_state"), state_axis)

    folded = KDAOperands(**{f: new.get(f) for f in KDAOperands._fields})
    results = kda_prefill_bind(folded, opts)
    outs = [_split(results[0], out_axis, size)]
    if opts.output_final_state:
        outs.append(_split(results[1], state_axis, size))
    return outs, [0] * len(outs)


def _batch_by_map(args, dims, *, present, opts, size):
    moved = [_moved(a, d, size) for a, d in zip(args, dims)]
    return jax.lax.map(lambda xs: kda_prefill_p.bind(*xs, present=present, opts=opts), moved)


# ---------------------------------------------------------------------------------------------
# Lowerings


def _lower_outer(ctx, *args, present, opts):
    # A computation on one device (or not yet placed) has nothing to partition.
    axis_context = ctx.module_context.axis_context
    devices = getattr(axis_context, "device_assignment", ())
    if devices is None or (devices != () and len(devices) <= 1):
        inner = lambda *a: kda_prefill_inner_bind(KDAOperands.unflatten(present, a), opts)
        return mlir.lower_fun(inner, multiple_results=True)(ctx, *args)
    prefill = sharding.partitioned(present, opts, kda_prefill_inner_bind, kda_prefill_inner_run)
    return mlir.lower_fun(prefill, multiple_results=True)(ctx, *args)


def _lower_inner(ctx, *args, present, opts, platform=None):
    """The per-device prefill on `platform` (for the default rule: the one platform lowered for)."""
    if platform is None:
        platform = ctx.module_context.platforms[0]
    path = paths.choose_path(KDAOperands.unflatten(present, ctx.avals_in), opts, platform)
    if path.impl == paths.CUDA and path.pieces > 1:
        return cuda.lower_segmented(ctx, *args, present=present, opts=opts, pieces=path.pieces,
                                    run=kda_prefill_inner_run)
    if path.impl == paths.CUDA:
        return cuda.lower_prefill_ffi(ctx, *args, present=present, opts=opts, two_pass=path.two_pass)
    if path.impl == paths.DECODE_KERNEL:
        return cuda.lower_decode_ffi(ctx, *args, present=present, opts=opts)
    if path.fallback:
        cuda.warn_fallback(path.reason)
    forward = {paths.SCAN: scan_forward, paths.XLA: functools.partial(xla_forward, chunk=path.chunk),
               paths.TOKEN_STEP: step_forward}[path.impl]
    return mlir.lower_fun(functools.partial(forward, present=present, opts=opts), multiple_results=True)(ctx, *args)


# ---------------------------------------------------------------------------------------------
# Registration: every rule of both primitives.

kda_prefill_p.def_impl(_eager)
kda_prefill_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[kda_prefill_p] = _batch
mlir.register_lowering(kda_prefill_p, _lower_outer)
# custom_partitioning needs the device assignment when lowering; JAX's cuDNN attention (also under
# custom_partitioning) registers its primitives the same way.
dispatch.prim_requires_devices_during_lowering.add(kda_prefill_p)

kda_prefill_inner_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(kda_prefill_inner_p, _lower_inner)
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(kda_prefill_inner_p, functools.partial(_lower_inner, platform=_platform),
                           platform=_platform)
for _target, _capsule in contract.cuda_registrations().items():
    jax.ffi.register_ffi_target(_target, _capsule, platform="CUDA")
