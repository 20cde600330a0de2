"""The CUDA path's lowering helpers: the prefill as an XLA FFI custom call, a call cut into segments,
the segment correction kernel, and the decode step's kernel. They register nothing (`jax_kda.primitive`
owns every rule).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from . import contract, paths, segments
from .options import KDAOperands, KDAOptions


def _preprocessing_attributes(x: KDAOperands, opts: KDAOptions) -> dict:
    """The FFI attributes the prefill and decode kernels share: scale, gate, L2 norm, beta, layout."""
    return dict(
        scale=np.float32(opts.scale),
        gate=np.int32(contract.GATE_CODES[opts.gate]),
        lower_bound=np.float32(opts.lower_bound or 0.0),
        l2norm=opts.use_qk_l2norm,
        beta_sigmoid=opts.use_beta_sigmoid,
        allow_neg_eigval=opts.allow_neg_eigval,
        state_v_first=opts.state_v_first,
        has_A_log=x.A_log is not None,
        has_dt_bias=x.dt_bias is not None,
    )


def lower_prefill_ffi(ctx, *args, present, opts: KDAOptions, two_pass: bool = False):
    """The prefill kernel as one custom call on the operands `args` (the present fields of KDAOperands):
    the chunk-16 kernel, or the two-pass kernel with its workspace (a result XLA assigns with the others,
    dropped after the call)."""
    x = KDAOperands.unflatten(present, ctx.avals_in)
    # Absent optional operands travel as empty arrays; so does the final state when not asked for.
    values = iter(args)
    operands, avals_in = [], []
    for field, aval in zip(KDAOperands._fields, x):
        if aval is None:
            dtype = np.int32 if field == "cu_seqlens" else np.float32
            operands.append(mlir.ir_constant(np.zeros((0,), dtype)))
            avals_in.append(jax.core.ShapedArray((0,), dtype))
        else:
            operands.append(next(values))
            avals_in.append(aval)
    avals_out = list(ctx.avals_out)
    if not opts.output_final_state:
        avals_out.append(jax.core.ShapedArray((0,), np.float32))
    workspace, serial = 0, False
    if two_pass:
        _, t, hv, _ = x.v.shape
        carried = 0 if opts.output_final_state else ctx.avals_out[0].shape[3]  # o's columns: V, or V + K
        state_ctas = paths.two_pass_state_ctas(x.num_sequences * hv, opts.transition_columns)
        serial = contract.two_pass_serial(state_ctas, paths.multiprocessors())
        workspace = contract.two_pass_layout(x.num_sequences, t, hv, x.cu_seqlens is not None, carried, serial)["bytes"]
    avals_out.append(jax.core.ShapedArray((workspace,), np.uint8))

    rule = jax.ffi.ffi_lowering(contract.PREFILL_TARGET)
    results = rule(
        ctx.replace(avals_in=avals_in, avals_out=avals_out),
        *operands,
        **_preprocessing_attributes(x, opts),
        has_initial_state=x.initial_state is not None,
        has_cu_seqlens=x.cu_seqlens is not None,
        write_final_state=opts.output_final_state,
        transition_columns=opts.transition_columns,
        two_pass=two_pass,
        two_pass_serial=serial,
    )
    return results[: len(ctx.avals_out)]


def lower_decode_ffi(ctx, *args, present, opts: KDAOptions):
    """The decode kernel as one custom call on the operands `args` (the present fields of KDAOperands,
    one token per sequence: `[N, 1, ...]`); the kernel takes them without the token axis.

    The new state is written over the state (an input-output alias): in place when the state is
    donated or carried through a loop, else after XLA's copy of it."""

    def step(*flat):
        x = KDAOperands.unflatten(present, flat)
        token = lambda a: a[:, 0]
        # Absent parameters travel as empty arrays; present ones as the float32 the kernel reads.
        f32_or_empty = lambda a: jnp.zeros((0,), jnp.float32) if a is None else a.astype(jnp.float32)
        n, _, hv, vd = x.v.shape
        results = (jax.ShapeDtypeStruct((n, hv, vd), x.q.dtype),
                   jax.ShapeDtypeStruct(x.initial_state.shape, x.initial_state.dtype))
        operands = (token(x.q), token(x.k), token(x.v), token(x.g), token(x.beta), f32_or_empty(x.A_log),
                    f32_or_empty(x.dt_bias), x.initial_state)
        in_place = {len(operands) - 1: 1}  # the state becomes the second result
        o, state = jax.ffi.ffi_call(contract.DECODE_TARGET, results, input_output_aliases=in_place)(
            *operands, **_preprocessing_attributes(x, opts))
        return [o[:, None], state]

    return mlir.lower_fun(step, multiple_results=True)(ctx, *args)


def lower_segmented(ctx, *args, present, opts: KDAOptions, pieces: int, run):
    """Every sequence cut into `pieces` segments (packed sequences: every T / `pieces` tokens) run in
    one launch through `run(x, opts)` (the inner primitive; the segments' `cu_seqlens` keep them from
    being cut again), joined by the correction."""

    def split(*flat):
        x = KDAOperands.unflatten(present, flat)
        if x.cu_seqlens is None:
            o, final = segments.split_prefill(x, opts, run, pieces, correct_segments)
        else:
            o, final = segments.split_packed_prefill_where_long(x, opts, run, pieces, paths.WORTH_IT,
                                                                correct_packed_segments)
        return [o] if final is None else [o, final]

    return mlir.lower_fun(split, multiple_results=True)(ctx, *args)


def kernel_corrects(o_aug_dtype, head_dim_k: int, head_dim_v: int) -> bool:
    """Whether the correction kernel takes these outputs (bf16, sizes it takes)."""
    return o_aug_dtype == jnp.bfloat16 and contract.correct_unsupported(head_dim_k, head_dim_v) is None


def correct_segments(o_aug: jax.Array, entries: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
    """`segments.correct_xla` as one memory-bound kernel where it takes the call."""
    b, t, hv, width = o_aug.shape
    vd = entries.shape[-1]
    if not kernel_corrects(o_aug.dtype, width - vd, vd):
        return segments.correct_xla(o_aug, entries, bounds)
    flat = entries.reshape((b * (len(bounds) - 1),) + entries.shape[2:])
    return _correct_on_the_kernel(o_aug, flat, jnp.asarray(segments.packed_bounds(bounds, b, t)))


def correct_packed_segments(o_aug: jax.Array, entries: jax.Array, cu: jax.Array) -> jax.Array:
    """`segments.correct_packed_xla` as one memory-bound kernel: o_aug `[B, T, HV, V + K]` bf16, entries
    `[S, HV, K, V]` float32, the segments' bounds `cu` `[S + 1]` over the B x T tokens."""
    vd = entries.shape[-1]
    if not kernel_corrects(o_aug.dtype, o_aug.shape[3] - vd, vd):
        return segments.correct_packed_xla(o_aug, entries, cu)
    return _correct_on_the_kernel(o_aug, entries, cu)


def _correct_on_the_kernel(o_aug: jax.Array, entries: jax.Array, cu: jax.Array) -> jax.Array:
    """The correction kernel on a call `kernel_corrects` takes (shapes as `correct_packed_segments`)."""
    b, t, hv, _ = o_aug.shape
    vd = entries.shape[-1]
    # The entering states V-first as an exact bf16 pair, hi + lo.
    state = jnp.swapaxes(entries, -1, -2)
    hi = state.astype(jnp.bfloat16)
    lo = (state - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    call = jax.ffi.ffi_call(contract.SEGMENT_CORRECT_TARGET, jax.ShapeDtypeStruct((b, t, hv, vd), o_aug.dtype),
                            vmap_method="sequential")
    return call(o_aug, hi, lo, cu.astype(jnp.int32))


@functools.lru_cache(maxsize=None)
def warn_fallback(reason: str) -> None:
    """Once per reason: a GPU call that takes the XLA path instead of the kernels."""
    warnings.warn(f"jax_kda: running the XLA path instead of the CUDA kernels: {reason}", stacklevel=2)
