"""Chunk-parallel KDA in pure JAX (the `xla` path): the CPU path and the GPU fallback.

Each chunk of `chunk` tokens (`CHUNK` on GPUs, `CPU_CHUNK` on CPUs) is solved with the chunked form of
docs/CONTRACT.md; a `lax.scan` carries the `K x V` state from chunk to chunk for every (sequence, head) at
once, so the serial depth is T / chunk.

Numerics: no decay is the exponential of a difference of log-decay sums. Every token contributes its
factor exp(a_t) in [0, 1], and every decay between two tokens is a product of these factors over
exactly the tokens it spans: the decays to the chunk's start and end, and the pairwise decay of the
chunk's matrices, split once, at a block boundary between the two tokens, into two such products.
Every exponent is therefore <= 0 and nothing cancels, so any gate (the unbounded softplus gate,
-1000, exactly 0) stays finite and exact to rounding; a product underflows only where the decay it
stands for is below the smallest float. A log-decay of -inf (a softplus gate driven there, too) is
a complete decay: its factor is exactly 0, every product across it is exactly 0, and as no
log-decays are ever added or subtracted, no inf - inf arises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import finish_state, prepare
from .options import KDAOperands, KDAOptions
from .packing import chunk_layout

CHUNK = 64  # GPUs
# CPUs (docs/PERFLOG.md, CPU section): the state-independent work per token grows with the chunk, the
# per-step overhead shrinks. On a 2-core x86 box, 8 ran 15-25% faster than 16 at 32 heads of 128 x 128
# and within 7% of it at 8 heads.
CPU_CHUNK = 8
# Below this many float32 state elements over all chains (256 KB), the token scan's state stays in
# the caches of a 2-core x86 box (512 KB L2 per core) and the scan beats the chunked path there.
_CPU_SCAN_STATE_ELEMENTS = 2**16

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _lower_blocks(upper_left, lower_left, lower_right):
    """`[[upper_left, 0], [lower_left, lower_right]]` from three `[..., h, h]` blocks."""
    top = jnp.concatenate([upper_left, jnp.zeros_like(upper_left)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([lower_left, lower_right], axis=-1)], axis=-2)


def _products_through(decay):
    """Π decay_s for s from the first token (axis -2) through each token."""
    return jnp.cumprod(decay, axis=-2)


def _products_after(decay):
    """Π decay_s for s after each token (axis -2) through the last."""
    through = jnp.flip(jnp.cumprod(jnp.flip(decay, -2), axis=-2), -2)
    return jnp.concatenate([through[..., 1:, :], jnp.ones_like(decay[..., :1, :])], axis=-2)


def _chunk_matrices(q, k, decay, beta):
    """The state-independent matrices of one chunk, by doubling blocks from one token to C.

    q, k, decay `[..., C, K]` (decay: the per-token factors exp(a) in [0, 1]), beta `[..., C]`; C a power
    of two. With D(j, i] = Π_{j<s<=i} decay_s (per channel), returns
      scores `[..., C, C]`: Σ_d q_i k_j D(j, i] for j <= i, else 0;
      inverse `[..., C, C]`: (I + L)^-1, L_ij = β_i Σ_d k_i k_j D(j, i] for j < i;
      from_start, to_end `[..., C, K]`: D(start, i] and D(i, end]; total `[..., K]`: the whole chunk's.
    Merging a left and a right block of h tokens, a cross pair (i right, j left) splits D(j, i] at the
    left block's last token m into D(j, m] and D(m, i], products within one block: both <= 1. The
    inverse merges as [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: batched matrix products
    only, which (unlike a triangular solve, LAPACK on the CPU) run inside loops on several host devices
    at once, where XLA:CPU's LAPACK call hangs in jaxlib 0.10.

    Each level takes its block products straight from the decays: carried from level to level they
    would form product trees that XLA:CPU fuses into every consumer, recomputed per element.
    """
    *lead, c, _ = k.shape
    scores = jnp.sum(q * k, axis=-1)[..., None, None]  # [..., C / h, h, h] diagonal blocks
    inverse = jnp.ones_like(scores)
    h = 1
    while h < c:
        halves = lambda t: t.reshape(*lead, c // (2 * h), 2, h, -1)  # tokens [..., C, n] or blocks
        (q_l, q_r), (k_l, k_r), (decay_l, decay_r) = (jnp.unstack(halves(t), axis=-3) for t in (q, k, decay))
        from_r, to_l = _products_through(decay_r), _products_after(decay_l)
        rows = jnp.concatenate([q_r * from_r, k_r * from_r], axis=-2)  # one product for both row sets
        cross = _mm("...ik,...jk->...ij", rows, k_l * to_l)
        cross_qk, cross_kk = cross[..., :h, :], cross[..., h:, :]

        (scores_l, scores_r), (inv_l, inv_r) = jnp.unstack(halves(scores), axis=-3), jnp.unstack(halves(inverse), axis=-3)
        scores = _lower_blocks(scores_l, cross_qk, scores_r)
        beta_r = beta.reshape(*lead, c // (2 * h), 2, h)[..., 1, :, None]
        inverse = _lower_blocks(inv_l, -_mm("...ab,...bc,...cd->...ad", inv_r, beta_r * cross_kk, inv_l), inv_r)
        h *= 2
    # The last level's halves make the whole chunk.
    from_l, to_r = _products_through(decay_l), _products_after(decay_r)
    total_l, total_r = from_l[..., -1:, :], from_r[..., -1:, :]
    from_start = jnp.concatenate([from_l, from_r * total_l], axis=-2).reshape(decay.shape)
    to_end = jnp.concatenate([to_l * total_r, to_r], axis=-2).reshape(decay.shape)
    return scores[..., 0, :, :], inverse[..., 0, :, :], from_start, to_end, (total_l * total_r)[..., 0, 0, :]


def _chunk_step(state, q, k, v, decay, beta):
    """One chunk for every (lane, head). state `[..., K, V]`; q, k, decay `[..., C, K]`; v `[..., C, V]`;
    beta `[..., C]`. Returns (next state, output `[..., C, V]`).

    A token with a non-finite k̂, v, decay or β would reach earlier outputs through the zeros of the
    triangular products (0 * NaN = NaN), so it runs as a padding token instead, and its output, every
    later one and the state leave as NaN (through the effective queries and the total decay). q̂ needs
    no such care: it reaches only its own output.
    """
    c, kd = k.shape[-2:]
    finite = lambda t: jnp.all(jnp.isfinite(t), axis=-1)  # (a max-reduction may drop NaNs on XLA:CPU)
    invalid = ~(finite(k) & finite(decay) & finite(v) & jnp.isfinite(beta))
    k, v, decay, beta = (
        jnp.where(invalid.reshape(invalid.shape + (1,) * (t.ndim - invalid.ndim)), pad, t)
        for t, pad in ((k, 0.0), (v, 0.0), (decay, 1.0), (beta, 0.0))
    )
    scores, inverse, from_start, to_end, total = _chunk_matrices(q, k, decay, beta)
    # (I + L)^-1 applied to [β K D(start, i] | β V]: U = u_local - W S.
    rhs = jnp.concatenate([beta[..., None] * k * from_start, beta[..., None] * v], axis=-1)
    sol = _mm("...ij,...jn->...in", inverse, rhs)
    w, u_local = sol[..., :kd], sol[..., kd:]
    # O = (Q D(start, i]) S + scores U = q_eff S + scores u_local: one product with S for W and q_eff.
    q_eff = q * from_start - _mm("...ij,...jk->...ik", scores, w)
    poisoned = jnp.cumsum(invalid, axis=-1, dtype=jnp.int32) > 0
    q_eff = jnp.where(poisoned[..., None], jnp.nan, q_eff)
    total = jnp.where(poisoned[..., -1:], jnp.nan, total)
    with_state = _mm("...ck,...kv->...cv", jnp.concatenate([w, q_eff], axis=-2), state)
    u = u_local - with_state[..., :c, :]
    out = _mm("...ij,...jv->...iv", scores, u_local) + with_state[..., c:, :]
    state = total[..., :, None] * state + _mm("...ck,...cv->...kv", k * to_end, u)
    return state, out


def _to_chunks(x, num_chunks):
    """`[L, P, HV, ...]` to scan-major `[num_chunks, L * HV, P / num_chunks, ...]`.

    Lanes and heads share one axis: besides being what the step wants, this keeps size-1 axes out of
    the leading dimensions, which XLA:CPU's YNN fusions in jaxlib 0.10 crash on under autodiff.
    """
    lanes, padded, hv, *rest = x.shape
    x = x.reshape(lanes, num_chunks, padded // num_chunks, hv, *rest)
    return jnp.moveaxis(x, (1, 3), (0, 2)).reshape(num_chunks, lanes * hv, padded // num_chunks, *rest)


def _from_chunks(x, lanes):
    """Inverse of `_to_chunks` for the output: `[num_chunks, L * HV, C, V]` to `[L, P, HV, V]`."""
    num_chunks, _, chunk, vd = x.shape
    x = x.reshape(num_chunks, lanes, -1, chunk, vd)
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(lanes, num_chunks * chunk, -1, vd)


def kda_chunked(x: KDAOperands, opts: KDAOptions, chunk: int = CHUNK):
    """Returns `(o, final_state)`; final_state is None unless `opts.output_final_state`.

    `chunk`: tokens per step of the serial scan, a power of two from 2 (`CHUNK` on GPUs, `CPU_CHUNK`
    on CPUs).
    """
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two from 2, got {chunk}")
    p = prepare(x, opts)
    num_tokens = x.q.shape[1]
    # Per-token inputs and the values that pad them: a padding token (k = v = β = 0, decay 1) leaves
    # the state unchanged. exp(-inf) = 0 is a complete decay.
    tokens, pads = (p.q, p.k, p.v, jnp.exp(p.a), p.beta), (0.0, 0.0, 0.0, 1.0, 0.0)
    step = jax.checkpoint(_chunk_step)  # backward keeps one state per chunk, not the intermediates
    n, hv, kd, vd = p.initial_state.shape

    if x.cu_seqlens is None:
        num_chunks = -(-num_tokens // chunk)
        pad = num_chunks * chunk - num_tokens
        tokens = [
            jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), constant_values=fill)
            for t, fill in zip(tokens, pads)
        ]
        final, out = jax.lax.scan(
            lambda s, xs: step(s, *xs),
            p.initial_state.reshape(n * hv, kd, vd),
            tuple(_to_chunks(t, num_chunks) for t in tokens),
        )
        final = final.reshape(n, hv, kd, vd)
        o = _from_chunks(out, n)[:, :num_tokens]
    else:  # B == 1: one lane whose state restarts at every sequence's first chunk
        layout = chunk_layout(x.cu_seqlens, num_tokens, chunk)
        num_chunks = layout.chunk_sequence.shape[0]

        def to_layout(t, fill):
            t = t[:, layout.gather]
            return jnp.where(layout.valid.reshape((1, -1) + (1,) * (t.ndim - 2)), t, fill)

        tokens = tuple(_to_chunks(to_layout(t, fill), num_chunks) for t, fill in zip(tokens, pads))

        def scan_step(carry, xs):
            state, finals = carry
            seq, starts, *chunk_tokens = xs
            state = jnp.where(starts, p.initial_state[jnp.minimum(seq, n - 1)], state)
            state, out = step(state, *chunk_tokens)
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


def scan_is_faster_on_cpu(num_tokens: int, chains: int, head_dim_k: int, head_dim_v: int) -> bool:
    """Whether the token scan (`reference`) beats the chunked path (at `CPU_CHUNK`) on a CPU, for
    `chains` independent recurrences (lanes x value heads: B * HV, or HV with `cu_seqlens`) of
    `num_tokens` tokens each (T) and a `head_dim_k x head_dim_v` state per chain.

    From measurements on a 2-core x86 box (docs/PERFLOG.md, CPU section): the scan wins when there is
    less than one chunk of tokens, or when the whole state is small enough to stay in the caches.
    """
    return num_tokens < CPU_CHUNK or chains * head_dim_k * head_dim_v < _CPU_SCAN_STATE_ELEMENTS
