"""Splitting a sequence into segments that run in parallel: the affine segment summary.

A segment's effect on the recurrent state is affine: S_out = Φ S_in + S_local, with Φ the K x K
product of the segment's per-token transitions and S_local the state it reaches from zero. One
prefill with *transition columns* (`KDAOptions.transition_columns`: v gains K zero columns whose
state starts from the identity) yields both for every segment at once, and its outputs carry, beside
the outputs from a zero state, the "effective queries" scale * q̂_tᵀ Φ_t (Φ_t: the transitions from
the segment's start to token t). The true outputs follow without a second pass:

    o_t = o_local_t + (scale q̂_tᵀ Φ_t) S_entry,

where S_entry, the state entering the segment, comes from the summaries of the segments before it,
composed in fp32 by an associative scan (log depth in the number of segments, independent of T).

The correction is a kernel on GPUs (`jax_kda.cuda.correct_segments`) and XLA elsewhere. Used two
ways: on one GPU, when a few long sequences would leave most multiprocessors idle (one kernel chain
per (sequence, head)), each sequence is cut into pieces, run as B x pieces sequences when they are of
one length, else packed as `cu_seqlens` (in a packed batch, `cu_seqlens` known only on the device,
each sequence is cut every so many tokens, so only the long ones are cut); and for context
parallelism (`jax_kda.sharding`), where the segments live on different devices.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .activations import finish_state, initial_state_kv
from .options import KDAOperands, KDAOptions

_HIGHEST = jax.lax.Precision.HIGHEST
_ALIGN = 16  # the kernels' chunk: segment boundaries on chunk boundaries keep every chunk full


class Summaries(NamedTuple):
    """A prefill of every sequence cut into `len(bounds) - 1` segments, each from a zero state."""

    o_aug: jax.Array  # [B, T, HV, V + K]: outputs from a zero state, then the effective queries
    local: jax.Array  # [B, P, HV, K, V] float32, state reached from zero
    transition: jax.Array  # [B, P, HV, K, K] float32, Φ of the whole segment
    bounds: tuple[int, ...]  # token offsets of the segments within each sequence, 0 ... T


def segment_bounds(tokens: int, pieces: int) -> tuple[int, ...]:
    """Offsets cutting `tokens` into at most `pieces` segments of whole chunks (the last may be short)."""
    step = -(-tokens // pieces)
    step = -(-step // _ALIGN) * _ALIGN
    cuts = sorted({min(i * step, tokens) for i in range(pieces)} | {tokens})
    return tuple(cuts)


def equal_segments(tokens: int, pieces: int) -> bool:
    """Whether `segment_bounds` cuts `tokens` into `pieces` segments of one length: the segments of B
    sequences then run as B x pieces sequences, not packed."""
    bounds = segment_bounds(tokens, pieces)
    return len(bounds) - 1 == pieces and tokens % bounds[1] == 0


def summarize(x: KDAOperands, opts: KDAOptions, run, pieces: int) -> Summaries:
    """One prefill of the `pieces` segments of each of the B sequences of `x` (no `cu_seqlens`, no
    initial state), all starting from zero, through `run(x, opts) -> (o, final_state)`."""
    if x.cu_seqlens is not None or x.initial_state is not None:
        raise ValueError("segment summaries take unpacked sequences without an initial state")
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    bounds = segment_bounds(t, pieces)
    p = len(bounds) - 1
    run_opts = _summary_opts(opts)
    if p == 1:
        o, final = run(x, run_opts)
    else:  # the segments of all sequences as one batch: of B x P sequences when equal, else packed
        equal = equal_segments(t, p)
        flat = lambda a: a.reshape(((b * p, t // p) if equal else (1, b * t)) + a.shape[2:])
        batch = x._replace(q=flat(x.q), k=flat(x.k), v=flat(x.v), g=flat(x.g), beta=flat(x.beta),
                           cu_seqlens=None if equal else jnp.asarray(packed_bounds(bounds, b, t)))
        o, final = run(batch, run_opts)
        o = o.reshape((b, t) + o.shape[2:])
    final = final.reshape(b, p, hv, kd, vd + kd)
    return Summaries(o, final[..., :vd], final[..., vd:], bounds)


def packed_bounds(bounds: tuple[int, ...], batch: int, tokens: int) -> np.ndarray:
    """`cu_seqlens` (int32) of the segments of `batch` sequences of `tokens` tokens laid end to end."""
    starts = np.asarray(bounds[:-1])[None, :] + tokens * np.arange(batch)[:, None]
    return np.append(starts.reshape(-1), batch * tokens).astype(np.int32)


def advance(transition: jax.Array, local: jax.Array, state: jax.Array) -> jax.Array:
    """The state after a segment entered with `state`: Φ S + S_local (per sequence and head)."""
    return jnp.einsum("...ij,...jv->...iv", transition, state, precision=_HIGHEST) + local


def _then(first, second):
    """The summary (Φ, S_local) of segment(s) `first` followed by `second`."""
    (t1, l1), (t2, l2) = first, second
    return jnp.einsum("...ij,...jk->...ik", t2, t1, precision=_HIGHEST), advance(t2, l2, l1)


def running(transition: jax.Array, local: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The summaries of segments 0..j taken as one, for every j along `axis`, in log depth (fp32): a few
    batched products however many segments there are, not one small product per segment."""
    return jax.lax.associative_scan(_then, (transition, local), axis=axis)


def entry_states(transition: jax.Array, local: jax.Array, initial: jax.Array, axis: int):
    """The state entering each segment along `axis` when the first is entered with `initial` (the
    segments' axis absent), and the state after the last: `(entries, final)`."""
    transition, local = running(transition, local, axis)
    after = advance(transition, local, jnp.expand_dims(initial, axis))  # the state after segments 0..j
    before_last = jax.lax.slice_in_dim(after, 0, after.shape[axis] - 1, axis=axis)
    entries = jnp.concatenate([jnp.expand_dims(initial, axis), before_last], axis=axis)
    return entries, jnp.take(after, after.shape[axis] - 1, axis=axis)


def combined(s: Summaries) -> tuple[jax.Array, jax.Array]:
    """(local, transition) of all segments of each sequence taken as one: `[B, HV, K, V]`, `[B, HV, K, K]`."""
    transition, local = running(s.transition, s.local, axis=1)
    return local[:, -1], transition[:, -1]


def correct_xla(o_aug: jax.Array, entries: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
    """o = o_local + q_eff S_entry per segment, in XLA. o_aug `[B, T, HV, V + K]`; entries, the state
    entering each segment, `[B, P, HV, K, V]` float32. Returns `[B, T, HV, V]` in o_aug's dtype."""
    vd = entries.shape[-1]
    pieces = []
    for j, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        # Default precision: TF32 on Hopper, finer than the bf16 the queries arrive in.
        queries = o_aug[:, start:stop, :, vd:].astype(jnp.float32)
        correction = jnp.einsum("bthk,bhkv->bthv", queries, entries[:, j])
        pieces.append((o_aug[:, start:stop, :, :vd].astype(jnp.float32) + correction).astype(o_aug.dtype))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


# Up to this many segments the cut's join folds them in turn: on an H200 (2026-12-02, sixth session) the
# fold's P dependent products took 0.04 (8 segments) and 0.06 ms (16) less than the scan; beyond, the
# log-depth scan, whose chain does not lengthen with the segments.
FOLD_MAX_SEGMENTS = 16


def folded_entry_states(transition: jax.Array, local: jax.Array, initial: jax.Array):
    """`entry_states` along axis 1 by folding the segments in turn (S_j+1 = Phi_j S_j + L_j): P dependent
    products and no running Phi products, which the cut on one GPU does not need."""
    states = [initial]
    for j in range(transition.shape[1]):
        states.append(advance(transition[:, j], local[:, j], states[-1]))
    return jnp.stack(states[:-1], axis=1), states[-1]


def finish(s: Summaries, entry: jax.Array, correct=correct_xla) -> tuple[jax.Array, jax.Array]:
    """The outputs `[B, T, HV, V]` and the final state `[B, HV, K, V]` (float32) when the sequences
    enter their first segment with state `entry` `[B, HV, K, V]` (float32). `correct` is `correct_xla`
    or a kernel with its signature."""
    if s.transition.shape[1] <= FOLD_MAX_SEGMENTS:
        entries, final = folded_entry_states(s.transition, s.local, entry)
    else:
        entries, final = entry_states(s.transition, s.local, entry, axis=1)
    return correct(s.o_aug, entries, s.bounds), final


def _summary_opts(opts: KDAOptions) -> KDAOptions:
    """The options of the prefill that yields the segments' summaries (each segment run whole)."""
    return dataclasses.replace(opts, transition_columns=True, output_final_state=True, state_v_first=False,
                               final_state_dtype="float32", whole_sequences=True)


def split_prefill(x: KDAOperands, opts: KDAOptions, run, pieces: int, correct=correct_xla):
    """A prefill of unpacked sequences cut into `pieces` segments each, all run at once through `run`;
    returns `(o, final_state or None)` as the uncut prefill would."""
    s = summarize(x._replace(initial_state=None), opts, run, pieces)
    o, final = finish(s, initial_state_kv(x, opts), correct)
    return o, (finish_state(final, opts) if opts.output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Packed batches: `cu_seqlens` lives on the device, so the cut is a rule, not a list: every sequence
# is cut every `step` tokens from its own start. Sequences shorter than `step` stay whole; the
# segments are at most N + T / step, padded with empty ones at the end to that static count.


class PackedCut(NamedTuple):
    cu: jax.Array  # [S + 1] int32: the segments' bounds in the packed tokens (empty ones at the end)
    sequence: jax.Array  # [S] int32: the sequence each segment belongs to (the last one for padding)
    first: jax.Array  # [S] bool: the segment starts its sequence
    last: jax.Array  # [N] int32: each sequence's last segment


def packed_segments(sequences: int, tokens: int, pieces: int) -> int:
    """The segments (a static count, padded with empty ones) of `sequences` packed sequences of `tokens`
    tokens in all, each cut every T / `pieces` tokens (`segment_bounds`' step)."""
    return sequences + -(-tokens // segment_bounds(tokens, pieces)[1])


def cut_packed(cu_seqlens: jax.Array, tokens: int, step: int, max_segments: int) -> PackedCut:
    """Each sequence of `cu_seqlens` (N + 1 offsets into `tokens`) cut every `step` tokens, as
    `max_segments` segments (at least N + tokens // step)."""
    cu = cu_seqlens.astype(jnp.int32)
    n = cu.shape[0] - 1
    counts = jnp.maximum(1, -(-(cu[1:] - cu[:-1]) // step))  # an empty sequence keeps one empty segment
    ends = jnp.cumsum(counts)
    index = jnp.arange(max_segments, dtype=jnp.int32)
    owner = jnp.searchsorted(ends, index, side="right").astype(jnp.int32)  # N for the padding
    real = owner < n
    sequence = jnp.minimum(owner, n - 1)
    within = index - (ends - counts)[sequence]
    starts = jnp.where(real, cu[sequence] + within * step, tokens)
    return PackedCut(jnp.append(starts, jnp.int32(tokens)), sequence, real & (within == 0), ends - 1)


def packed_entry_states(transition: jax.Array, local: jax.Array, cut: PackedCut, initial: jax.Array):
    """The state entering each segment `[S, HV, K, V]` and each sequence's final state `[N, HV, K, V]`
    from the segments' summaries `[S, HV, K, K]`, `[S, HV, K, V]` and the sequences' initial states:
    the running summaries restart at each sequence's first segment (a segmented scan, log depth)."""

    def then(earlier, later):
        t, l = _then(earlier[:2], later[:2])
        restart = later[2][:, None, None, None]
        return jnp.where(restart, later[0], t), jnp.where(restart, later[1], l), earlier[2] | later[2]

    transition, local, _ = jax.lax.associative_scan(then, (transition, local, cut.first))
    start = initial[cut.sequence]
    after = advance(transition, local, start)  # the state after each segment
    entries = jnp.where(cut.first[:, None, None, None], start, jnp.roll(after, 1, axis=0))
    return entries, after[cut.last]


def correct_packed_xla(o_aug: jax.Array, entries: jax.Array, cu: jax.Array) -> jax.Array:
    """o = o_local + q_eff S_entry with the segments given on the device: o_aug `[1, T, HV, V + K]`,
    entries `[S, HV, K, V]` float32, cu `[S + 1]`. Gathers each token's entering state (T x HV x K x V
    floats): for checks on small inputs; the kernels' path corrects with `jax_kda.cuda`'s kernel."""
    b, t, hv, width = o_aug.shape
    vd = entries.shape[-1]
    segment = jnp.clip(jnp.searchsorted(cu, jnp.arange(b * t), side="right") - 1, 0, entries.shape[0] - 1)
    queries = o_aug[..., vd:].reshape(b * t, hv, width - vd).astype(jnp.float32)
    correction = jnp.einsum("thk,thkv->thv", queries, entries[segment], precision=_HIGHEST)
    local = o_aug[..., :vd].reshape(b * t, hv, vd).astype(jnp.float32)
    return (local + correction).astype(o_aug.dtype).reshape(b, t, hv, vd)


def split_packed_prefill(x: KDAOperands, opts: KDAOptions, run, pieces: int, correct=correct_packed_xla):
    """A prefill of packed sequences (`x.cu_seqlens`) where each sequence is cut every T / `pieces`
    tokens (whole chunks), all segments run at once through `run`; returns `(o, final_state or None)`
    as the uncut prefill would. `correct(o_aug, entries, cu)` is `correct_packed_xla` or a kernel."""
    t, vd, kd = x.q.shape[1], x.v.shape[3], x.q.shape[3]
    cut = cut_packed(x.cu_seqlens, t, segment_bounds(t, pieces)[1], packed_segments(x.num_sequences, t, pieces))
    o_aug, final = run(x._replace(cu_seqlens=cut.cu, initial_state=None), _summary_opts(opts))
    # An empty segment (an empty sequence, or the padding) leaves the state as it was.
    empty = (cut.cu[1:] == cut.cu[:-1])[:, None, None, None]
    transition = jnp.where(empty, jnp.eye(kd, dtype=jnp.float32), final[..., vd:])
    local = jnp.where(empty, 0.0, final[..., :vd])
    entries, states = packed_entry_states(transition, local, cut, initial_state_kv(x, opts))
    o = correct(o_aug, entries, cut.cu)
    return o, (finish_state(states, opts) if opts.output_final_state else None)


def split_packed_prefill_where_long(x: KDAOperands, opts: KDAOptions, run, pieces: int, worth_it: float,
                                    correct=correct_packed_xla):
    """`split_packed_prefill` when the cut pays for this call's lengths, decided on the device: when its
    segment length is under `worth_it` times the longest sequence; else one prefill of the whole
    sequences (`run` with `opts.whole_sequences`)."""
    step = segment_bounds(x.q.shape[1], pieces)[1]
    longest = jnp.max(x.cu_seqlens[1:] - x.cu_seqlens[:-1])
    whole = dataclasses.replace(opts, whole_sequences=True)
    return jax.lax.cond(step < worth_it * longest, lambda x: split_packed_prefill(x, opts, run, pieces, correct),
                        lambda x: run(x, whole), x)
