"""Bad input raises a ValueError or TypeError that names the argument; it never crashes or hangs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import kda_prefill


def call(case, **overrides):
    args = dict(zip(("q", "k", "v", "g", "beta"), case.args))
    kwargs = {**case.kwargs}
    for name, value in overrides.items():
        (args if name in args else kwargs)[name] = value
    kwargs = {n: v for n, v in kwargs.items() if v is not None or n == "scale"}
    return kda_prefill(*(args[n] for n in ("q", "k", "v", "g", "beta")), **kwargs)


@pytest.fixture
def base(case):
    return case(B=2, T=10, H=2, HV=4, K=8, V=6, gate="softplus")


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(q=np.zeros((2, 10, 2))), ValueError, "q must have rank 4"),
        (dict(k=np.zeros((2, 10, 2, 9), np.float32)), ValueError, "k must have shape"),
        (dict(v=np.zeros((2, 11, 4, 6), np.float32)), ValueError, "v must have shape"),
        (dict(v=np.zeros((2, 10, 3, 6), np.float32)), ValueError, "multiple of the H = 2"),
        (dict(g=np.zeros((2, 10, 2, 8), np.float32)), ValueError, "g must have shape [B, T, HV, K]"),
        (dict(beta=np.zeros((2, 10, 4, 1), np.float32)), ValueError, "beta must have rank 3"),
        (dict(beta=np.zeros((2, 10, 2), np.float32)), ValueError, "beta must have shape"),
        (dict(k=np.zeros((2, 10, 2, 8), np.float16)), TypeError, "k must have the dtype of q"),
        (dict(q=np.zeros((2, 10, 2, 8), np.int32)), TypeError, "q must be bfloat16"),
        (dict(g=np.zeros((2, 10, 4, 8), np.int32)), TypeError, "g must be a floating"),
        (dict(A_log=np.zeros((3,), np.float32)), ValueError, "A_log must have shape [HV]"),
        (dict(A_log=None), ValueError, "softplus gate"),
        (dict(dt_bias=np.zeros((4, 9), np.float32)), ValueError, "dt_bias must have shape [HV, K]"),
        (dict(initial_state=np.zeros((2, 4, 6, 8), np.float32)), ValueError, "initial_state must have shape [N, HV, K, V]"),
        (dict(initial_state=np.zeros((2, 4, 8, 6), np.int32)), TypeError, "initial_state must be float32"),
        (dict(cu_seqlens=np.array([0, 5, 10], np.int32)), ValueError, "requires B == 1"),
        (dict(use_gate_in_kernel=False), ValueError, "A_log is only used by the fused gate"),
        (dict(safe_gate=True), ValueError, "lower_bound in [-5, 0)"),
        (dict(safe_gate=True, lower_bound=-6.0), ValueError, "lower_bound in [-5, 0)"),
        (dict(lower_bound=0.5), ValueError, "lower_bound must be a negative"),
        (dict(allow_neg_eigval=True, use_beta_sigmoid_in_kernel=False), ValueError, "allow_neg_eigval"),
        (dict(scale=jnp.float32(0.1) * jnp.ones(())), TypeError, "scale must be a finite Python number"),
        (dict(scale=float("nan")), TypeError, "scale"),
        (dict(impl="triton"), ValueError, "impl must be one of"),
        (dict(final_state_dtype=jnp.int8), TypeError, "final_state_dtype"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_arguments(base, overrides, error, words):
    with pytest.raises(error, match=None) as info:
        call(base, **overrides)
    assert words in str(info.value), str(info.value)


def test_safe_gate_needs_fused_gate(case):
    c = case(T=5, gate="given")
    with pytest.raises(ValueError, match="use_gate_in_kernel=True"):
        kda_prefill(*c.args, safe_gate=True, **c.kwargs)


@pytest.mark.parametrize(
    "cu,words",
    [
        ([0, 4, 3, 10], "non-decreasing"),
        ([1, 4, 10], "start at 0 and end at T"),
        ([0, 4, 9], "start at 0 and end at T"),
        (np.array([0.0, 10.0]), "int32 or int64"),
        (np.zeros((2, 2), np.int32), "shape [N + 1]"),
        ([0], "at least two boundaries"),
    ],
)
def test_bad_cu_seqlens(case, cu, words):
    c = case(seqlens=[10], gate="bounded", initial_state=None)
    c.kwargs["cu_seqlens"] = np.asarray(cu) if not isinstance(cu, list) else np.asarray(cu, np.int32)
    with pytest.raises((ValueError, TypeError)) as info:
        kda_prefill(*c.args, **c.kwargs)
    assert words in str(info.value)


def test_initial_state_count_follows_cu_seqlens(case):
    c = case(seqlens=[3, 7], gate="bounded")
    c.kwargs["initial_state"] = c.kwargs["initial_state"][:1]
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, HV, K, V\] = \(2,"):
        kda_prefill(*c.args, **c.kwargs)


def test_traced_cu_seqlens_skips_value_checks(case):
    """Under jit the boundaries are unknown at trace time; the call still runs."""
    c = case(seqlens=[3, 7], gate="bounded")
    cu = c.kwargs.pop("cu_seqlens")
    f = jax.jit(lambda cu: kda_prefill(*c.args, cu_seqlens=cu, **c.kwargs))
    o, _ = f(cu)
    assert np.all(np.isfinite(np.asarray(o)))


def test_cuda_impl_without_gpu_is_a_clear_error(case):
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    c = case(T=8, gate="bounded")
    with pytest.raises(ValueError, match="impl='cuda'.*need a CUDA GPU"):
        kda_prefill(*c.args, impl="cuda", **c.kwargs)
