"""The static half of a KDA call: every flag and scalar that selects what is computed.

`KDAOptions` is hashable so that it can travel as a primitive parameter and key caches; the arrays
travel separately as `KDAOperands`, with `None` for the optional inputs that are absent.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax

GATE_GIVEN = "given"  # g is already the log-decay
GATE_SOFTPLUS = "softplus"  # -exp(A_log) * softplus(g + dt_bias)
GATE_BOUNDED = "bounded"  # lower_bound * sigmoid(exp(A_log) * (g + dt_bias))

IMPLS = ("auto", "cuda", "xla", "reference")
DECODE_IMPLS = ("auto", "cuda", "xla")  # the decode step's: its kernel or the XLA token step


@dataclasses.dataclass(frozen=True)
class KDAOptions:
    scale: float
    use_qk_l2norm: bool
    gate: str
    lower_bound: Optional[float]
    safe_gate: bool
    use_beta_sigmoid: bool
    allow_neg_eigval: bool
    state_v_first: bool
    output_final_state: bool
    final_state_dtype: str
    impl: str
    # Internal (jax_kda.segments): v gains K zero columns whose state starts as the identity, so that
    # o and the final state also carry the effective queries and the transition of the sequence.
    transition_columns: bool = False
    # Internal (jax_kda.decode): one token per sequence, run by the decode kernel or the XLA token step
    # instead of the prefill's paths.
    decode_step: bool = False
    # Internal (jax_kda.segments): run each sequence whole, never cut into segments (the segments' own
    # prefill, and the branch of a packed call whose sequences the device found too short for the cut).
    whole_sequences: bool = False


class KDAOperands(NamedTuple):
    """The array inputs of one call, shapes as in docs/CONTRACT.md (dt_bias already `[HV, K]`)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array
    A_log: Optional[jax.Array] = None
    dt_bias: Optional[jax.Array] = None
    initial_state: Optional[jax.Array] = None
    cu_seqlens: Optional[jax.Array] = None

    def present(self) -> tuple[bool, ...]:
        """Which fields hold an array: with `flatten`/`unflatten`, how operands cross a primitive."""
        return tuple(x is not None for x in self)

    def flatten(self) -> list[jax.Array]:
        return [x for x in self if x is not None]

    @classmethod
    def unflatten(cls, present: tuple[bool, ...], arrays) -> "KDAOperands":
        it = iter(arrays)
        return cls(*(next(it) if p else None for p in present))

    @property
    def num_sequences(self) -> int:
        if self.cu_seqlens is not None:
            return self.cu_seqlens.shape[0] - 1
        return self.q.shape[0]
