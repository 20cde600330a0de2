"""The README's main job, `python -m jax_kda`, in both modes (small sizes)."""

import subprocess
import sys

import pytest


def run(*args):
    out = subprocess.run([sys.executable, "-m", "jax_kda", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def test_prefill_job():
    # 4 heads of 128 x 128: a state past the caches, so `auto` takes the chunked path, and the check
    # against the token scan compares two different computations.
    text = run("--tokens", "256", "--heads", "4", "--head-dim", "128", "--repeats", "1", "--check-tokens", "128")
    assert "tokens/s" in text and "(ok)" in text and "path         xla" in text


def test_model_job():
    pytest.importorskip("flax")
    text = run("--model", "--tokens", "64", "--decode-tokens", "4", "--decode-batches", "1", "3")
    assert "prefill      1 x 64 tokens" in text and "decode       4 greedy steps" in text
    assert "4 greedy steps of 1 sequences" in text and "4 greedy steps of 3 sequences" in text
