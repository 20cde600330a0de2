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

from .options import GATE_BOUNDED, GATE_GIVEN, GATE_SOFTPLUS, KDAOperands, KDAOptions
from .primitive import kda_prefill_inner_p, lower_xla

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
    )
    return results[: len(ctx.avals_out)]


if available():
    for _name, _capsule in _kda_ext.cuda_registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
# Registered without the kernels too, so that a GPU run says why it takes the XLA path.
mlir.register_lowering(kda_prefill_inner_p, _lower_cuda, platform="cuda")
