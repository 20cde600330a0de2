"""Infinite log-decays and non-finite inputs on the pure-JAX paths (issue 11).

A log-decay of -inf is a complete decay (exp(-inf) = 0): the outputs stay finite and match the
oracle. A non-finite q, k, v, g or beta at one token never reaches an earlier output, another head or
another sequence; that token's output is non-finite, and so is everything after it that it feeds.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import api, kda_prefill
from jax_kda.chunked import CPU_CHUNK, kda_chunked
from oracle import rel_err

# kda_prefill's pure-JAX paths, and the chunked path at the CPU's chunk size and at another one.
PATHS = ["reference", "xla", f"chunk={CPU_CHUNK}", "chunk=32"]


def run(case, path):
    if path.startswith("chunk="):
        o, final = kda_chunked(*api.prefill_call(*case.args, **case.kwargs), chunk=int(path[6:]))
    else:
        o, final = kda_prefill(*case.args, impl=path, **case.kwargs)
    return np.asarray(o, np.float64), np.asarray(final, np.float64)


def with_arg(case, index, update):
    """A copy of `case` whose positional argument `index` (q, k, v, g, beta) went through `update`."""
    arr = np.array(case.args[index])
    update(arr)
    return dataclasses.replace(case, args=case.args[:index] + (jnp.asarray(arr),) + case.args[index + 1 :])


@pytest.mark.parametrize("path", PATHS)
def test_minus_inf_log_decay_is_a_complete_decay(case, path):
    c = case(T=150, B=2, H=2, gate="given")

    def wipe(g):
        g[0, 40] = -np.inf  # every head and channel, in the middle of a chunk
        g[1, 70, 1, :5] = -np.inf  # a few channels of one head
        g[1, 100:103, 0] = -np.inf  # several tokens in a row
        g[1, 149] = -np.inf  # the last token: the final state is wiped before its write

    c = with_arg(c, 3, wipe)
    o, final = run(c, path)
    ref_o, ref_final = c.expected()
    assert rel_err(o, ref_o) < 1e-5 and rel_err(final, ref_final) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_softplus_gate_driven_to_minus_inf(case, path):
    """A raw gate of +inf, or one whose float32 log-decay overflows, is a complete decay."""
    c = case(T=100, B=2, H=2, gate="softplus")
    c.kwargs["A_log"] = c.kwargs["A_log"] + 5.0

    def drive(g):
        g[0, 30] = np.inf
        g[1, 50, 1] = 3e38  # finite, but exp(A_log) * g overflows float32

    c = with_arg(c, 3, drive)
    o, final = run(c, path)
    ref_o, ref_final = c.expected()
    assert rel_err(o, ref_o) < 1e-5 and rel_err(final, ref_final) < 1e-5


# (input, value, flags): every non-finite value that is an invalid input for that flag set. An infinite
# raw gate or beta logit is a valid limit, and so is a log-decay of -inf (tested above).
BAD_INPUTS = [
    ("q", np.nan, {}), ("q", np.inf, {}), ("q", -np.inf, {}),
    ("k", np.nan, {}), ("k", np.inf, {}), ("k", -np.inf, {}),
    ("v", np.nan, {}), ("v", np.inf, {}), ("v", -np.inf, {}),
    ("g", np.nan, {}), ("g", np.inf, {}),
    ("g", np.nan, dict(gate="softplus")), ("g", np.nan, dict(gate="bounded")),
    ("beta", np.nan, {}), ("beta", np.inf, dict(beta_sigmoid=False)), ("beta", -np.inf, dict(beta_sigmoid=False)),
]
ARGS = ("q", "k", "v", "g", "beta")


def poison(case, where, value, token, head):
    """A copy of `case` with one element of `where` at `token` (flat over B * T) and q/k head `head`
    (value head for v, g, beta) set to `value`."""

    def put(arr):
        flat = arr.reshape(-1, *arr.shape[2:])
        flat[(token, head) + (3,) * (flat.ndim - 2)] = value

    return with_arg(case, ARGS.index(where), put)


def check_isolated(bad, clean, before, hit, reaches_later):
    """bad/clean: one sequence's outputs `[tokens, HV, V]`. `before`: token mask of the outputs that
    precede the bad token; `hit`: value-head mask of what it feeds. Everything else equals the clean
    run; the bad token's output (and, when `reaches_later`, every later one) is non-finite."""
    tokens = np.arange(bad.shape[0])
    same = ~hit[None, :] | before[:, None]
    if not reaches_later:
        same |= tokens[:, None] != tokens[~before][0]
    np.testing.assert_allclose(bad[same], clean[same], rtol=1e-6, atol=1e-6)
    for t in tokens[~before & (reaches_later | (tokens == tokens[~before][0]))]:
        for hv in np.flatnonzero(hit):
            assert not np.all(np.isfinite(bad[t, hv])), (t, hv)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where,value,flags", BAD_INPUTS, ids=lambda x: repr(x) if isinstance(x, dict) else str(x))
def test_non_finite_token_reaches_nothing_before_it(case, path, where, value, flags):
    c = case(**{**dict(B=2, T=100, H=2, HV=4, gate="given"), **flags})
    token, head = 43, 1  # batch 0, inside a chunk of every size tested
    clean_o, clean_final = run(c, path)
    o, final = run(poison(c, where, value, token, head), path)

    hit = np.zeros(4, bool)
    hit[[2, 3] if where in ("q", "k") else head] = True  # q/k head 1 feeds value heads 2 and 3
    reaches_later = where != "q"  # q reaches only its own output
    before = np.arange(100) < token
    check_isolated(o[0], clean_o[0], before, hit, reaches_later)
    np.testing.assert_allclose(o[1], clean_o[1], rtol=1e-6, atol=1e-6)  # the other sequence
    np.testing.assert_allclose(final[1], clean_final[1], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(final[0])) != reaches_later
    assert rel_err(clean_o, c.expected()[0]) < 1e-5


PACKED_BAD_INPUTS = [
    ("q", np.nan, {}), ("k", np.inf, {}), ("v", -np.inf, {}), ("g", np.nan, {}),
    ("g", np.nan, dict(gate="bounded")), ("beta", np.nan, {}), ("beta", -np.inf, dict(beta_sigmoid=False)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where,value,flags", PACKED_BAD_INPUTS, ids=lambda x: repr(x) if isinstance(x, dict) else str(x))
def test_non_finite_token_stays_in_its_packed_sequence(case, path, where, value, flags):
    seqlens = [37, 50, 29]
    c = case(**{**dict(seqlens=seqlens, H=1, HV=2, gate="softplus"), **flags})
    start, local = 37, 20  # the 21st token of sequence 1
    clean_o, clean_final = run(c, path)
    o, final = run(poison(c, where, value, start + local, 0), path)

    hit = np.array([True, where in ("q", "k")])  # q/k head 0 feeds both value heads
    reaches_later = where != "q"
    seq = slice(start, start + seqlens[1])
    check_isolated(o[0, seq], clean_o[0, seq], np.arange(seqlens[1]) < local, hit, reaches_later)
    for other in (slice(0, start), slice(start + seqlens[1], None)):
        np.testing.assert_allclose(o[0, other], clean_o[0, other], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final[[0, 2]], clean_final[[0, 2]], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(final[1])) != reaches_later
    assert rel_err(clean_o, c.expected()[0]) < 1e-5
