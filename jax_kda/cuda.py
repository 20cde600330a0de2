"""The CUDA path: registers jax_kda's FFI kernels with XLA and lowers the primitive to them.

Imported by the package. For `impl="auto"` a call the kernels cannot take (or any call, when the
extension was built without CUDA) lowers to the chunked XLA path with a one-time warning that says
why; for `impl="cuda"` it is an error.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from . import segments
from .options import GATE_BOUNDED, GATE_GIVEN, GATE_SOFTPLUS, KDAOperands, KDAOptions
from .primitive import kda_prefill_inner_p, kda_prefill_inner_run, lower_xla


def _load_extension():
    """The compiled extension: beside this file when installed; when the package is imported from a
    source checkout (`python -m jax_kda` in the repository), the copy that `pip install .` built."""
    try:
        from . import _kda_ext

        return _kda_ext
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), "jax_kda")
        if os.path.abspath(folder) == here or not os.path.isdir(folder):
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_kda_ext" + suffix)
            if os.path.exists(path):
                spec = importlib.util.spec_from_file_location(f"{__package__}._kda_ext", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
    return None


_kda_ext = _load_extension()

PREFILL_TARGET = "jax_kda_prefill_cuda"
SEGMENT_CORRECT_TARGET = "jax_kda_segment_correct_cuda"
_GATE_CODES = {GATE_GIVEN: 0, GATE_SOFTPLUS: 1, GATE_BOUNDED: 2}
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)


def available() -> bool:
    """True when the extension carries the CUDA kernels."""
    return _kda_ext is not None and bool(_kda_ext.with_cuda)


def unsupported_reason(x: KDAOperands, opts: KDAOptions) -> str | None:
    """Why the kernels cannot run this call (shapes and dtypes may be avals), or None if they can."""
    if not available():
        return "jax_kda was built without its CUDA kernels (JAX_KDA_CUDA=0 or no nvcc at build time)"
    kd, vd = x.q.shape[3], x.v.shape[3]
    if kd not in (64, 128):
        return f"the kernels take K = 64 or 128, got K = {kd}"
    if vd % 64 or not 64 <= vd <= 512:
        return f"the kernels take V = 64, 128, ..., 512, got V = {vd}"
    if opts.transition_columns and vd + kd > 512:
        return f"the kernels take V + K <= 512 with transition columns, got {vd} + {kd}"
    if x.q.dtype != jnp.bfloat16:
        return f"the kernels take bfloat16 q, k, v, got {x.q.dtype}"
    for name in ("g", "beta", "initial_state"):
        arr = getattr(x, name)
        if arr is not None and arr.dtype not in _KERNEL_DTYPES:
            return f"the kernels take {name} in bfloat16 or float32, got {arr.dtype}"
    if jnp.dtype(opts.final_state_dtype) not in _KERNEL_DTYPES:
        return f"the kernels write the final state in float32 or bfloat16, not {opts.final_state_dtype}"
    sms = _local_gpu_compute_capabilities()
    if sms and not all(cc.startswith("9.") for cc in sms):
        return f"the kernels need Hopper (compute capability 9.x), found {', '.join(sorted(set(sms)))}"
    return None


@functools.lru_cache(maxsize=None)
def _local_gpu_compute_capabilities() -> tuple[str, ...]:
    """Compute capabilities of this process's GPUs; empty when it has none (lowering ahead of time)."""
    try:
        return tuple(str(d.compute_capability) for d in jax.devices("gpu"))
    except RuntimeError:
        return ()


def kernels_take(x: KDAOperands, opts: KDAOptions) -> bool:
    """Whether a call traced now for the default backend runs on the kernels."""
    return opts.impl in ("auto", "cuda") and jax.default_backend() == "gpu" and unsupported_reason(x, opts) is None


# Cutting sequences into segments (jax_kda.segments) when few (sequence, head) chains leave most
# multiprocessors idle. The kernels run one chain per CTA, one CTA per multiprocessor, at about this
# much time per 16-token chunk on an H100 (docs/PERFLOG.md); the cut costs its transition columns
# (V + K columns instead of V) and a correction pass over o (`correct_segments`).
_CHUNK = 16
_CHUNK_SECONDS = 2.3e-6
_BANDWIDTH = 3.0e12  # bytes / s
_MAX_PIECES = 4  # each cut adds rounding to the joined state; past 4 the gains are small
_MIN_PIECE_TOKENS = 256
_WORTH_IT = 0.8  # a cut must promise at least 20% less time than the next best choice


def _kernel_ctas(sequences: int, value_heads: int, width: int, multiprocessors: int) -> int:
    """CTAs of one launch over `width` value columns, sliced as `choose_v_slices` in csrc does."""
    v_slice = 128 if width % 128 == 0 else 64
    if v_slice == 128 and sequences * value_heads * (width // 128) * 2 <= multiprocessors:
        v_slice = 64
    return sequences * value_heads * (width // v_slice)


def _kernel_seconds(sequences, tokens, value_heads, width, multiprocessors) -> float:
    waves = -(-_kernel_ctas(sequences, value_heads, width, multiprocessors) // multiprocessors)
    return waves * -(-tokens // _CHUNK) * _CHUNK_SECONDS


def sequence_pieces(x: KDAOperands, opts: KDAOptions) -> int:
    """Into how many segments the kernels' path cuts each sequence of this call (1: none).

    With `opts.transition_columns` the call already pays for them (context parallelism), so only the
    kernel time counts."""
    if x.cu_seqlens is not None:
        return 1
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    width = vd + kd
    if width > 512:
        return 1
    sms = _multiprocessors()
    best, best_s = 1, _kernel_seconds(b, t, hv, width if opts.transition_columns else vd, sms)
    correction_s = 0.0 if opts.transition_columns else b * t * hv * (width + vd) * 2 / _BANDWIDTH
    for pieces in range(2, _MAX_PIECES + 1):
        if t < pieces * _MIN_PIECE_TOKENS:
            break
        seconds = _kernel_seconds(b * pieces, -(-t // pieces), hv, width, sms) + correction_s
        if seconds < _WORTH_IT * best_s:
            best, best_s = pieces, seconds
    return best


def correct_segments(o_aug: jax.Array, entries: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
    """`segments.correct_xla` as one memory-bound kernel (bf16 outputs, K = 64 or 128, V % 64 == 0)."""
    b, t, hv, width = o_aug.shape
    vd = entries.shape[-1]
    if o_aug.dtype != jnp.bfloat16 or width - vd not in (64, 128) or vd % 64:
        return segments.correct_xla(o_aug, entries, bounds)
    # The entering states V-first as an exact bf16 pair, hi + lo.
    state = jnp.swapaxes(entries, -1, -2).reshape(b * (len(bounds) - 1), hv, vd, width - vd)
    hi = state.astype(jnp.bfloat16)
    lo = (state - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    cu = jnp.asarray(segments.packed_bounds(bounds, b, t))
    call = jax.ffi.ffi_call(SEGMENT_CORRECT_TARGET, jax.ShapeDtypeStruct((b, t, hv, vd), o_aug.dtype),
                            vmap_method="sequential")
    return call(o_aug, hi, lo, cu)


@functools.lru_cache(maxsize=None)
def _multiprocessors() -> int:
    """Multiprocessors of this process's first GPU (an H100's 132 when lowering without one)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", 0) or 132)
    except RuntimeError:
        return 132


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"jax_kda: running the XLA path instead of the CUDA kernels: {reason}", stacklevel=2)


def _lower_cuda(ctx, *args, present, opts):
    x = KDAOperands.unflatten(present, ctx.avals_in)
    reason = None if opts.impl == "xla" else unsupported_reason(x, opts)
    if opts.impl == "xla" or reason is not None:
        if opts.impl == "cuda":
            raise ValueError(f"impl='cuda' cannot run this call: {reason}")
        if reason is not None:
            _warn_once(reason)
        return lower_xla(ctx, *args, present=present, opts=opts)
    pieces = 1 if opts.transition_columns else sequence_pieces(x, opts)
    if pieces > 1:  # one launch over the segments of every sequence (their cu_seqlens end the recursion)

        def split(*flat):
            x = KDAOperands.unflatten(present, flat)
            o, final = segments.split_prefill(x, opts, kda_prefill_inner_run, pieces, correct_segments)
            return [o] if final is None else [o, final]

        return mlir.lower_fun(split, multiple_results=True)(ctx, *args)

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

    rule = jax.ffi.ffi_lowering(PREFILL_TARGET)
    results = rule(
        ctx.replace(avals_in=avals_in, avals_out=avals_out),
        *operands,
        scale=np.float32(opts.scale),
        gate=np.int32(_GATE_CODES[opts.gate]),
        lower_bound=np.float32(opts.lower_bound or 0.0),
        l2norm=opts.use_qk_l2norm,
        beta_sigmoid=opts.use_beta_sigmoid,
        allow_neg_eigval=opts.allow_neg_eigval,
        state_v_first=opts.state_v_first,
        has_A_log=x.A_log is not None,
        has_dt_bias=x.dt_bias is not None,
        has_initial_state=x.initial_state is not None,
        has_cu_seqlens=x.cu_seqlens is not None,
        write_final_state=opts.output_final_state,
        transition_columns=opts.transition_columns,
    )
    return results[: len(ctx.avals_out)]


if available():
    for _name, _capsule in _kda_ext.cuda_registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
# Registered without the kernels too, so that a GPU run says why it takes the XLA path.
mlir.register_lowering(kda_prefill_inner_p, _lower_cuda, platform="cuda")
