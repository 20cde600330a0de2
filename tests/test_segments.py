"""Sequences cut into segments joined through their affine summaries (jax_kda.segments), on the CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import api, paths, segments
from jax_kda.chunked import kda_chunked
from jax_kda.primitive import kda_prefill_inner_run
from oracle import kda_oracle, rel_err


def normalized(case):
    return api.prefill_call(*case.args, **case.kwargs)


@pytest.mark.parametrize("tokens,pieces", [(100, 1), (100, 2), (257, 3), (64, 5), (20, 4), (1, 3)])
def test_bounds_cover_the_sequence_in_whole_chunks(tokens, pieces):
    bounds = segments.segment_bounds(tokens, pieces)
    assert bounds[0] == 0 and bounds[-1] == tokens and len(bounds) - 1 <= pieces
    assert all(b - a > 0 for a, b in zip(bounds, bounds[1:]))
    assert all(b % 16 == 0 for b in bounds[1:-1])


FEATURES = [
    dict(gate="bounded"),
    dict(gate="softplus", state_v_first=True),
    dict(gate="given", HV=4, initial_state="bfloat16"),
    dict(gate="bounded", initial_state=None, output_final_state=False),
    dict(gate="softplus", K=16, V=48, allow_neg_eigval=True),
]


@pytest.mark.parametrize("features", FEATURES, ids=repr)
@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_split_prefill_equals_one_prefill(case, features, pieces):
    c = case(**{**dict(B=2, T=150, H=2, K=32, V=32), **features})
    x, opts = normalized(c)
    want_o, want_s = kda_chunked(x, opts)
    got_o, got_s = segments.split_prefill(x, opts, kda_chunked, pieces)
    assert rel_err(got_o, want_o) < 1e-5
    assert (got_s is None) == (want_s is None)
    if want_s is not None:
        assert got_s.dtype == want_s.dtype and rel_err(got_s, want_s) < 1e-5


def test_split_prefill_of_bf16_inputs_within_the_bf16_tolerance(case):
    c = case(B=1, T=400, H=2, HV=4, K=32, V=32, dtype="bfloat16", gate="softplus", state_v_first=True)
    x, opts = normalized(c)
    o, s = segments.split_prefill(x, opts, kda_chunked, 5)
    ref_o, ref_s = c.expected()
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, ref_o) < 5e-3 and rel_err(s, ref_s) < 5e-3


@pytest.mark.parametrize("pieces", [2, 8, 64])
@pytest.mark.parametrize("gate", ["bounded", "softplus"])
def test_many_segments_with_weak_decay_within_the_bf16_tolerance(case, gate, pieces):
    # A_log = -4: decay per token ~e^-0.02, so the state carries across every segment boundary.
    c = case(B=1, T=64 * 16, H=2, K=32, V=32, dtype="bfloat16", gate=gate, state_v_first=True)
    c.kwargs["A_log"] = jnp.full_like(c.kwargs["A_log"], -4.0)
    x, opts = normalized(c)
    o, s = segments.split_prefill(x, opts, kda_chunked, pieces)
    assert len(segments.segment_bounds(x.q.shape[1], pieces)) - 1 == pieces
    ref_o, ref_s = c.expected()
    assert rel_err(o, ref_o) < 5e-3 and rel_err(s, ref_s) < 5e-3


PACKED = [
    dict(seqlens=[300, 5, 0, 1, 90], gate="bounded"),  # one long sequence among short and empty ones
    dict(seqlens=[17, 400], gate="softplus", state_v_first=True, H=2, HV=4, initial_state="bfloat16"),
    dict(seqlens=[0, 64, 250, 0], gate="given", initial_state=None, output_final_state=False),
    dict(seqlens=[33, 160, 160], gate="softplus", K=16, V=48, allow_neg_eigval=True),
]


@pytest.mark.parametrize("features", PACKED, ids=repr)
@pytest.mark.parametrize("pieces", [2, 16])
def test_split_packed_prefill_equals_one_prefill(case, features, pieces):
    c = case(**{**dict(H=2, K=32, V=32), **features})
    x, opts = normalized(c)
    want_o, want_s = kda_chunked(x, opts)
    got_o, got_s = jax.jit(segments.split_packed_prefill, static_argnums=(1, 2, 3))(x, opts, kda_chunked, pieces)
    assert rel_err(got_o, want_o) < 1e-5
    assert (got_s is None) == (want_s is None)
    if want_s is not None:
        assert got_s.dtype == want_s.dtype and rel_err(got_s, want_s) < 1e-5
    ref_o, _ = c.expected()  # and against the float64 recurrence
    assert rel_err(got_o, ref_o) < 1e-4


def test_packed_cut_cuts_only_the_long_sequences():
    cu = jnp.array([0, 300, 305, 305, 306, 396], jnp.int32)
    cut = segments.cut_packed(cu, 396, 128, 5 + 4)
    assert cut.cu.tolist() == [0, 128, 256, 300, 305, 305, 306, 396, 396, 396]
    assert cut.sequence.tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4]
    assert cut.first.tolist() == [True, False, False, True, True, True, True, False, False]
    assert cut.last.tolist() == [2, 3, 4, 5, 6]


def test_packed_cut_keeps_a_non_finite_token_to_its_sequence_and_after(case):
    """A NaN in one sequence's v: the join restarts at the next sequence by selection, so nothing of it
    reaches another sequence, nor its own earlier tokens (its segment's included)."""
    c = case(seqlens=[300, 5, 200], H=2, K=32, V=32, gate="softplus")
    x, opts = normalized(c)
    split = jax.jit(segments.split_packed_prefill, static_argnums=(1, 2, 3))
    clean_o, clean_s = split(x, opts, kda_chunked, 8)  # segments of 96 tokens
    v = np.array(x.v)
    v[0, 200, 1, 3] = np.nan  # sequence 0, its third segment, value head 1
    o, s = split(x._replace(v=jnp.asarray(v)), opts, kda_chunked, 8)
    o, clean_o = np.asarray(o), np.asarray(clean_o)
    np.testing.assert_array_equal(o[0, :200], clean_o[0, :200])  # its earlier tokens, in its segment too
    np.testing.assert_array_equal(o[0, 300:], clean_o[0, 300:])  # the other sequences
    np.testing.assert_array_equal(np.asarray(s)[1:], np.asarray(clean_s)[1:])
    assert np.isnan(o[0, 200:300, 1]).all() and np.isnan(np.asarray(s)[0, 1]).all()
    np.testing.assert_array_equal(o[0, :, 0], clean_o[0, :, 0])  # the other value head


@pytest.mark.parametrize("gate", ["bounded", "softplus"])
def test_packed_cut_into_many_segments_with_weak_decay_within_the_bf16_tolerance(case, gate):
    c = case(seqlens=[40 * 16, 7, 23 * 16 + 5], H=2, K=32, V=32, dtype="bfloat16", gate=gate)
    c.kwargs["A_log"] = jnp.full_like(c.kwargs["A_log"], -4.0)
    x, opts = normalized(c)
    o, s = segments.split_packed_prefill(x, opts, kda_chunked, 64)  # a segment every 16 tokens
    ref_o, ref_s = c.expected()
    assert rel_err(o, ref_o) < 5e-3 and rel_err(s, ref_s) < 5e-3


def test_running_summaries_equal_the_serial_fold(rng):
    P, K, V = 13, 8, 5
    transition = jnp.asarray(rng.standard_normal((2, P, 3, K, K)) / np.sqrt(K), jnp.float32)
    local = jnp.asarray(rng.standard_normal((2, P, 3, K, V)), jnp.float32)
    got_t, got_l = segments.running(transition, local, axis=1)
    t, l = transition[:, 0], local[:, 0]
    for j in range(P):
        if j:
            t, l = transition[:, j] @ t, segments.advance(transition[:, j], local[:, j], l)
        assert rel_err(got_t[:, j], t) < 1e-5 and rel_err(got_l[:, j], l) < 1e-5


def test_folded_entry_states_equal_the_scan(rng):
    P, K, V = 5, 8, 5
    transition = jnp.asarray(rng.standard_normal((2, P, 3, K, K)) / np.sqrt(K), jnp.float32)
    local = jnp.asarray(rng.standard_normal((2, P, 3, K, V)), jnp.float32)
    initial = jnp.asarray(rng.standard_normal((2, 3, K, V)), jnp.float32)
    for got, want in zip(segments.folded_entry_states(transition, local, initial),
                         segments.entry_states(transition, local, initial, axis=1)):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_transition_columns_carry_the_affine_summary(case, rng):
    """The columns after V hold Φ: the final state from any S_in is Φ S_in + S_local."""
    c = case(B=2, T=70, H=2, K=16, V=24, gate="softplus", initial_state=None)
    x, opts = normalized(c)
    opts = dataclasses.replace(opts, transition_columns=True, output_final_state=True)
    o, final = jax.jit(kda_prefill_inner_run, static_argnums=1)(x, opts)  # lowered to the chunked path
    assert o.shape == (2, 70, 2, 24 + 16) and final.shape == (2, 2, 16, 24 + 16)
    s_in = rng.standard_normal((2, 2, 16, 24))
    want_o, want_s = kda_oracle(*(np.asarray(a, np.float64) for a in c.args), **{**c.kwargs, "initial_state": s_in})
    local, transition = np.asarray(final[..., :24], np.float64), np.asarray(final[..., 24:], np.float64)
    assert rel_err(transition @ s_in + local, want_s) < 1e-5
    queries = np.asarray(o[..., 24:], np.float64)
    corrected = np.asarray(o[..., :24], np.float64) + np.einsum("bthk,bhkv->bthv", queries, s_in)
    assert rel_err(corrected, want_o) < 1e-5


def test_transition_columns_refuse_an_initial_state(case):
    c = case(B=1, T=20, H=1, K=16, V=16, gate="given")
    x, opts = normalized(c)
    with pytest.raises(ValueError, match="initial_state must be None"):
        jax.jit(kda_prefill_inner_run, static_argnums=1)(x, dataclasses.replace(opts, transition_columns=True))


def shapes(B, T, HV, K=128, V=128, H=None):
    spec = jax.ShapeDtypeStruct
    H = H or HV
    return api.KDAOperands(spec((B, T, H, K), jnp.bfloat16), spec((B, T, H, K), jnp.bfloat16),
                           spec((B, T, HV, V), jnp.bfloat16), spec((B, T, HV, K), jnp.bfloat16),
                           spec((B, T, HV), jnp.bfloat16))


SOFTPLUS_GATE = lambda hv: dict(use_gate_in_kernel=True, A_log=jnp.zeros((hv,)))  # the chunk-16 kernel's only
BOUNDED_GATE = lambda hv: dict(use_gate_in_kernel=True, lower_bound=-5.0)  # the two-pass kernel takes it


@pytest.mark.parametrize("B,T,HV,chunk16,two_pass", [
    # (pieces on the chunk-16 kernel; pieces and kernel where the two-pass kernel takes the call too)
    (1, 8192, 96, 1, (1, True)),  # case A: 96 chains already fill the GPU; the two-pass kernel is faster
    (1, 8192, 64, 1, (1, True)),  # case B
    (1, 32768, 32, 2, (1, True)),  # case E: 2 x 32 chains x 2 V-slices fill it; uncut two-pass is faster still
    (1, 2048, 32, 1, (1, True)),  # case F: the correction and the join cost more than the cut saves
    (1, 131072, 32, 2, (1, True)),  # case G
    (1, 65536, 8, 8, (8, True)),  # case I: 8 x 8 x 2 = 128 CTAs, one wave (two-pass: the two state slices)
    (1, 131072, 4, 16, (range(8, 17), True)),  # case J
    (1, 65536, 1, range(48, 65), (range(48, 65), True)),  # one long sequence, one head: tens of pieces
    (1, 300, 1, 1, (1, True)),  # too short to be worth a cut
    (1, 2000, 4, 6, (1, True)),  # 6 packed segments on the chunk-16 kernel; 63 steps of the two-pass one
])
def test_kernel_path_cuts_few_long_sequences(monkeypatch, B, T, HV, chunk16, two_pass):
    monkeypatch.setattr(paths, "multiprocessors", lambda: 132)  # an H200's (and an H100's)
    x = shapes(B, T, HV)
    _, opts = api.prefill_call(*x[:5], **SOFTPLUS_GATE(HV))
    plan = paths.kernel_plan(x, opts)
    assert plan.pieces in (chunk16 if isinstance(chunk16, range) else [chunk16]) and not plan.two_pass
    _, opts = api.prefill_call(*x[:5], **BOUNDED_GATE(HV))
    plan, (pieces, two_pass) = paths.kernel_plan(x, opts), two_pass
    assert plan.pieces in (pieces if isinstance(pieces, range) else [pieces]) and plan.two_pass == two_pass


def test_segments_of_one_length_run_as_a_batch_and_others_packed():
    assert segments.equal_segments(65536, 8) and segments.equal_segments(2000, 5)
    assert not segments.equal_segments(2000, 7)  # 288-token segments, the last one 272
    assert not segments.equal_segments(100, 8)  # 16-token segments: 7 of them
    x = shapes(1, 2000, 4)
    calls = []

    def run(x, opts):
        calls.append((x.q.shape, x.cu_seqlens is not None, opts.whole_sequences))
        return kda_chunked(x, opts)

    _, opts = api.prefill_call(*x[:5], **BOUNDED_GATE(4))
    for pieces, want in ((5, ((5, 400, 4, 128), False, True)), (7, ((1, 2000, 4, 128), True, True))):
        jax.eval_shape(lambda *a: segments.summarize(x._replace(q=a[0], k=a[1], v=a[2], g=a[3], beta=a[4]), opts,
                                                     run, pieces), *x[:5])
        assert calls.pop() == want


def packed_shapes(sequences, T, HV):
    return shapes(1, T, HV)._replace(cu_seqlens=jax.ShapeDtypeStruct((sequences + 1,), jnp.int32))


@pytest.mark.parametrize("sequences,T,HV,pieces,two_pass", [
    (2, 65536, 8, range(7, 9), True),  # planned as case I: a segment every ~8192 tokens, where one is that long
    (5, 131072, 4, range(8, 17), True),  # planned as case J
    (64, 65536, 8, 8, False),  # many sequences: 72 segments, more than the two-pass kernel's 64
    (1, 300, 4, 1, True),  # too short
    (4096, 131072, 32, 1, False),  # thousands of sequences: their summaries alone would take gigabytes
])
def test_kernel_path_plans_the_packed_cut(monkeypatch, sequences, T, HV, pieces, two_pass):
    monkeypatch.setattr(paths, "multiprocessors", lambda: 132)
    x = packed_shapes(sequences, T, HV)
    _, opts = api.prefill_call(*x[:5], use_gate_in_kernel=True, lower_bound=-5.0, cu_seqlens=x.cu_seqlens)
    plan = paths.kernel_plan(x, opts)
    assert plan.pieces in (pieces if isinstance(pieces, range) else [pieces]) and plan.two_pass == two_pass


WHOLE = 7.0  # what the spy's whole-sequence branch writes: tells the branches apart


def spy_run(x, opts):
    o, s = kda_chunked(x, opts)
    whole_branch = opts.whole_sequences and not opts.transition_columns  # not the segments' own prefill
    return (jnp.full_like(o, WHOLE), s) if whole_branch else (o, s)


@pytest.mark.parametrize("seqlens,cut", [
    ([600, 5, 0, 30], True),  # the longest is 4.7 segments of 128 tokens
    ([150, 140, 160, 155, 30], False),  # none past 160 = 128 / 0.8: whole sequences
])
def test_packed_cut_is_taken_on_the_device_where_a_sequence_is_long(case, seqlens, cut):
    c = case(seqlens=seqlens, H=2, K=32, V=32, gate="softplus")
    x, opts = normalized(c)
    pieces = 5  # segments of 128 tokens for these 635 tokens
    assert segments.segment_bounds(x.q.shape[1], pieces)[1] == 128
    split = jax.jit(segments.split_packed_prefill_where_long, static_argnums=(1, 2, 3, 4))
    o, s = split(x, opts, spy_run, pieces, paths.WORTH_IT)
    if cut:
        want_o, want_s = kda_chunked(x, opts)
        assert rel_err(o, want_o) < 1e-5 and rel_err(s, want_s) < 1e-5
    else:
        assert np.all(np.asarray(o) == WHOLE)
