"""The decode step through the KDA primitive on its XLA path: against float64, under vmap, forward and
reverse derivatives, and split over a mesh of 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from hlo import collectives
from jax_kda import kda_decode_step
from oracle import rel_err

FP32_TOL = 1e-5


def decode_case(case, *, N=3, **kw):
    """A one-token case (tests/inputs.py) as decode-step arguments, flags and float64 answer."""
    c = case(B=N, T=1, **kw)
    args = tuple(a[:, 0] for a in c.args) + (c.kwargs["initial_state"],)
    flags = {n: a for n, a in c.kwargs.items() if n not in ("initial_state", "output_final_state")}
    want_o, want_state = c.expected()
    return args, flags, want_o[:, 0], want_state


@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first", "k-first"])
@pytest.mark.parametrize("gate", ["given", "softplus", "bounded"])
def test_matches_float64(case, gate, state_v_first):
    args, flags, want_o, want_state = decode_case(case, H=2, HV=4, K=16, V=8, gate=gate, state_v_first=state_v_first)
    o, state = kda_decode_step(*args, **flags)
    assert rel_err(o, want_o) < FP32_TOL and rel_err(state, want_state) < FP32_TOL
    o_xla, state_xla = kda_decode_step(*args, impl="xla", **flags)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_xla))  # K = 16: `auto` runs the token step here too
    np.testing.assert_array_equal(np.asarray(state), np.asarray(state_xla))


NAMES = ("q", "k", "v", "g", "beta", "state")


@pytest.mark.parametrize("mapped", [("q",), ("state",), ("v", "beta", "state"), ("A_log",), ("dt_bias", "g")])
def test_vmap_matches_loop(case, mapped):
    lanes = 3
    args, flags, _, _ = decode_case(case, H=1, HV=2, K=8, V=8, gate="softplus", state_v_first=True)
    values = dict(zip(NAMES, args), **flags)
    stacked = {n: jnp.stack([values[n] * (1 + 0.1 * i) for i in range(lanes)]) for n in mapped}

    def step(lane_values):
        merged = dict(values, **lane_values)
        positional = [merged.pop(n) for n in NAMES]
        return kda_decode_step(*positional, **merged)

    got = jax.vmap(step)(stacked)
    for i in range(lanes):
        want = step({n: stacked[n][i] for n in mapped})
        for g, w in zip(got, want):
            assert rel_err(g[i], w) < 1e-6


def test_forward_and_reverse_derivatives(case):
    args, flags, _, _ = decode_case(case, N=2, H=1, HV=2, K=4, V=4, gate="bounded", state_v_first=True)
    q, k, v, g, beta, state = args
    f = lambda q, v, g, state: kda_decode_step(q, k, v, g, beta, state, **flags)
    check_grads(f, (q, v, g, state), order=1, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


def cpu_mesh(explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((2, 4), ("n", "h"), axis_types=(kind, kind), devices=jax.devices("cpu")[:8])


def placed(mesh, args, flags, spec):
    """Decode-step arguments laid out with sequences over mesh axes spec[0] and heads over spec[1]."""
    n, h = spec
    put = lambda a, *s: jax.device_put(a, NamedSharding(mesh, P(*s)))
    q, k, v, g, beta, state = args
    args = (put(q, n, h), put(k, n, h), put(v, n, h), put(g, n, h), put(beta, n, h), put(state, n, h))
    return args, dict(flags, A_log=put(flags["A_log"], h), dt_bias=put(flags["dt_bias"], h))


needs_8_devices = pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices")


@needs_8_devices
@pytest.mark.parametrize("spec", [("n", None), (None, "h"), ("n", "h")], ids=["sequences", "heads", "both"])
def test_split_over_a_mesh_needs_no_collective(case, spec):
    args, flags, want_o, want_state = decode_case(case, N=4, H=4, HV=8, K=16, V=8, gate="softplus",
                                                  state_v_first=True)
    args, flags = placed(cpu_mesh(), args, flags, spec)
    fn = lambda *a: kda_decode_step(*a, **flags)
    o, state = jax.jit(fn)(*args)
    assert rel_err(o, want_o) < FP32_TOL and rel_err(state, want_state) < FP32_TOL
    assert not any(collectives(fn, *args).values()), collectives(fn, *args)


@needs_8_devices
def test_explicit_mesh(case):
    args, flags, want_o, want_state = decode_case(case, N=4, H=4, HV=8, K=16, V=8, gate="bounded",
                                                  state_v_first=False)
    args, flags = placed(cpu_mesh(explicit=True), args, flags, ("n", "h"))
    o, state = jax.jit(lambda *a: kda_decode_step(*a, **flags))(*args)
    assert rel_err(o, want_o) < FP32_TOL and rel_err(state, want_state) < FP32_TOL
    assert tuple(jax.typeof(state).sharding.spec)[:2] == ("n", "h")
