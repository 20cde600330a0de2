"""The chunked path at every chunk size (the CPU's and the GPU's among them), and the CPU choice
between it and the token scan."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_kda import api
from jax_kda.chunked import CHUNK, CPU_CHUNK, kda_chunked, scan_is_faster_on_cpu
from inputs import strong_softplus_gate
from oracle import rel_err

SIZES = sorted({2, 8, CPU_CHUNK, 32, CHUNK, 128})


def check(case, chunk, tol=1e-5):
    o, final = kda_chunked(*api.prefill_call(*case.args, **case.kwargs), chunk=chunk)
    ref_o, ref_final = case.expected()
    assert o.dtype == case.args[0].dtype
    assert rel_err(o, ref_o) < tol, rel_err(o, ref_o)
    if case.kwargs.get("output_final_state"):
        assert rel_err(final, ref_final) < tol, rel_err(final, ref_final)


@pytest.mark.parametrize("chunk", SIZES)
@pytest.mark.parametrize(
    "features",
    [
        dict(T=75, B=2, gate="softplus", H=2, HV=4),  # partial last chunk, grouped value heads
        dict(T=40, gate="bounded", state_v_first=True, K=24, V=40),
        dict(seqlens=[0, 5, 33, 1, 70], gate="given", initial_state=None),
        dict(T=3, gate="softplus", output_final_state=False),
    ],
    ids=repr,
)
def test_every_chunk_size_matches_the_oracle(case, chunk, features):
    check(case(**features), chunk)


@pytest.mark.parametrize("chunk", SIZES)
def test_every_chunk_size_takes_strong_decays(case, chunk):
    """Hundreds of nats inside one chunk, complete forgetting, and no decay at all."""
    check(strong_softplus_gate(case(T=130, gate="softplus")), chunk)
    c = case(T=130, B=2, gate="given")
    g = np.array(c.args[3])
    g[:, 37] = -1000.0
    g[:, 60:100] = 0.0
    c.args = c.args[:3] + (jnp.asarray(g),) + c.args[4:]
    check(c, chunk)


def test_bf16_inputs_at_the_cpu_chunk(case):
    check(case(T=77, dtype="bfloat16", gate="bounded", state_v_first=True), CPU_CHUNK, tol=5e-3)


@pytest.mark.parametrize("chunk", [0, 1, 3, 48])
def test_chunk_must_be_a_power_of_two_from_two(case, chunk):
    c = case(T=8)
    with pytest.raises(ValueError, match="power of two"):
        kda_chunked(*api.prefill_call(*c.args, **c.kwargs), chunk=chunk)


@pytest.mark.parametrize(
    "tokens,chains,kd,vd,scan",
    [
        (8192, 32, 128, 128, False),  # Kimi-Linear-sized heads: the chunked path
        (2048, 4, 128, 128, False),
        (2048, 1, 256, 256, False),
        (2048, 2, 128, 128, True),  # the whole state fits in the caches: the scan
        (2048, 8, 64, 64, True),
        (CPU_CHUNK - 1, 32, 128, 128, True),  # less than one chunk
    ],
)
def test_cpu_choice_at_measured_points(tokens, chains, kd, vd, scan):
    assert scan_is_faster_on_cpu(tokens, chains, kd, vd) is scan


def test_cpu_choice_prefers_the_scan_for_smaller_problems():
    grid = [(t, c, d) for t in (1, 8, 16, 64, 4096) for c in (1, 2, 4, 8, 64) for d in (32, 64, 128, 256)]
    for t, c, d in grid:
        if scan_is_faster_on_cpu(t, c, d, d):
            assert scan_is_faster_on_cpu(max(t // 2, 1), c, d, d)
            assert scan_is_faster_on_cpu(t, max(c // 2, 1), d, d)
            assert scan_is_faster_on_cpu(t, c, d // 2, d) and scan_is_faster_on_cpu(t, c, d, d // 2)
