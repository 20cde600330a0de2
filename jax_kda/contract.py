"""The kernels' contract, as the compiled extension states it (csrc/kda_contract.h).

Everything C++ and Python must agree on is defined once, in that header, and read here: the FFI target
names, the gate enum, the head sizes the kernels take, how a launch slices V, and the numeric constants
of the pre-processing (the L2-norm epsilon, the softplus threshold) that the pure-JAX paths use too.
The extension is always built (without CUDA it carries the contract and no kernels).
"""

from __future__ import annotations

try:
    from . import _kda_ext
except ImportError as error:  # a source tree that was never built
    raise ImportError(
        "jax_kda's compiled extension (jax_kda._kda_ext) is missing: this jax_kda was imported from a source "
        "tree that was not built. Install the package (`pip install .`, or `pip install -e .` to work on it)."
    ) from error

WITH_CUDA: bool = bool(_kda_ext.with_cuda)
PREFILL_TARGET: str = _kda_ext.prefill_target
SEGMENT_CORRECT_TARGET: str = _kda_ext.segment_correct_target
DECODE_TARGET: str = _kda_ext.decode_target
GATE_CODES: dict[str, int] = dict(_kda_ext.gate_codes)
L2NORM_EPS: float = float(_kda_ext.l2norm_eps)
SOFTPLUS_THRESHOLD: float = float(_kda_ext.softplus_threshold)

prefill_unsupported = _kda_ext.prefill_unsupported  # (head_dim_k, head_dim_v) -> reason or None
correct_unsupported = _kda_ext.correct_unsupported  # (head_dim_k, head_dim_v) -> reason or None
decode_unsupported = _kda_ext.decode_unsupported  # (head_dim_k, head_dim_v) -> reason or None
prefill_v_slice = _kda_ext.prefill_v_slice  # (sequences, value_heads, head_dim_v, multiprocessors) -> 64 or 128

# The two-pass chunk-32 prefill: the calls it takes, its windows and its workspace.
TWO_PASS_CHUNK: int = int(_kda_ext.two_pass_chunk)
TWO_PASS_FACTOR_BYTES: int = int(_kda_ext.two_pass_factor_bytes)  # one chunk of one chain
TWO_PASS_OVERLAP_BUDGET: int = int(_kda_ext.two_pass_overlap_budget)  # the factors' bytes, windows overlapped
TWO_PASS_SERIAL_BUDGET: int = int(_kda_ext.two_pass_serial_budget)  # the factors' bytes, passes one after the other
TWO_PASS_MAX_PACKED_SEQUENCES: int = int(_kda_ext.two_pass_max_packed_sequences)
TWO_PASS_SPLIT_MIN_CHUNKS: int = int(_kda_ext.two_pass_split_min_chunks)  # one window cut in two from here
# One window streams (both passes at once) while the state pass takes at most this share of the GPU.
TWO_PASS_STREAMED_SHARE_PERCENT: int = int(_kda_ext.two_pass_streamed_share_percent)
two_pass_unsupported = _kda_ext.two_pass_unsupported  # (k, v, packed, sequences, gate, lower_bound,
#                                                        plain_inputs, fp32_states) -> reason or None
two_pass_serial = _kda_ext.two_pass_serial  # (state_ctas, multiprocessors) -> the passes one after the other
# (sequences, tokens, value_heads, packed, carried_columns, serial)
#   -> dict(serial, window, windows, items, buffers, buffer, carry, plan, flags, flag_count, bytes)
two_pass_layout = _kda_ext.two_pass_layout
# (sequences, tokens, value_heads, packed, state_ctas, multiprocessors)
#   -> dict(streamed, overlapped, buffers, window, windows, buffer)
two_pass_schedule = _kda_ext.two_pass_schedule


def cuda_registrations() -> dict:
    """FFI target name -> handler capsule for the CUDA platform (empty without the kernels)."""
    return _kda_ext.cuda_registrations()
