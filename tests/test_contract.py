"""The kernels' contract (csrc/kda_contract.h, exported by the extension) against the Python side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from jax_kda import contract, options, paths
from jax_kda.activations import l2_normalize, softplus


def test_gate_enum_names_the_gate_modes():
    assert set(contract.GATE_CODES) == {options.GATE_GIVEN, options.GATE_SOFTPLUS, options.GATE_BOUNDED}
    assert len(set(contract.GATE_CODES.values())) == 3


def test_numeric_constants_are_the_contracts():
    # The C++ constants (float32) are the contract's, which the independent float64 oracle writes down.
    assert contract.L2NORM_EPS == np.float32(oracle.L2NORM_EPS)
    assert contract.SOFTPLUS_THRESHOLD == oracle.SOFTPLUS_THRESHOLD


def test_pure_jax_preprocessing_uses_the_contracts_constants():
    # A tiny vector's norm is dominated by the epsilon.
    x = jnp.full((4,), 1e-5, jnp.float32)
    want = 1e-5 / np.sqrt(4 * 1e-10 + contract.L2NORM_EPS)
    np.testing.assert_allclose(np.asarray(l2_normalize(x)), want, rtol=1e-6)
    assert float(softplus(jnp.float32(contract.SOFTPLUS_THRESHOLD + 0.5))) == contract.SOFTPLUS_THRESHOLD + 0.5


def test_target_names():
    assert contract.PREFILL_TARGET == "jax_kda_prefill_cuda"
    assert contract.SEGMENT_CORRECT_TARGET == "jax_kda_segment_correct_cuda"
    assert contract.DECODE_TARGET == "jax_kda_decode_cuda"
    targets = {contract.PREFILL_TARGET, contract.SEGMENT_CORRECT_TARGET, contract.DECODE_TARGET}
    assert set(contract.cuda_registrations()) == (targets if contract.WITH_CUDA else set())


@pytest.mark.parametrize("K,V,takes", [(128, 128, True), (64, 512, True), (128, 576, False), (60, 128, False),
                                       (128, 96, False), (256, 128, False)])
def test_supported_head_sizes(K, V, takes):
    assert (contract.prefill_unsupported(K, V) is None) == takes


@pytest.mark.parametrize("K,V,takes", [(128, 128, True), (64, 16, True), (128, 1040, True), (128, 0, False),
                                       (128, 40, False), (96, 128, False), (256, 128, False)])
def test_decode_head_sizes(K, V, takes):
    assert (contract.decode_unsupported(K, V) is None) == takes


def test_decode_kernel_reasons_come_from_the_contract(monkeypatch):
    monkeypatch.setattr(contract, "WITH_CUDA", True)
    monkeypatch.setattr(paths, "_local_gpu_compute_capabilities", lambda: ())
    spec = jax.ShapeDtypeStruct
    x = options.KDAOperands(spec((4, 1, 2, 128), jnp.bfloat16), spec((4, 1, 2, 128), jnp.bfloat16),
                            spec((4, 1, 2, 40), jnp.bfloat16), spec((4, 1, 2, 128), jnp.bfloat16),
                            spec((4, 1, 2), jnp.bfloat16), initial_state=spec((4, 2, 40, 128), jnp.float32))
    opts = options.KDAOptions(scale=0.1, use_qk_l2norm=False, gate=options.GATE_GIVEN, lower_bound=None,
                              safe_gate=False, use_beta_sigmoid=False, allow_neg_eigval=False, state_v_first=True,
                              output_final_state=True, final_state_dtype="float32", impl="cuda", decode_step=True)
    reason = paths.decode_kernel_unsupported_reason(x, opts)
    assert reason.startswith(contract.decode_unsupported(128, 40)) and "V = 40" in reason


def test_correction_head_sizes():
    assert contract.correct_unsupported(128, 1024) is None
    assert contract.correct_unsupported(96, 128) is not None


@pytest.mark.parametrize("sequences,heads,V,sms,want", [
    (1, 96, 128, 132, 128),  # case A: 96 CTAs of 128 rows
    (1, 32, 128, 132, 64),  # case E: 64 CTAs of 64 rows fill more of the chip
    (1, 32, 192, 132, 64),  # V not a multiple of 128
    (2, 33, 128, 132, 64),  # 132 CTAs of 64 rows still fit one wave
    (2, 34, 128, 132, 128),
])
def test_v_slice_choice(sequences, heads, V, sms, want):
    assert contract.prefill_v_slice(sequences, heads, V, sms) == want


def test_kernel_reasons_come_from_the_contract(monkeypatch):
    monkeypatch.setattr(contract, "WITH_CUDA", True)
    monkeypatch.setattr(paths, "_local_gpu_compute_capabilities", lambda: ())
    spec = jax.ShapeDtypeStruct
    x = options.KDAOperands(spec((1, 64, 2, 60), jnp.bfloat16), spec((1, 64, 2, 60), jnp.bfloat16),
                            spec((1, 64, 2, 128), jnp.bfloat16), spec((1, 64, 2, 60), jnp.bfloat16),
                            spec((1, 64, 2), jnp.bfloat16))
    opts = options.KDAOptions(scale=0.1, use_qk_l2norm=False, gate=options.GATE_GIVEN, lower_bound=None,
                              safe_gate=False, use_beta_sigmoid=False, allow_neg_eigval=False, state_v_first=False,
                              output_final_state=False, final_state_dtype="float32", impl="auto")
    reason = paths.kernel_unsupported_reason(x, opts)
    assert reason.startswith(contract.prefill_unsupported(60, 128)) and "K = 60" in reason


def test_two_pass_runs_serially_where_the_chains_leave_less_than_half_of_the_gpu_idle():
    assert not contract.two_pass_serial(66, 132) and contract.two_pass_serial(67, 132)
    assert contract.two_pass_serial(96, 132)  # case A
    assert contract.TWO_PASS_OVERLAP_BUDGET < contract.TWO_PASS_SERIAL_BUDGET


def test_two_pass_workspace_is_bounded_and_carries_the_state_without_a_final_state():
    layout = lambda sequences, tokens, heads, carried=0, packed=False, serial=False: contract.two_pass_layout(
        sequences, tokens, heads, packed, carried, serial)
    chains, tokens = 96, 8192  # case A's shape: 767 MB of factors, more than the overlapped windows' budget
    chunks = tokens // contract.TWO_PASS_CHUNK
    a = layout(1, tokens, chains)
    assert 1 <= a["window"] < chunks and a["windows"] == -(-chunks // a["window"]) == 3
    assert a["buffers"] == 2 and a["buffer"] == chains * a["window"] * contract.TWO_PASS_FACTOR_BYTES
    assert a["carry"] == 2 * a["buffer"] <= contract.TWO_PASS_OVERLAP_BUDGET
    assert a["bytes"] == a["carry"]  # the final state carries the state between windows
    assert a["flag_count"] == 0 and a["flags"] == a["bytes"]  # several windows never stream
    serial = layout(1, tokens, chains, serial=True)  # serially: all of them in one window, one buffer
    assert serial["serial"] and serial["windows"] == 1 and serial["window"] == chunks and serial["buffers"] == 1
    assert serial["bytes"] == serial["carry"] == chains * chunks * contract.TWO_PASS_FACTOR_BYTES
    assert serial["flag_count"] == 0  # a serial window never streams
    long = layout(1, 16 * tokens, chains, serial=True)  # 4096 chunks: windows of the serial budget
    assert long["buffers"] == 1 and long["window"] == contract.TWO_PASS_SERIAL_BUDGET // (
        chains * contract.TWO_PASS_FACTOR_BYTES) and long["windows"] == -(-16 * chunks // long["window"])
    f = layout(1, 96, 4)  # what fits runs in one window, one buffer
    assert f["window"] == 3 and f["windows"] == 1 and f["buffers"] == 1
    # ... and may stream: a flag per item (4 chains x 3 chunks) and the claim counter, last
    assert f["flag_count"] == 4 * 3 + 1 and f["bytes"] - f["flags"] == 4 * f["flag_count"]
    assert f["flags"] == f["carry"] == 4 * 3 * contract.TWO_PASS_FACTOR_BYTES
    one_chunk = layout(1, 160, 10**6)  # a window holds one chunk at least
    assert one_chunk["window"] == 1 and one_chunk["buffers"] == 2
    assert layout(1, 160, 10**6, serial=True)["buffers"] == 1
    assert layout(1, 32, 10**6)["buffers"] == 1  # one window: no second buffer
    assert layout(0, 160, 4)["bytes"] == 0 and layout(4, 0, 4)["bytes"] == 0  # nothing to run
    assert layout(1, tokens, chains, 128)["bytes"] - a["bytes"] == chains * 128 * 128 * 4  # fp32 states
    assert layout(1, tokens, chains, 256)["bytes"] - a["bytes"] == chains * 128 * 256 * 4  # + transitions
    assert contract.TWO_PASS_CHUNK == 32
    assert contract.TWO_PASS_MAX_PACKED_SEQUENCES == 64  # the message below names it


def test_two_pass_workspace_of_packed_sequences_holds_their_plan():
    sequences, tokens, heads = 6, 8192, 96  # case C's shape: 25,152 items at most
    items = heads * (tokens // contract.TWO_PASS_CHUNK + sequences)  # each sequence may end in a partial chunk
    p = contract.two_pass_layout(sequences, tokens, heads, True, 0, False)  # three windows in two buffers
    assert p["items"] == items and p["buffers"] == 2 and p["buffer"] == p["window"] * contract.TWO_PASS_FACTOR_BYTES
    assert p["windows"] == -(-items // p["window"]) == 3
    assert p["plan"] == p["carry"] == 2 * p["buffer"] <= contract.TWO_PASS_OVERLAP_BUDGET
    assert p["bytes"] - p["plan"] == items * 12 + (sequences * heads + 2) * 4  # (chain, chunk), item of; chains
    serial = contract.two_pass_layout(sequences, tokens, heads, True, 0, True)  # serially: one window
    assert serial["window"] == items and serial["windows"] == serial["buffers"] == 1
    assert serial["bytes"] - serial["plan"] == items * 12 + (sequences * heads + 2) * 4  # no flags
    small = contract.two_pass_layout(3, 100, 2, True, 128, False)  # one window of every item
    assert small["window"] == small["items"] == 2 * (4 + 3) and small["windows"] == 1 and small["buffers"] == 1
    assert small["plan"] - small["carry"] == 3 * 2 * 128 * 128 * 4
    assert small["flags"] - small["plan"] == small["items"] * 12 + (3 * 2 + 2) * 4  # the flags after the plan
    assert small["flag_count"] == small["items"] + 1 and small["bytes"] == small["flags"] + 4 * small["flag_count"]


def test_two_pass_windows_overlap_where_the_chains_leave_most_multiprocessors_idle():
    schedule = contract.two_pass_schedule
    e = schedule(1, 32768, 32, False, 32, 132)  # case E: 32 state-pass CTAs on 132 multiprocessors
    assert e["overlapped"] and e["buffers"] == 2
    assert e["windows"] == contract.two_pass_layout(1, 32768, 32, False, 0, False)["windows"] == 4
    for d in (schedule(8, 1024, 96, False, 768, 132),  # case D: 768 CTAs, the GPU full
              schedule(1, 8192, 96, False, 96, 132),  # case A: 96 CTAs, a quarter of the GPU idle
              schedule(1, 32768, 32, False, 132, 132)):  # no multiprocessor left over
        assert not d["overlapped"] and not d["streamed"] and d["buffers"] == 1 and d["windows"] == 1, d
    c = schedule(6, 8192, 96, True, 576, 132)  # packed: one window of items
    assert not c["overlapped"] and c["windows"] == 1
    f = schedule(1, 2048, 32, False, 32, 132)  # case F: one window of 64 chunks, too short to cut: streamed
    assert f["streamed"] and not f["overlapped"] and f["windows"] == 1
    assert schedule(0, 2048, 32, False, 0, 132)["windows"] == 0


def test_one_window_streams_where_the_chains_take_a_small_share_of_the_gpu():
    schedule = contract.two_pass_schedule
    share = contract.TWO_PASS_STREAMED_SHARE_PERCENT
    most = 132 * share // 100  # state-pass CTAs that still stream on 132 multiprocessors
    assert schedule(1, 2048, most, False, most, 132)["streamed"]
    assert not schedule(1, 2048, most + 1, False, most + 1, 132)["streamed"]
    packed = schedule(3, 4201, 4, True, 12, 132)  # packed: the one window of items
    assert packed["streamed"] and packed["windows"] == 1 and not packed["overlapped"]
    assert not schedule(1, 2048, 32, False, 64, 132)["streamed"]  # 32 chains with their transition slices
    assert not schedule(1, 32768, 32, False, 32, 132)["streamed"]  # case E: four windows, overlapped
    assert not schedule(1, 8192, 64, False, 64, 132)["streamed"]  # case B: cut in two overlapped halves


@pytest.mark.parametrize("sequences,tokens,heads,packed", [
    (1, 8192, 64, False),  # case B: 256 chunks, halves of 128
    (1, 4128, 8, False),  # 129 chunks: halves of 65 and 64
    (3, 4400, 4, True),  # packed: halves of the items
])
def test_one_window_is_cut_in_two_overlapped_halves_that_its_buffer_holds(sequences, tokens, heads, packed):
    layout = contract.two_pass_layout(sequences, tokens, heads, packed, 0, False)
    chains = 64  # state-pass CTAs that leave half of the GPU, too many to stream
    s = contract.two_pass_schedule(sequences, tokens, heads, packed, chains, 132)
    assert layout["windows"] == 1 and s["overlapped"] and s["buffers"] == 2 and s["windows"] == 2
    units = layout["items"] if packed else -(-tokens // contract.TWO_PASS_CHUNK)
    per_unit = layout["buffer"] // layout["window"]
    assert s["window"] == -(-units // 2) and s["buffer"] == per_unit * s["window"]
    assert s["buffer"] + per_unit * (units - s["window"]) == layout["buffer"]  # the second half, the shorter
    short = (contract.TWO_PASS_SPLIT_MIN_CHUNKS - 1) * contract.TWO_PASS_CHUNK  # one chunk fewer
    assert contract.two_pass_schedule(1, short, heads, False, chains, 132)["windows"] == 1  # too short to cut
    assert not contract.two_pass_schedule(sequences, tokens, heads, packed, 132, 132)["overlapped"]  # GPU full
    assert contract.two_pass_schedule(sequences, tokens, heads, packed, 67, 132)["windows"] == 1  # half of it


@pytest.mark.parametrize("change,words", [
    (dict(), None),
    (dict(head_dim_k=64, head_dim_v=64), "K = V = 128"),
    (dict(head_dim_v=256), "K = V = 128"),
    (dict(packed=True, sequences=64), None),
    (dict(packed=True, sequences=65), "at most 64 packed sequences"),
    (dict(packed=False, sequences=1000), None),
    (dict(gate="softplus"), "bounded gate"),
    (dict(lower_bound=-5.5), "lower_bound >= -5"),
    (dict(lower_bound=float("nan")), "lower_bound >= -5"),
    (dict(plain_inputs=False), "g and beta in bfloat16"),
    (dict(fp32_states=False), "float32 states"),
])
def test_two_pass_kernel_takes_what_the_contract_says(change, words):
    call = dict(head_dim_k=128, head_dim_v=128, packed=False, sequences=1, gate="bounded",
                lower_bound=-5.0, plain_inputs=True, fp32_states=True)
    call.update(change)
    call["gate"] = contract.GATE_CODES[call["gate"]]
    why = contract.two_pass_unsupported(**call)
    assert why is None if words is None else words in why
