"""One path decision (`jax_kda.paths.choose_path`) behind the lowering, `impl="auto"` and `prefill_path`;
the decode step's errors in its own layout and names."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_kda import contract, kda_decode_step, paths, prefill_path

FUSED = dict(use_gate_in_kernel=True, lower_bound=-5.0, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def shapes(T, H, K=128, V=128, dtype=jnp.bfloat16, sharding=None):
    spec = lambda *s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding)
    beta = jax.ShapeDtypeStruct((1, T, H), dtype, sharding=None if sharding is None else NamedSharding(
        sharding.mesh, P(*sharding.spec[:3])))
    return spec(1, T, H, K), spec(1, T, H, K), spec(1, T, H, V), spec(1, T, H, K), beta


@pytest.fixture
def on_a_gpu(monkeypatch):
    """Answers as if this process had one Hopper GPU of 132 multiprocessors (the kernels built)."""
    if not contract.WITH_CUDA:
        pytest.skip("jax_kda built without its CUDA kernels")
    monkeypatch.setattr(paths, "default_platform", lambda: "cuda")
    monkeypatch.setattr(paths, "multiprocessors", lambda: 132)
    monkeypatch.setattr(paths, "_local_gpu_compute_capabilities", lambda: ("9.0",))


def test_cpu_runs_the_xla_path():
    assert prefill_path(*shapes(256, 4), **FUSED).startswith("xla (chunked pure JAX): the platform is cpu")
    assert prefill_path(*shapes(256, 4), impl="reference", **FUSED).startswith("scan")


def test_cpu_takes_the_cpu_chunk():
    from jax_kda import api, chunked

    x, opts = api.prefill_call(*shapes(256, 4), **FUSED)
    assert paths.choose_path(x, opts, "cpu").chunk == chunked.CPU_CHUNK
    assert paths.choose_path(x, opts, "tpu").chunk == chunked.CHUNK


@pytest.mark.parametrize("T,H,K,want", [
    (4096, 4, 128, "xla"),  # 4 x 128 x 128 = 2^16 state elements: past the caches, the chunked path
    (4096, 2, 128, "scan"),  # half of it: the scan
    (4096, 8, 64, "scan"),
    (4, 32, 128, "scan"),  # less than one chunk of tokens
    (8, 32, 128, "xla"),
])
def test_cpu_auto_takes_the_faster_pure_jax_path(T, H, K, want):
    """`chunked.scan_is_faster_on_cpu`'s thresholds, measured on a 2-core box (docs/PERFLOG.md)."""
    assert prefill_path(*shapes(T, H, K=K, V=K), **FUSED).startswith(want)
    # A packed batch shares its chains' state: HV chains whatever the sequences.
    cu = jnp.array([0, T // 2, T], jnp.int32)
    assert prefill_path(*shapes(T, H, K=K, V=K), cu_seqlens=cu, **FUSED).startswith(want)


def test_impl_cuda_on_a_cpu_names_the_platform():
    with pytest.raises(ValueError, match="lowered for cpu"):
        prefill_path(*shapes(256, 4), impl="cuda", **FUSED)


SOFTPLUS = dict(FUSED, lower_bound=None, A_log=jnp.zeros((32,)))  # Kimi-Linear's gate: the chunk-16 kernel's


def test_gpu_reports_the_kernels_and_their_cut(on_a_gpu):
    assert prefill_path(*shapes(8192, 96), **SOFTPLUS | dict(A_log=jnp.zeros((96,)))) == (
        "cuda (jax_kda CUTLASS kernels, sm_90a): the kernels take this call")
    described = prefill_path(*shapes(32768, 32), **SOFTPLUS)  # case E: 32 chains on 132 multiprocessors
    assert described.startswith("cuda (jax_kda CUTLASS kernels, sm_90a), sequences cut into up to 2 segments")
    cu = jnp.array([0, 60000, 65536], jnp.int32)  # case I's tokens, packed: the device decides
    described = prefill_path(*shapes(65536, 8), cu_seqlens=cu, **SOFTPLUS | dict(A_log=jnp.zeros((8,))))
    assert "sequences cut into up to 8 segments" in described and "where the device finds one long enough" in described


@pytest.mark.parametrize("T,H", [(8192, 96), (32768, 32), (2048, 32)])  # cases A, E, F
def test_gpu_takes_the_two_pass_kernel_where_the_cost_model_finds_it_faster(on_a_gpu, T, H):
    described = prefill_path(*shapes(T, H), **FUSED)
    assert described.startswith("cuda (jax_kda CUTLASS kernels, sm_90a), the two-pass chunk-32 kernel: ")


def test_the_cost_model_plays_the_overlapped_windows_out_as_the_launcher_orders_them():
    # A factor pass after the one before it and after the state pass that read its buffer (two windows
    # before), on the multiprocessors a running state pass leaves, else on all; a state pass after its
    # factors and the state pass before it, its steps slower while a factor pass runs beside it.
    card = paths.MEASURED_CARDS["NVIDIA H200"]._replace(state_seconds=1.0, overlapped_state_seconds=2.0)
    play = lambda work, steps: paths._overlapped_windows_seconds(work, steps, 50, 100, card)
    # F0 [0, 1] on all 100; S0 from 1: one step beside F1 (on 50, [1, 3]), nine alone (to 12); S1 alone.
    assert play([100.0, 100.0], [10, 10]) == pytest.approx(22.0)
    # F2 waits for S0 (its buffer's reader): S0 ends at 12, F2 [12, 14] beside S1 (one step), S1 to 23.
    assert play([100.0] * 3, [10] * 3) == pytest.approx(33.0)


def segments_of(described):
    return int(re.search(r"cut into up to (\d+) segments", described).group(1))


def test_gpu_cuts_few_very_long_sequences_for_the_two_pass_kernel(on_a_gpu):
    # Case J: 4 chains of 4096 steps of 32 tokens; cut into ~16 segments, run on the two-pass kernel.
    described = prefill_path(*shapes(131072, 4), **FUSED)
    assert "two-pass" in described and 8 <= segments_of(described) <= 16, described
    # Packed, its segments too (at most 64 of them); the device takes the cut.
    described = prefill_path(*shapes(131072, 4), cu_seqlens=jnp.array([0, 131072], jnp.int32), **FUSED)
    assert "two-pass" in described and "where the device finds one long enough" in described, described
    assert 8 <= segments_of(described) <= 16


@pytest.mark.parametrize("change,why", [
    (dict(lower_bound=-6.0), "bounded gate with lower_bound >= -5"),
    (dict(lower_bound=None, A_log=jnp.zeros((96,))), "bounded gate"),
    (dict(output_final_state=True, final_state_dtype=jnp.bfloat16), "float32 states"),
    (dict(initial_state=jnp.zeros((1, 96, 128, 128), jnp.bfloat16)), "float32 states"),
    (dict(cu_seqlens=jnp.asarray(np.append(np.arange(65) * 124, 8192), jnp.int32)), "at most 64 packed sequences"),
])
def test_two_pass_kernel_names_what_it_does_not_take(on_a_gpu, change, why):
    from jax_kda import api
    x, opts = api.prefill_call(*shapes(8192, 96), **{**FUSED, **change})
    assert why in paths.two_pass_unsupported_reason(x, opts)
    assert "two-pass" not in prefill_path(*shapes(8192, 96), **{**FUSED, **change})


def test_gpu_fallback_says_why(on_a_gpu):
    described = prefill_path(*shapes(256, 4, K=96, V=96), **FUSED)
    assert described.startswith("xla (chunked pure JAX): the kernels take K = 64 or 128")


def test_context_parallelism_is_reported():
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    described = prefill_path(*shapes(1024, 4, sharding=NamedSharding(mesh, P(None, "d"))), **FUSED)
    assert described.startswith("context parallel (T split over 4 devices), each segment on xla")
    assert prefill_path(*shapes(1024, 4), axis_name="d", **FUSED).startswith(
        "context parallel (T split over mesh axis 'd')")


def test_lowering_asks_its_own_platform_not_the_default_backend():
    # On this CPU-only process, lowering for CUDA still emits the kernels (when built with them).
    if not contract.WITH_CUDA:
        pytest.skip("jax_kda built without its CUDA kernels")
    from jax_kda import kda_prefill

    text = jax.jit(lambda *a: kda_prefill(*a, **FUSED)).trace(*shapes(64, 2)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert f"@{contract.PREFILL_TARGET}(" in text
    text = jax.jit(lambda *a: kda_prefill(*a, **FUSED)).trace(*shapes(64, 2)).lower(
        lowering_platforms=("cpu",)).as_text()
    assert contract.PREFILL_TARGET not in text


def decode_args(rng, N=2, H=2, HV=4, K=8, V=6):
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(q=r(N, H, K), k=r(N, H, K), v=r(N, HV, V), g=-jnp.abs(r(N, HV, K)), beta=r(N, HV),
                state=r(N, HV, K, V))


@pytest.mark.parametrize("name,bad,words", [
    ("state", (2, 4, 6, 8), "state must have shape [N, HV, K, V] = (2, 4, 8, 6)"),
    ("k", (2, 2, 9), "k must have shape [N, H, K]"),
    ("beta", (2, 4, 1), "beta must have shape [N, HV]"),
    ("g", (2, 2, 8), "g must have shape [N, HV, K]"),
])
def test_decode_step_errors_in_its_own_names(rng, name, bad, words):
    args = decode_args(rng)
    args[name] = jnp.zeros(bad, jnp.float32)
    with pytest.raises(ValueError) as info:
        kda_decode_step(*args.values())
    assert words in str(info.value)


def test_decode_step_names_a_bad_dt_bias(rng):
    with pytest.raises(ValueError, match=r"dt_bias must have shape \[HV, K\] = \(4, 8\) or \[HV \* K\] = \(32,\)"):
        kda_decode_step(*decode_args(rng).values(), use_gate_in_kernel=True, A_log=jnp.zeros(4),
                        dt_bias=jnp.zeros(30))


def test_decode_step_takes_a_flat_dt_bias(rng):
    args = decode_args(rng)
    flags = dict(use_gate_in_kernel=True, A_log=jnp.zeros(4))
    dt = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    o_flat, s_flat = kda_decode_step(*args.values(), dt_bias=dt.reshape(-1), **flags)
    o, s = kda_decode_step(*args.values(), dt_bias=dt, **flags)
    np.testing.assert_array_equal(np.asarray(o_flat), np.asarray(o))
    np.testing.assert_array_equal(np.asarray(s_flat), np.asarray(s))
