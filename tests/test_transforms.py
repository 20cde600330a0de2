"""jit, vmap and grad through kda_prefill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jax_kda import kda_prefill
from oracle import rel_err

ARG_NAMES = ("q", "k", "v", "g", "beta")


def run(case, impl="auto", **over):
    args = dict(zip(ARG_NAMES, case.args))
    kw = {**case.kwargs}
    for n, val in over.items():
        (args if n in args else kw)[n] = val
    return kda_prefill(*(args[n] for n in ARG_NAMES), impl=impl, **kw)


def assert_same(a, b, tol=1e-6):
    assert a.shape == b.shape
    assert rel_err(a, b) < tol, rel_err(a, b)


@pytest.mark.parametrize(
    "mapped",
    [
        ("q",),  # folds into B
        ("q", "v", "initial_state"),
        ("g",),
        ("A_log",),  # folds into the heads
        ("dt_bias", "beta"),
    ],
)
def test_vmap_matches_loop(case, mapped):
    lanes = 3
    c = case(B=2, T=70, H=1, HV=2, gate="softplus")
    stacked = {}
    for name in mapped:
        base = c.args[ARG_NAMES.index(name)] if name in ARG_NAMES else c.kwargs[name]
        stacked[name] = jnp.stack([base * (1.0 + 0.3 * i) for i in range(lanes)])

    batched = jax.vmap(lambda over: run(c, **over))(stacked)
    for i in range(lanes):
        single = run(c, **{n: s[i] for n, s in stacked.items()})
        assert_same(batched[0][i], single[0])
        assert_same(batched[1][i], single[1])


@pytest.mark.parametrize("mapped", [("cu_seqlens", "q"), ("q",), ("cu_seqlens", "A_log"), ("A_log",)])
def test_vmap_packed_sequences(case, mapped):
    lanes = 2
    c = case(seqlens=[5, 0, 70, 9], gate="softplus", H=1, HV=2)
    cu0 = c.kwargs["cu_seqlens"]
    variants = {
        "cu_seqlens": jnp.stack([jnp.asarray(cu0), jnp.asarray([0, 40, 41, 41, 84], jnp.int32)]),
        "q": jnp.stack([c.args[0], -c.args[0]]),
        "A_log": jnp.stack([c.kwargs["A_log"], c.kwargs["A_log"] * 0.5]),
    }
    stacked = {n: variants[n] for n in mapped}
    batched = jax.vmap(lambda over: run(c, **over))(stacked)
    for i in range(lanes):
        single = run(c, **{n: s[i] for n, s in stacked.items()})
        assert_same(batched[0][i], single[0])
        assert_same(batched[1][i], single[1])


def test_vmap_is_one_primitive_call(case):
    c = case(B=2, T=20, gate="bounded")
    qs = jnp.stack([c.args[0]] * 4)
    jaxpr = jax.make_jaxpr(jax.vmap(lambda q: run(c, q=q)))(qs)
    text = str(jaxpr)
    assert text.count("kda_prefill[") == 1 and "while" not in text.split("kda_prefill[")[0]


def test_jit_does_not_retrace(case):
    traces = []

    @jax.jit
    def f(q, k, v, g, beta):
        traces.append(1)
        return kda_prefill(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    for _ in range(3):
        c = case(T=30, gate="given")
        f(*c.args).block_until_ready()
    assert len(traces) == 1


def test_eager_calls_reuse_one_compilation(case):
    c = case(T=30, gate="bounded")
    run(c)
    from jax_kda.primitive import _compiled

    before = _compiled.cache_info().currsize
    for _ in range(2):
        run(case(T=30, gate="bounded"))
    assert _compiled.cache_info().currsize == before


@pytest.mark.parametrize("gate", ["softplus", "bounded"])
def test_gradients_match_reference_autodiff(case, gate):
    """The custom VJP (chunked path) against plain autodiff of the token-by-token scan."""
    c = case(B=1, T=70, H=1, HV=2, gate=gate, state_v_first=True)
    names = ARG_NAMES + ("A_log", "dt_bias", "initial_state")
    primals = [c.args[ARG_NAMES.index(n)] if n in ARG_NAMES else c.kwargs[n] for n in names]
    weights = [jnp.asarray(np.random.default_rng(1).standard_normal(s), jnp.float32) for s in ((1, 70, 2, 32), (1, 2, 32, 32))]

    def loss(impl, *xs):
        o, final = run(c, impl=impl, **dict(zip(names, xs)))
        return jnp.sum(o * weights[0]) + jnp.sum(final * weights[1])

    got = jax.grad(lambda *xs: loss("auto", *xs), argnums=tuple(range(len(names))))(*primals)
    want = jax.grad(lambda *xs: loss("reference", *xs), argnums=tuple(range(len(names))))(*primals)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def test_gradients_of_packed_sequences(case):
    c = case(seqlens=[20, 0, 50], gate="softplus", H=1)
    g_auto = jax.grad(lambda v, s: jnp.sum(run(c, v=v, initial_state=s)[1] ** 2), argnums=(0, 1))
    g_ref = jax.grad(lambda v, s: jnp.sum(run(c, "reference", v=v, initial_state=s)[1] ** 2), argnums=(0, 1))
    for a, b in zip(g_auto(c.args[2], c.kwargs["initial_state"]), g_ref(c.args[2], c.kwargs["initial_state"])):
        assert rel_err(a, b) < 1e-4


def test_check_grads_small(case):
    """Finite differences on a small problem, through every differentiable input."""
    c = case(B=1, T=20, H=1, K=8, V=4, gate="bounded")
    names = ARG_NAMES + ("A_log", "dt_bias", "initial_state")
    primals = [c.args[ARG_NAMES.index(n)] if n in ARG_NAMES else c.kwargs[n] for n in names]

    def f(*xs):
        o, final = run(c, **dict(zip(names, xs)))
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final))

    check_grads(f, primals, order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)
