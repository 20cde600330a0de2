"""The token-by-token KDA recurrence of docs/CONTRACT.md in float32: the package's own oracle.

One `lax.scan` step per token; slow on long sequences by design, exact in structure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import finish_state, prepare
from .options import KDAOperands, KDAOptions
from .packing import token_sequence_ids

_HIGHEST = jax.lax.Precision.HIGHEST


def _token_step(state, q, k, v, a, beta):
    """One token for every (lane, head): state `[..., K, V]`, vectors `[..., K]` or `[..., V]`."""
    state = jnp.exp(a)[..., :, None] * state
    residual = v - jnp.einsum("...kv,...k->...v", state, k, precision=_HIGHEST)
    state = state + k[..., :, None] * (beta[..., None] * residual)[..., None, :]
    out = jnp.einsum("...kv,...k->...v", state, q, precision=_HIGHEST)
    return state, out


def kda_token_step(x: KDAOperands, opts: KDAOptions):
    """One token (T = 1) for every sequence, as one `_token_step`: `(o, final_state)`. The decode
    step's XLA path, which XLA fuses into a few passes over the state."""
    p = prepare(x, opts)
    state, o = _token_step(p.initial_state, p.q[:, 0], p.k[:, 0], p.v[:, 0], p.a[:, 0], p.beta[:, 0])
    return o[:, None].astype(x.q.dtype), finish_state(state, opts)


def kda_reference(x: KDAOperands, opts: KDAOptions):
    """Returns `(o, final_state)`; final_state is None unless `opts.output_final_state`."""
    p = prepare(x, opts)
    seq_first = lambda t: jnp.moveaxis(t, 1, 0)  # scan over time
    xs = tuple(map(seq_first, (p.q, p.k, p.v, p.a, p.beta)))
    num_tokens = x.q.shape[1]

    if x.cu_seqlens is None:

        def step(state, inputs):
            return _token_step(state, *inputs)

        final, out = jax.lax.scan(step, p.initial_state, xs)
    else:
        # B == 1: the carried state is the current sequence's; it restarts at every sequence start.
        seq = token_sequence_ids(x.cu_seqlens, num_tokens)
        starts = jnp.arange(num_tokens) == x.cu_seqlens[seq]

        def step(carry, inputs):
            state, finals = carry
            n, start, *token = inputs
            state = jnp.where(start, p.initial_state[n][None], state)
            state, out = _token_step(state, *token)
            finals = jax.lax.dynamic_update_index_in_dim(finals, state[0], n, 0)
            return (state, finals), out

        carry0 = (jnp.zeros_like(p.initial_state[:1]), p.initial_state)
        (_, final), out = jax.lax.scan(step, carry0, (seq, starts) + xs)

    o = jnp.moveaxis(out, 0, 1).astype(x.q.dtype)
    return o, (finish_state(final, opts) if opts.output_final_state else None)
