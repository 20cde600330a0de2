"""Chunk-parallel KDA in pure JAX (the `xla` path): the CPU path and the GPU fallback.

Each chunk of `CHUNK` tokens is solved with the chunked form of SPEC.md; a `lax.scan` carries the
`K x V` state from chunk to chunk for every (sequence, head) at once, so the serial depth is T / CHUNK.

Numerics: the pairwise decay exp(Γ_i - Γ_j) (per key channel) is never split into a large and a small
factor. Within a chunk the rows are cut into sub-blocks of `SUB` tokens; for a row of sub-block I and a
column before it, the ratio is factored around the first row of I, which lies between the two, so
both factors are <= 1. Pairs inside one sub-block use the exact pairwise exponent. Every exponent is
therefore <= 0, so any gate (the unbounded softplus gate, -1000, exactly 0) stays finite; and each is
summed directly over the tokens it spans, so a large decay never cancels in a difference of prefix sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import finish_state, prepare
from .options import KDAOperands, KDAOptions
from .packing import chunk_layout

CHUNK = 64
SUB = 16

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _suffix_sum(a, axis=-2):
    """Σ_{s > i} a_s along `axis` (exclusive), summed from the end so that no large sums cancel."""
    incl = jnp.flip(jnp.cumsum(jnp.flip(a, axis), axis=axis), axis)
    tail = jax.lax.slice_in_dim(incl, 1, None, axis=axis)
    return jnp.concatenate([tail, jnp.zeros_like(jax.lax.slice_in_dim(incl, 0, 1, axis=axis))], axis=axis)


def _decayed_scores(x, k, a):
    """S[..., n, i, j] = Σ_d x[..., n, i, d] k[..., j, d] exp(Σ_{j<s<=i} a_s[d]) for j <= i, else 0.

    x: `[..., n, C, K]` (n row sets sharing k and a); k, a: `[..., C, K]`.
    """
    *lead, n, c, d = x.shape
    nb = c // SUB
    ab = a.reshape(*lead, nb, SUB, d)

    # Columns before the row's sub-block I, factored around I's first row s_I:
    # the row factor spans (s_I, i], the column factor (j, s_I].
    rows_exp = jnp.cumsum(ab.at[..., :, 0, :].set(0.0), axis=-2)  # [..., nb, SUB, K]
    rows = x.reshape(*lead, n, nb, SUB, d) * jnp.exp(rows_exp)[..., None, :, :, :]
    anchors = jnp.arange(nb)[:, None] * SUB
    upto_anchor = jnp.arange(c)[None, :] <= anchors  # [nb, C]
    cols_exp = _suffix_sum(jnp.where(upto_anchor[:, :, None], a[..., None, :, :], 0.0))  # [..., nb, C, K]
    before = (jnp.arange(c)[None, :] < anchors)[:, :, None]
    cols = k[..., None, :, :] * jnp.where(before, jnp.exp(jnp.where(before, cols_exp, 0.0)), 0.0)
    off = _mm("...xibd,...icd->...xibc", rows, cols)  # [..., n, nb, SUB, C]

    # Columns inside the row's sub-block: the exact exponent of every pair.
    idx = jnp.arange(SUB)
    between = (idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] <= idx[:, None, None])  # [i, j, s]
    pair_exp = _mm("ijs,...bsd->...bijd", between.astype(a.dtype), ab)  # [..., nb, i, j, K]
    causal = jnp.tril(jnp.ones((SUB, SUB), bool))[:, :, None]
    pair_decay = jnp.where(causal, jnp.exp(jnp.where(causal, pair_exp, 0.0)), 0.0)
    xb = x.reshape(*lead, n, nb, SUB, d)
    kb = k.reshape(*lead, nb, SUB, d)
    diag = _mm("...xird,...icd,...ircd->...xirc", xb, kb, pair_decay)  # [..., n, nb, SUB, SUB]

    on_diagonal = jnp.eye(nb, dtype=x.dtype)[:, None, :, None]
    full = off.reshape(*lead, n, nb, SUB, nb, SUB) + on_diagonal * diag[..., :, :, None, :]
    return full.reshape(*lead, n, c, c)


def _unit_lower_inverse(l):
    """(I + L)^-1 for strictly lower-triangular L `[..., n, n]` (n a power of two), by merging the
    inverses of diagonal blocks of doubling size: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].

    Batched matrix products only: unlike a triangular solve (LAPACK on the CPU) it runs inside loops
    on several host devices at once, where XLA:CPU's LAPACK call hangs in jaxlib 0.10.
    """
    *lead, n, _ = l.shape
    blocks = jnp.ones((*lead, n, 1, 1), l.dtype)  # inverses of the diagonal blocks, size 1 first
    size = 1
    while size < n:
        pairs = n // (2 * size)
        lr = l.reshape(*lead, pairs, 2, size, pairs, 2, size)
        below = jnp.einsum("...jxjy->...jxy", lr[..., :, 1, :, :, 0, :])  # block under each diagonal pair
        upper, lower = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        corner = -_mm("...ab,...bc,...cd->...ad", lower, below, upper)
        top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
        blocks = jnp.concatenate([top, jnp.concatenate([corner, lower], axis=-1)], axis=-2)
        size *= 2
    return blocks[..., 0, :, :]


def _chunk_step(state, q, k, v, a, beta):
    """One chunk for every (lane, head). state `[..., K, V]`; q, k, a `[..., C, K]`; v `[..., C, V]`;
    beta `[..., C]`. Returns (next state, output `[..., C, V]`)."""
    kd = k.shape[-1]
    scores = _decayed_scores(jnp.stack([q, k], axis=-3), k, a)
    a_qk = scores[..., 0, :, :]
    l_kk = jnp.tril(scores[..., 1, :, :], -1) * beta[..., :, None]

    # (I + L)^-1 applied to [β K exp Γ | β V].
    decay = jnp.exp(jnp.cumsum(a, axis=-2))  # from the chunk's start
    rhs = jnp.concatenate([beta[..., None] * k * decay, beta[..., None] * v], axis=-1)
    sol = _mm("...ij,...jn->...in", _unit_lower_inverse(l_kk), rhs)
    w, u0 = sol[..., :kd], sol[..., kd:]

    u = u0 - _mm("...ck,...kv->...cv", w, state)
    out = _mm("...ck,...kv->...cv", q * decay, state) + _mm("...ij,...jv->...iv", a_qk, u)
    to_end = jnp.exp(_suffix_sum(a))  # from each token to the chunk's end
    state = decay[..., -1, :, None] * state + _mm("...ck,...cv->...kv", k * to_end, u)
    return state, out


def _to_chunks(x, num_chunks):
    """`[L, P, HV, ...]` with P = num_chunks * CHUNK to scan-major `[num_chunks, L * HV, CHUNK, ...]`.

    Lanes and heads share one axis: besides being what the step wants, this keeps size-1 axes out of
    the leading dimensions, which XLA:CPU's YNN fusions in jaxlib 0.10 crash on under autodiff.
    """
    lanes, _, hv, *rest = x.shape
    x = x.reshape(lanes, num_chunks, CHUNK, hv, *rest)
    return jnp.moveaxis(x, (1, 3), (0, 2)).reshape(num_chunks, lanes * hv, CHUNK, *rest)


def _from_chunks(x, lanes):
    """Inverse of `_to_chunks` for the output: `[num_chunks, L * HV, CHUNK, V]` to `[L, P, HV, V]`."""
    num_chunks, _, _, vd = x.shape
    x = x.reshape(num_chunks, lanes, -1, CHUNK, vd)
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(lanes, num_chunks * CHUNK, -1, vd)


def kda_chunked(x: KDAOperands, opts: KDAOptions):
    """Returns `(o, final_state)`; final_state is None unless `opts.output_final_state`."""
    p = prepare(x, opts)
    num_tokens = x.q.shape[1]
    tokens = (p.q, p.k, p.v, p.a, p.beta)
    step = jax.checkpoint(_chunk_step)  # backward keeps one state per chunk, not the intermediates
    n, hv, kd, vd = p.initial_state.shape

    if x.cu_seqlens is None:
        num_chunks = -(-num_tokens // CHUNK)
        pad = num_chunks * CHUNK - num_tokens
        # Padding tokens have k = v = beta = 0 and a = 0: they leave the state unchanged.
        tokens = [jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in tokens]
        final, out = jax.lax.scan(
            lambda s, xs: step(s, *xs),
            p.initial_state.reshape(n * hv, kd, vd),
            tuple(_to_chunks(t, num_chunks) for t in tokens),
        )
        final = final.reshape(n, hv, kd, vd)
        o = _from_chunks(out, n)[:, :num_tokens]
    else:  # B == 1: one lane whose state restarts at every sequence's first chunk
        layout = chunk_layout(x.cu_seqlens, num_tokens, CHUNK)
        num_chunks = layout.chunk_sequence.shape[0]

        def to_layout(t):
            t = t[:, layout.gather]
            return jnp.where(layout.valid.reshape((1, -1) + (1,) * (t.ndim - 2)), t, 0.0)

        tokens = tuple(_to_chunks(to_layout(t), num_chunks) for t in tokens)

        def scan_step(carry, xs):
            state, finals = carry
            seq, starts, *chunk = xs
            state = jnp.where(starts, p.initial_state[jnp.minimum(seq, n - 1)], state)
            state, out = step(state, *chunk)
            # Slot n collects the unused trailing chunks.
            finals = jax.lax.dynamic_update_index_in_dim(finals, state, seq, 0)
            return (state, finals), out

        spare = jnp.zeros_like(p.initial_state[:1])
        carry0 = (spare[0], jnp.concatenate([p.initial_state, spare]))
        (_, finals), out = jax.lax.scan(
            scan_step, carry0, (layout.chunk_sequence, layout.chunk_starts_sequence) + tokens
        )
        final = finals[:n]
        o = _from_chunks(out, 1)[:, layout.scatter]

    o = o.astype(x.q.dtype)
    return o, (finish_state(final, opts) if opts.output_final_state else None)
