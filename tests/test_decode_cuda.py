"""The decode kernel: lowering and path choice (on any machine) and, on a Hopper GPU, correctness
against the float64 oracle (one token of kda_prefill's contract)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import contract, kda_decode_step
from oracle import rel_err
from poison import run_poisoned

needs_kernels = pytest.mark.skipif(not contract.WITH_CUDA, reason="jax_kda built without its CUDA kernels")
gpu = pytest.mark.gpu
BF16_TOL = 5e-3  # one bf16 rounding of o or of the state, with margin (docs/CONTRACT.md's bar)
FP32_TOL = 1e-5  # float32 arithmetic on one token


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def decode_specs(N=4, H=2, HV=4, K=128, V=128, state_v_first=True, state_dtype=jnp.float32, dtype=jnp.bfloat16):
    state = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    return (spec(N, H, K, dtype=dtype), spec(N, H, K, dtype=dtype), spec(N, HV, V, dtype=dtype),
            spec(N, HV, K, dtype=dtype), spec(N, HV, dtype=dtype), spec(*state, dtype=state_dtype))


def lowered_calls(impl, args, platform="cuda", **flags):
    f = lambda *a: kda_decode_step(*a, impl=impl, **flags)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return [line for line in text.splitlines() if "stablehlo.custom_call" in line]


BOUNDED = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
               lower_bound=-5.0)


@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_impl_cuda_lowers_to_the_kernel_without_a_gpu(state_v_first):
    N, H, HV, K, V = 4, 2, 4, 128, 64
    args = decode_specs(N, H, HV, K, V, state_v_first)
    flags = dict(BOUNDED, scale=0.25, state_v_first=state_v_first, A_log=jnp.zeros(HV), dt_bias=jnp.zeros((HV, K)))
    calls = lowered_calls("cuda", args, **flags)
    assert len(calls) == 1 and f"@{contract.DECODE_TARGET}(" in calls[0]
    for attr in ("gate = 2 : i32", "lower_bound = -5.000000e+00 : f32", "scale = 2.500000e-01 : f32",
                 "l2norm = true", "beta_sigmoid = true", "allow_neg_eigval = false",
                 f"state_v_first = {str(state_v_first).lower()}", "has_A_log = true", "has_dt_bias = true"):
        assert attr in calls[0], attr
    state = f"{V}x{K}" if state_v_first else f"{K}x{V}"
    # The kernel takes the token's arrays without a token axis, and writes the new state over the state.
    assert f"(tensor<{N}x{H}x{K}xbf16>, tensor<{N}x{H}x{K}xbf16>, tensor<{N}x{HV}x{V}xbf16>" in calls[0]
    assert f"-> (tensor<{N}x{HV}x{V}xbf16>, tensor<{N}x{HV}x{state}xf32>)" in calls[0]
    assert "output_tuple_indices = [1], operand_index = 7" in calls[0]


@needs_kernels
def test_absent_gate_parameters_are_flagged():
    args = decode_specs(state_dtype=jnp.bfloat16)
    calls = lowered_calls("cuda", args, state_v_first=True, use_gate_in_kernel=True, A_log=jnp.zeros(4))
    assert "gate = 1 : i32" in calls[0] and "has_A_log = true" in calls[0] and "has_dt_bias = false" in calls[0]
    assert "tensor<0xf32>" in calls[0]  # dt_bias travels as an empty array


@needs_kernels
def test_auto_takes_the_kernel_on_a_gpu_and_xla_the_token_step():
    calls = lowered_calls("auto", decode_specs(), state_v_first=True, **BOUNDED)
    assert len(calls) == 1 and f"@{contract.DECODE_TARGET}(" in calls[0]
    assert lowered_calls("xla", decode_specs(), state_v_first=True, **BOUNDED) == []
    assert lowered_calls("auto", decode_specs(), platform="cpu", state_v_first=True, **BOUNDED) == []


@needs_kernels
def test_auto_falls_back_to_the_token_step_with_a_warning():
    with pytest.warns(UserWarning, match="the decode kernel takes K = 64 or 128"):
        calls = lowered_calls("auto", decode_specs(K=96, V=96), state_v_first=True, **BOUNDED)
    assert calls == []


def test_impl_cuda_elsewhere_is_a_clear_error(rng):
    q = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    state = jnp.zeros((2, 1, 64, 64), jnp.float32)
    with pytest.raises(ValueError, match="needs a CUDA GPU; this call is lowered for cpu"):
        lowered_calls("cuda", (q, q, q, q, q[..., 0], state), platform="cpu")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="lowered for cpu"):
            kda_decode_step(q, q, q, q, q[..., 0], state, impl="cuda")


@needs_kernels
@pytest.mark.parametrize("change,words", [
    (dict(K=96, V=96), "the decode kernel takes K = 64 or 128, got K = 96"),
    (dict(V=40), "the decode kernel takes V a multiple of 16, got K = 128, V = 40"),
    (dict(dtype=jnp.float16), "the decode kernel takes q in bfloat16 or float32, got float16"),
    (dict(state_dtype=jnp.float16), "the decode kernel takes initial_state in bfloat16 or float32, got float16"),
])
def test_impl_cuda_rejects_what_the_kernel_does_not_take(change, words):
    with pytest.raises(ValueError, match="impl='cuda' cannot run this decode step: " + words.replace("(", r"\(")):
        lowered_calls("cuda", decode_specs(**change), state_v_first=True)


def test_impl_must_be_a_decode_impl():
    z = jnp.zeros((1, 1, 8))
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'cuda', 'xla'\), got 'reference'"):
        kda_decode_step(z, z, z, z, z[..., 0], jnp.zeros((1, 1, 8, 8)), impl="reference")


# ---------------------------------------------------------------------------------------------
# On the GPU


def decode_case(case, *, N=5, **kw):
    """A one-token case (tests/inputs.py) as decode-step arguments, with its float64 answer."""
    c = case(B=N, T=1, **kw)
    args = tuple(a[:, 0] for a in c.args) + (c.kwargs["initial_state"],)
    flags = {n: a for n, a in c.kwargs.items() if n not in ("initial_state", "output_final_state")}
    want_o, want_state = c.expected()
    return args, flags, want_o[:, 0], want_state


def assert_every_element_close(got, want, tol, name):
    """Element by element, within `tol` of the largest |want|: an element the kernel left unwritten (NaN
    in o, the old value in the state) shows, where an RMS error could hide it."""
    got = np.asarray(got, np.float64)
    bound = tol * np.abs(want).max()
    worst = np.nanmax(np.abs(got - want)) if np.isfinite(got).all() else np.inf
    assert worst <= bound, (name, worst, bound)


def check_kernel(case, tol_o, tol_state, **kw):
    """o written into a NaN buffer, the new state over the old one (donated); both against float64."""
    args, flags, want_o, want_state = decode_case(case, **kw)
    fn = lambda *a: kda_decode_step(*a, impl="cuda", **flags)
    (o, state), landed = run_poisoned(fn, *args, in_place={1: 5})
    assert landed, "o did not land in the poisoned buffer or the state not in place; the check would prove nothing"
    assert o.dtype == args[0].dtype and state.dtype == args[5].dtype and state.shape == args[5].shape
    assert rel_err(o, want_o) < tol_o, ("o", rel_err(o, want_o))
    assert rel_err(state, want_state) < tol_state, ("state", rel_err(state, want_state))
    assert_every_element_close(o, want_o, tol_o, "o")
    assert_every_element_close(state, want_state, tol_state, "state")


@gpu
@needs_kernels
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
@pytest.mark.parametrize("gate", ["given", "softplus", "bounded"])
def test_kernel_against_float64(case, gate, state_v_first, state_dtype, K):
    check_kernel(case, BF16_TOL, FP32_TOL if state_dtype == "float32" else BF16_TOL, H=2, HV=6, K=K, V=128,
                 dtype="bfloat16", gate=gate, state_v_first=state_v_first, initial_state=state_dtype)


FEATURES = [
    dict(V=48),  # a partial tile of value columns
    dict(V=208, HV=2),  # four tiles, the last partial
    dict(V=16, K=64),
    dict(gate="bounded", use_A_log=False, dt_bias=None),
    dict(gate="softplus", dt_bias=None),
    dict(gate="bounded", lower_bound=-20.0),
    dict(l2norm=False),
    dict(beta_sigmoid=False),
    dict(allow_neg_eigval=True),
    dict(scale=0.3),
    dict(H=1, HV=8),  # eight value heads read one q/k head
]


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
@pytest.mark.parametrize("features", FEATURES, ids=repr)
def test_features(case, features, state_v_first):
    kw = dict(dict(H=2, HV=4, K=128, V=128, dtype="bfloat16", gate="softplus"), **features)
    check_kernel(case, BF16_TOL, FP32_TOL, state_v_first=state_v_first, **kw)


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_float32_inputs(case, state_v_first):
    """q, k, v, g and beta in float32: o in float32 too, both at float32 accuracy."""
    check_kernel(case, FP32_TOL, FP32_TOL, H=2, HV=4, K=128, V=64, dtype="float32", gate="bounded",
                 state_v_first=state_v_first)


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_many_sequences(case, state_v_first):
    check_kernel(case, BF16_TOL, FP32_TOL, N=300, H=4, HV=8, K=128, V=128, dtype="bfloat16", gate="bounded",
                 state_v_first=state_v_first)


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_kernel_agrees_with_the_token_step(case, state_v_first):
    args, flags, _, _ = decode_case(case, N=7, H=2, HV=4, K=128, V=128, dtype="bfloat16", gate="softplus",
                                    state_v_first=state_v_first)
    fast = kda_decode_step(*args, impl="cuda", **flags)
    slow = kda_decode_step(*args, impl="xla", **flags)
    assert rel_err(fast[0], slow[0]) < BF16_TOL and rel_err(fast[1], slow[1]) < FP32_TOL


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_bitwise_deterministic(case, state_v_first):
    args, flags, _, _ = decode_case(case, N=64, H=4, HV=8, K=128, V=128, dtype="bfloat16", gate="softplus",
                                    state_v_first=state_v_first)
    step = jax.jit(lambda *a: kda_decode_step(*a, impl="cuda", **flags))
    bits = lambda a: np.asarray(a.view(jnp.uint16) if a.dtype == jnp.bfloat16 else a.view(jnp.uint32))
    first = [bits(a) for a in step(*args)]
    for _ in range(3):
        for a, b in zip(first, step(*args)):
            np.testing.assert_array_equal(a, bits(b))


@gpu
@needs_kernels
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
def test_nan_stays_in_its_sequence(case, state_v_first):
    """NaN in q reaches only that sequence's output; NaN in the state its state and output."""
    args, flags, want_o, want_state = decode_case(case, N=3, H=1, HV=2, K=128, V=64, dtype="bfloat16",
                                                  gate="bounded", state_v_first=state_v_first)
    q, state = np.array(args[0], np.float32), np.array(args[5])
    q[0, 0, 5] = np.nan
    state[1, 1, 3, 7] = np.nan
    args = (jnp.asarray(q, jnp.bfloat16),) + args[1:5] + (jnp.asarray(state),)
    o, new_state = (np.asarray(a, np.float32) for a in kda_decode_step(*args, impl="cuda", **flags))
    assert np.isnan(o[0, 0]).all() and np.isfinite(new_state[0]).all()  # q feeds only o
    assert np.isnan(new_state[1, 1]).any() and np.isfinite(new_state[1, 0]).all()
    assert rel_err(o[2], want_o[2]) < BF16_TOL and rel_err(new_state[2], want_state[2]) < FP32_TOL


SCRIPT = os.path.join(os.path.dirname(__file__), "gpu_small_case.py")


@gpu
@needs_kernels
def test_cuda_graphs():
    env = dict(os.environ, XLA_FLAGS="--xla_gpu_enable_command_buffer=CUSTOM_CALL --xla_gpu_graph_min_graph_size=1")
    out = subprocess.run([sys.executable, SCRIPT, "check-decode"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


@gpu
@needs_kernels
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    if subprocess.run(["which", "compute-sanitizer"], capture_output=True).returncode != 0:
        pytest.skip("compute-sanitizer not on PATH")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = ["compute-sanitizer", f"--tool={tool}", "--kernel-name", "kns=decode_kernel", "--error-exitcode=3",
           sys.executable, SCRIPT, "run-decode"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in out.stdout or "0 hazards" in out.stdout, out.stdout[-2000:]
