"""Checks of a KDA call: clear `ValueError`/`TypeError`s that name the argument and the expected shape.

`check_operands` looks only at shapes and dtypes, so it serves both the public function and the
primitive's abstract evaluation; `check_options` and `check_cu_seqlens` are the caller-side checks of
flags and of sequence boundaries, and `int32_cu_seqlens` the one cast (`jax_kda.call` runs them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .options import GATE_BOUNDED, GATE_GIVEN, GATE_SOFTPLUS, IMPLS, KDAOperands

STATE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
QKV_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _shape(x):
    return tuple(x.shape)


def _need_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _need_shape(name, x, expected, layout):
    if _shape(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {_shape(x)}")


def check_operands(x: KDAOperands, *, state_v_first: bool) -> None:
    """Ranks, shapes and dtypes of every present operand (the contract's table)."""
    for name, rank, layout in (
        ("q", 4, "[B, T, H, K]"),
        ("k", 4, "[B, T, H, K]"),
        ("v", 4, "[B, T, HV, V]"),
        ("g", 4, "[B, T, HV, K]"),
        ("beta", 3, "[B, T, HV]"),
    ):
        arr = getattr(x, name)
        if len(_shape(arr)) != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {_shape(arr)}")
    if x.q.dtype not in QKV_DTYPES:
        raise TypeError(f"q must be bfloat16, float16 or float32, got {x.q.dtype}")
    for name in ("k", "v"):
        if getattr(x, name).dtype != x.q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({x.q.dtype}), got {getattr(x, name).dtype}")
    for name in ("g", "beta"):
        _need_float(name, getattr(x, name))

    b, t, h, kd = _shape(x.q)
    _need_shape("k", x.k, (b, t, h, kd), "[B, T, H, K] (the shape of q)")
    hv, vd = _shape(x.v)[2], _shape(x.v)[3]
    _need_shape("v", x.v, (b, t, hv, vd), "[B, T, HV, V] (B, T of q)")
    if h == 0 or hv % h != 0:
        raise ValueError(
            f"v has HV = {hv} value heads, which must be a positive multiple of the H = {h} heads of q and k"
        )
    if kd == 0 or vd == 0:
        raise ValueError(f"head sizes must be positive, got K = {kd} (q, k) and V = {vd} (v)")
    _need_shape("g", x.g, (b, t, hv, kd), "[B, T, HV, K]")
    _need_shape("beta", x.beta, (b, t, hv), "[B, T, HV]")

    if x.A_log is not None:
        _need_float("A_log", x.A_log)
        _need_shape("A_log", x.A_log, (hv,), "[HV]")
    if x.dt_bias is not None:
        _need_float("dt_bias", x.dt_bias)
        _need_shape("dt_bias", x.dt_bias, (hv, kd), "[HV, K]")

    if x.cu_seqlens is not None:
        cu = x.cu_seqlens
        if cu.dtype != jnp.int32:  # int32_cu_seqlens casts at the edge; nothing after it casts again
            raise TypeError(f"cu_seqlens must be int32 past the public functions, got {cu.dtype}")
        if len(_shape(cu)) != 1 or cu.shape[0] < 1:
            raise ValueError(f"cu_seqlens must have shape [N + 1], got {_shape(cu)}")
        if b != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and requires B == 1, got B = {b}")
        if t > 0 and cu.shape[0] < 2:
            raise ValueError("cu_seqlens must hold at least two boundaries [0, ..., T] when T > 0")
    n = x.num_sequences

    if x.initial_state is not None:
        s = x.initial_state
        if s.dtype not in STATE_DTYPES:
            raise TypeError(f"initial_state must be float32, bfloat16 or float16, got {s.dtype}")
        if state_v_first:
            _need_shape("initial_state", s, (n, hv, vd, kd), "[N, HV, V, K] (state_v_first=True)")
        else:
            _need_shape("initial_state", s, (n, hv, kd, vd), "[N, HV, K, V]")


def check_options(
    *, use_gate_in_kernel, lower_bound, safe_gate, A_log, dt_bias, use_beta_sigmoid_in_kernel,
    allow_neg_eigval, scale, impl, final_state_dtype,
) -> str:
    """Validates the flag combination and returns the gate mode (options.GATE_*)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if scale is not None and not (isinstance(scale, (int, float, np.floating, np.integer)) and math.isfinite(scale)):
        raise TypeError(f"scale must be a finite Python number (it is static), got {scale!r}")
    if final_state_dtype is not None and jnp.dtype(final_state_dtype) not in STATE_DTYPES:
        raise TypeError(f"final_state_dtype must be float32, bfloat16 or float16, got {final_state_dtype}")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True scales the in-kernel beta sigmoid; it needs use_beta_sigmoid_in_kernel=True")
    if lower_bound is not None and not (
        isinstance(lower_bound, (int, float, np.floating, np.integer)) and math.isfinite(lower_bound) and lower_bound < 0
    ):
        raise ValueError(f"lower_bound must be a negative finite number, got {lower_bound!r}")

    if not use_gate_in_kernel:
        for name, value in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if value is not None:
                raise ValueError(f"{name} is only used by the fused gate; pass use_gate_in_kernel=True or drop {name}")
        if safe_gate:
            raise ValueError("safe_gate=True applies to the fused gate; it needs use_gate_in_kernel=True")
        return GATE_GIVEN
    if safe_gate and (lower_bound is None or not -5.0 <= lower_bound < 0.0):
        raise ValueError(f"safe_gate=True requires lower_bound in [-5, 0), got {lower_bound!r}")
    if lower_bound is None:
        if A_log is None:
            raise ValueError("the softplus gate (use_gate_in_kernel=True, lower_bound=None) needs A_log of shape [HV]")
        return GATE_SOFTPLUS
    return GATE_BOUNDED


def int32_cu_seqlens(cu_seqlens, num_tokens: int):
    """cu_seqlens (an array, tracer or `jax.ShapeDtypeStruct` of integers) as int32: the one cast."""
    cu = cu_seqlens
    if not jnp.issubdtype(cu.dtype, jnp.integer):
        raise TypeError(f"cu_seqlens must be an int32 or int64 array, got dtype {cu.dtype}")
    if num_tokens >= 2**31:
        raise ValueError(f"packed batches take fewer than 2**31 tokens (int32 cu_seqlens), got T = {num_tokens}")
    if cu.dtype == jnp.int32:
        return cu
    if isinstance(cu, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(cu.shape, jnp.int32, sharding=cu.sharding)
    return cu.astype(jnp.int32)


def check_cu_seqlens_values(cu_seqlens, num_tokens: int) -> None:
    """Boundary checks that need the values; skipped when cu_seqlens is traced or abstract."""
    try:
        cu = np.asarray(cu_seqlens)
    except Exception:  # a tracer: values unknown until run time
        return
    if cu.ndim != 1 or cu.size == 0 or not np.issubdtype(cu.dtype, np.integer):  # a ShapeDtypeStruct
        return
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {num_tokens}, got {cu[0]} ... {cu[-1]}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
