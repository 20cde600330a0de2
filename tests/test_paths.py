"""Every feature of docs/CONTRACT.md on the pure-JAX paths, against the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import kda_prefill
from inputs import strong_softplus_gate
from oracle import rel_err

PURE_JAX = ["reference", "xla"]


def check(case, impl, *, tol_o=1e-5, tol_state=1e-5):
    o, final = kda_prefill(*case.args, impl=impl, **case.kwargs)
    ref_o, ref_final = case.expected()
    q = case.args[0]
    assert o.shape == ref_o.shape and o.dtype == q.dtype
    assert rel_err(o, ref_o) < tol_o, rel_err(o, ref_o)
    if case.kwargs.get("output_final_state"):
        init = case.kwargs.get("initial_state")
        assert final.shape == (ref_final.shape if init is None else init.shape)
        assert rel_err(final, ref_final) < tol_state, rel_err(final, ref_final)
    else:
        assert final is None
    return o, final


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize(
    "features",
    [
        dict(gate="given"),
        dict(gate="softplus"),
        dict(gate="softplus", dt_bias="flat"),
        dict(gate="softplus", dt_bias=None),
        dict(gate="bounded"),
        dict(gate="bounded", use_A_log=False, lower_bound=-2.0),
        dict(gate="bounded", dt_bias=None, use_A_log=False),
        dict(l2norm=False),
        dict(beta_sigmoid=False),
        dict(allow_neg_eigval=True),
        dict(scale=0.37),
        dict(initial_state=None),
        dict(initial_state="bfloat16"),
        dict(state_v_first=True, gate="bounded"),
        dict(output_final_state=False),
    ],
    ids=repr,
)
def test_features_fp32(case, impl, features):
    check(case(T=70, **features), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
def test_bf16_inputs(case, impl):
    c = case(T=77, dtype="bfloat16", gate="bounded", state_v_first=True)
    o, _ = check(c, impl, tol_o=5e-3)  # o is rounded to bf16; the state stays float32
    assert o.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", PURE_JAX)
def test_final_state_dtype(case, impl):
    c = case(T=33, gate="softplus")
    o, final = kda_prefill(*c.args, impl=impl, final_state_dtype=jnp.bfloat16, **c.kwargs)
    assert final.dtype == jnp.bfloat16
    assert rel_err(final, c.expected()[1]) < 5e-3


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_partial_chunks(case, impl, T):
    check(case(T=T, B=2, gate="bounded"), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize("K,V", [(64, 64), (60, 24), (16, 128), (128, 8)])
def test_head_sizes(case, impl, K, V):
    check(case(T=50, K=K, V=V, H=1, gate="softplus"), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize("H,HV", [(1, 4), (2, 6)])
def test_grouped_value_heads(case, impl, H, HV):
    check(case(T=45, H=H, HV=HV, gate="bounded", state_v_first=True), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize(
    "seqlens",
    [[70], [0, 5, 0, 64, 1, 0], [1] * 9, [13, 100, 27], [0]],
    ids=lambda s: "-".join(map(str, s)),
)
@pytest.mark.parametrize("cu_dtype", [np.int32, np.int64])
def test_packed_sequences(case, impl, seqlens, cu_dtype):
    check(case(seqlens=seqlens, cu_dtype=cu_dtype, gate="softplus", H=1, HV=2), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
def test_packed_sequences_v_first_without_initial_state(case, impl):
    check(case(seqlens=[3, 0, 90], initial_state=None, state_v_first=True, gate="bounded"), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
def test_empty_sequence_keeps_initial_state(case, impl):
    c = case(seqlens=[4, 0, 6], gate="bounded")
    _, final = kda_prefill(*c.args, impl=impl, **c.kwargs)
    np.testing.assert_array_equal(np.asarray(final[1]), np.asarray(c.kwargs["initial_state"][1]))


@pytest.mark.parametrize("impl", PURE_JAX)
def test_complete_forgetting_and_zero_gates(case, impl):
    c = case(T=150, B=2, gate="given")
    g = np.array(c.args[3])
    g[:, 40] = -1000.0  # everything before token 40 is forgotten
    g[:, 60:100] = 0.0  # no decay at all
    g[1, 120:] = -1000.0
    c.args = c.args[:3] + (jnp.asarray(g),) + c.args[4:]
    check(c, impl)


@pytest.mark.parametrize("impl", PURE_JAX)
def test_strong_softplus_gate(case, impl):
    """The unbounded gate at large raw values: decays of hundreds of nats inside one chunk."""
    check(strong_softplus_gate(case(T=130, gate="softplus")), impl)


@pytest.mark.parametrize("impl", PURE_JAX)
def test_no_tokens(case, impl):
    c = case(T=0, gate="bounded")
    o, final = kda_prefill(*c.args, impl=impl, **c.kwargs)
    assert o.shape == (1, 0, 2, 32)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(c.kwargs["initial_state"]))


@pytest.mark.parametrize("impl", PURE_JAX)
@pytest.mark.parametrize(
    "where,value",
    # An infinite raw gate or beta logit is a valid limit (full forgetting, full write); only NaN
    # there is an invalid input.
    [(w, np.nan) for w in ("q", "v", "g", "beta", "initial_state")]
    + [(w, np.inf) for w in ("q", "v", "initial_state")],
)
def test_non_finite_inputs_give_non_finite_outputs(case, impl, where, value):
    c = case(T=70, B=2, gate="softplus")
    if where == "initial_state":
        s = np.array(c.kwargs["initial_state"])
        s[0, 0, 0, 0] = value
        c.kwargs["initial_state"] = jnp.asarray(s)
    else:
        idx = "qkvgb".index(where[0]) if where != "beta" else 4
        arr = np.array(c.args[idx])
        arr[0, 10, 0] = value
        c.args = c.args[:idx] + (jnp.asarray(arr),) + c.args[idx + 1 :]
    o, final = kda_prefill(*c.args, impl=impl, **c.kwargs)
    o, final = np.asarray(o), np.asarray(final)
    assert not np.all(np.isfinite(o[0])) or not np.all(np.isfinite(final[0]))
    # The other sequence of the batch is untouched.
    ref_o, _ = c.expected()
    assert rel_err(o[1], ref_o[1]) < 1e-5
