"""A small Kimi-Linear-style decoder (token embedding, KDA layers with SwiGLU MLPs) and its generation.

Random weights: it exercises the layer, its cache and the prefill/decode split the way a real model
does, for `python -m jax_kda --model`, `benchmarks/bench_decode.py` and
`notebooks/kimi_linear_prefill.ipynb`. `Generator` runs it: a prefill whose LM head sees only the last
prompt token, then a decode loop that runs inside one jit.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .flax import KDACache, KimiDeltaAttention

# The stack the model job, the decode benchmark and the notebook run: on a GPU 4 layers of
# Kimi-Linear-sized attention (341 M parameters); on a CPU a small one, so that runs stay short.
GPU_SIZE = dict(vocab=32000, hidden=2048, layers=4, heads=16, head_dim=128, mlp_hidden=5632)
CPU_SIZE = dict(vocab=2048, hidden=128, layers=2, heads=2, head_dim=32, mlp_hidden=256)


def default_size() -> dict:
    return GPU_SIZE if jax.default_backend() == "gpu" else CPU_SIZE


class RMSNorm(nnx.Module):
    def __init__(self, features, eps=1e-6):
        self.weight = nnx.Param(jnp.ones((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * self.weight[...]
        return y.astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, hidden, heads, head_dim, mlp_hidden, dtype, rngs):
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = KimiDeltaAttention(hidden, heads, head_dim, dtype=dtype, rngs=rngs)
        dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)
        self.gate, self.up, self.down = dense(hidden, mlp_hidden), dense(hidden, mlp_hidden), dense(mlp_hidden, hidden)

    def __call__(self, x, cache):
        h, cache = self.attn(self.attn_norm(x), cache=cache)
        x = x + h
        y = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y)), cache


class KimiLinearStack(nnx.Module):
    """`model(tokens, caches) -> (logits, caches)`: a prefill of any length, or one decode step."""

    def __init__(self, vocab=32000, hidden=1024, layers=4, heads=8, head_dim=128, mlp_hidden=2816,
                 dtype=jnp.bfloat16, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(hidden, heads, head_dim, mlp_hidden, dtype, rngs) for _ in range(layers)])
        self.norm = RMSNorm(hidden)
        self.head = nnx.Linear(hidden, vocab, use_bias=False, dtype=dtype, rngs=rngs)

    def init_cache(self, batch_size: int) -> list[KDACache]:
        return [block.attn.init_cache(batch_size) for block in self.blocks]

    def __call__(self, tokens, caches, *, last_only=False):
        """tokens `[B, T]` -> float32 logits `[B, T, vocab]` (`[B, 1, vocab]` of the last token with
        `last_only`, which spares the LM head the other T - 1 positions) and the caches after them."""
        x = self.embed(tokens)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cache)
            new.append(cache)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x)).astype(jnp.float32), new


class Decoded(NamedTuple):
    tokens: jax.Array  # [B, steps]
    logits: jax.Array  # [B, vocab] float32: what follows the last of `tokens`
    caches: list[KDACache]  # every token of `tokens` included
    step_logits: Optional[jax.Array]  # [B, steps, vocab]: the logits each token was picked from (return_logits)


class Generator:
    """Jitted prefill and decoding for a `KimiLinearStack`.

    The model is split once (`nnx.split`) into its graph and a snapshot of its state, and plain `jax.jit`
    runs over the two: `nnx.jit` walks the module graph in Python on every call, which for a 4-layer model
    costs more than a decode step. Parameters changed after construction are not seen. Caches passed in
    are donated (their buffers are reused for the new ones): pass each one once.
    """

    def __init__(self, model: KimiLinearStack):
        self.graphdef, self.state = nnx.split(model)
        self.init_cache = model.init_cache

    def prefill(self, tokens, caches) -> tuple[jax.Array, list[KDACache]]:
        """tokens `[B, T]` -> (float32 logits of what follows them `[B, vocab]`, the caches after them)."""
        return _prefill(self.graphdef, self.state, tokens, caches)

    def decode(self, logits, caches, steps: int, *, key=None, temperature=1.0, return_logits=False) -> Decoded:
        """`steps` tokens, each picked from the logits before it and fed to the model, in one jitted
        `lax.scan` (compiled once per batch size and `steps`). Greedy (argmax), or with `key` sampled
        from softmax(logits / temperature). Continue with `decode(out.logits, out.caches, ...)`."""
        return _decode(self.graphdef, self.state, logits, caches, key, jnp.float32(temperature), steps=steps,
                       return_logits=return_logits)

    def generate(self, prompt, steps: int, caches=None, **decode_options) -> Decoded:
        """Prefill `prompt` `[B, T]` (after `caches`, default empty ones), then `decode` `steps` tokens."""
        logits, caches = self.prefill(prompt, self.init_cache(prompt.shape[0]) if caches is None else caches)
        return self.decode(logits, caches, steps, **decode_options)


@partial(jax.jit, donate_argnames="caches")
def _prefill(graphdef, state, tokens, caches):
    logits, caches = nnx.merge(graphdef, state)(tokens, caches, last_only=True)
    return logits[:, 0], caches


@partial(jax.jit, static_argnames=("steps", "return_logits"), donate_argnames="caches")
def _decode(graphdef, state, logits, caches, key, temperature, *, steps, return_logits):
    model = nnx.merge(graphdef, state)

    def step(carry, index):
        logits, caches = carry
        if key is None:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(jax.random.fold_in(key, index), logits / temperature)
        next_logits, caches = model(token[:, None], caches)
        return (next_logits[:, 0], caches), (token, logits if return_logits else None)

    (logits, caches), (tokens, step_logits) = jax.lax.scan(step, (logits, caches), jnp.arange(steps))
    return Decoded(tokens.T, logits, caches,
                   None if step_logits is None else step_logits.swapaxes(0, 1))


def median_seconds(call, carry, repeats: int) -> float:
    """Median wall time of `carry = call(carry)` over `repeats` calls after one warm-up call (which
    compiles), each timed up to `jax.block_until_ready` of its result: the device has finished it.
    Each call continues from the previous one's result (donated caches are not reused)."""
    carry = jax.block_until_ready(call(carry))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(call(carry))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decode_seconds_per_token(gen: Generator, prompt, steps: int, repeats: int) -> float:
    """Seconds per token of `gen.decode` (one jitted call of `steps` greedy tokens) at the batch size of
    `prompt` [B, T], after a prefill of it: `median_seconds` of such calls, each continuing the last."""

    def decode(carry):
        out = gen.decode(*carry, steps)
        return out.logits, out.caches

    after_prompt = gen.prefill(prompt, gen.init_cache(prompt.shape[0]))
    return median_seconds(decode, after_prompt, repeats) / steps
