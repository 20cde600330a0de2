"""Index arithmetic for packed batches (`cu_seqlens`), traceable so that it works under `jit`.

The chunked path needs every sequence to start on a chunk boundary. `ChunkLayout` maps the packed
tokens into a padded stream where sequence n occupies whole chunks; the number of chunks has the
static bound `(T + N * (C - 1)) // C`, since each sequence wastes fewer than C slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def token_sequence_ids(cu_seqlens: jax.Array, num_tokens: int) -> jax.Array:
    """Index of the sequence that owns each token, `[T]` (empty sequences own none)."""
    t = jnp.arange(num_tokens, dtype=cu_seqlens.dtype)
    return jnp.searchsorted(cu_seqlens[1:], t, side="right").astype(jnp.int32)


class ChunkLayout(NamedTuple):
    gather: jax.Array  # [P] packed token behind each padded slot (clamped where invalid)
    valid: jax.Array  # [P] slot holds a real token
    chunk_sequence: jax.Array  # [P // C] owning sequence of each chunk; N for trailing unused chunks
    chunk_starts_sequence: jax.Array  # [P // C] chunk is its sequence's first
    scatter: jax.Array  # [T] padded slot of each packed token


def chunk_layout(cu_seqlens: jax.Array, num_tokens: int, chunk: int) -> ChunkLayout:
    cu = cu_seqlens  # int32: jax_kda.call casts it once
    n = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    chunks = (lengths + chunk - 1) // chunk
    first_chunk = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(chunks, dtype=jnp.int32)])
    num_chunks = max((num_tokens + n * (chunk - 1)) // chunk, 1)

    c = jnp.arange(num_chunks, dtype=jnp.int32)
    seq = jnp.searchsorted(first_chunk[1:], c, side="right").astype(jnp.int32)  # N past the end
    seq_c = jnp.minimum(seq, max(n - 1, 0))
    slot = jnp.arange(num_chunks * chunk, dtype=jnp.int32)
    slot_seq = jnp.repeat(seq, chunk)
    slot_seq_c = jnp.repeat(seq_c, chunk)
    local = slot - first_chunk[slot_seq_c] * chunk
    valid = (slot_seq < n) & (local < lengths[slot_seq_c])
    gather = jnp.clip(cu[slot_seq_c] + local, 0, max(num_tokens - 1, 0))

    token_seq = token_sequence_ids(cu, num_tokens)
    scatter = first_chunk[token_seq] * chunk + jnp.arange(num_tokens, dtype=jnp.int32) - cu[token_seq]
    return ChunkLayout(
        gather=gather,
        valid=valid,
        chunk_sequence=seq,
        chunk_starts_sequence=(seq < n) & (c == first_chunk[seq_c]),
        scatter=scatter,
    )
