"""A small Kimi-Linear-style decoder (token embedding, KDA layers with SwiGLU MLPs, greedy decoding).

Random weights: it exercises the layer, its cache and the prefill/decode split the way a real model
does, for `python -m jax_kda --model` and `notebooks/kimi_linear_prefill.ipynb`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .flax import KDACache, KimiDeltaAttention


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

    def __call__(self, tokens, caches):
        x = self.embed(tokens)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block(x, cache)
            new.append(cache)
        return self.head(self.norm(x)).astype(jnp.float32), new


@nnx.jit
def prefill(model: KimiLinearStack, tokens, caches):
    """Logits of the last prompt token and the caches after the prompt."""
    logits, caches = model(tokens, caches)
    return logits[:, -1], caches


@nnx.jit
def decode_step(model: KimiLinearStack, token, caches):
    """The next greedy token after `token` [B], and the caches that include it."""
    logits, caches = model(token[:, None], caches)
    return jnp.argmax(logits[:, -1], axis=-1), caches


def generate(model: KimiLinearStack, prompt, steps: int):
    """Greedy continuation of `prompt` [B, T] by `steps` tokens: `[B, steps]`."""
    logits, caches = prefill(model, prompt, model.init_cache(prompt.shape[0]))
    token = jnp.argmax(logits, axis=-1)
    out = [token]
    for _ in range(steps - 1):
        token, caches = decode_step(model, token, caches)
        out.append(token)
    return jnp.stack(out, axis=1)
