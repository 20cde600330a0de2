"""`KimiDeltaAttention`: the Kimi Linear KDA layer as a `flax.nnx.Module`, with a state cache for decoding.

The structure and parameter names follow FLA's `fla.layers.kda.KimiDeltaAttention` (with the low-rank
gate projections named as in Kimi-Linear checkpoints, `f_a_proj`/`f_b_proj`, `g_a_proj`/`g_b_proj`):

    q, k, v   = silu(causal depthwise conv(x W_q | W_k | W_v))       (conv size 4)
    g         = (x F_a) F_b                 raw forget gate, activated inside kda_prefill with A_log, dt_bias
    beta      = x W_b                       logits, sigmoid inside kda_prefill
    o         = kda_prefill(q, k, v, g, beta, l2norm, state_v_first)
    o         = rmsnorm(o) * weight * sigmoid((x G_a) G_b + bias)   per head, then o W_o

The gate bottleneck (F_a, G_a) is head_v_dim wide, as in FLA; Kimi-Linear sizes it head_dim, the same
with its expand_v = 1. Kimi-Linear has no output-gate bias: `gate_bias=False`. Kimi-Linear-48B's layer
is `KimiDeltaAttention(hidden_size=2304, num_heads=32, head_dim=128, gate_bias=False, rngs=...)`.

Parameters carry logical axis names (`nnx.with_partitioning`): "embed" for the model width, "heads"
for projected head features, "rank" for the low-rank gate bottleneck, "conv" for the conv taps,
"head_dim" for the norm weight. A Linen module: `flax.nnx.bridge.to_linen(KimiDeltaAttention, ...)`.
The checkpoint loaders, defined in `checkpoints.py`, are importable from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as error:
    raise ImportError("jax_kda.flax needs flax: pip install 'jax-kda[flax]'") from error

from .api import kda_prefill
from .checkpoints import kda_layer_indices, load_safetensors, load_safetensors_layers, load_torch_state_dict
from .decode import kda_decode_step
from .packing import token_sequence_ids

__all__ = ["KDACache", "KimiDeltaAttention", "kda_layer_indices", "load_safetensors", "load_safetensors_layers",
           "load_torch_state_dict"]


class KDACache(NamedTuple):
    """Per-sequence decoding state of one layer (a pytree, so it passes through `jax.jit`)."""

    state: jax.Array  # [N, HV, V, K] float32 recurrent state
    conv_q: jax.Array  # [N, conv_size - 1, H * K] last inputs of each short convolution
    conv_k: jax.Array
    conv_v: jax.Array  # [N, conv_size - 1, HV * V]


def _torch_linear_init(fan_in):
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(rngs, d_in, d_out, axes, *, bias=False, dtype, param_dtype):
    init = _torch_linear_init(d_in)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init, axes),
                      bias_init=nnx.with_partitioning(init, axes[1:]))


class ShortConvolution(nnx.Module):
    """Causal depthwise convolution over time followed by SiLU (FLA's ShortConvolution)."""

    def __init__(self, features, size, *, bias=False, rngs, param_dtype=jnp.float32):
        init = _torch_linear_init(size)  # Conv1d's default with one input channel per group
        self.weight = nnx.Param(init(rngs.params(), (size, features), param_dtype), out_sharding=("conv", "heads"))
        self.bias = nnx.Param(init(rngs.params(), (features,), param_dtype), out_sharding=("heads",)) if bias else None
        self.size = size

    def __call__(self, x, previous, sequence, local):
        """x `[B, T, D]`; previous `[N, size - 1, D]`: each sequence's inputs before its first token here;
        sequence `[B, T]`: the sequence (row of `previous`) of each token; local `[B, T]`: the token's
        position within its sequence. Returns silu(conv(x)) `[B, T, D]`."""
        w = self.weight[...].astype(x.dtype)
        t = jnp.arange(x.shape[1])
        out = jnp.zeros_like(x)
        for lag in range(self.size):
            # Inside the sequence the input lag tokens back; before its start, the carried inputs.
            inside = x[:, jnp.maximum(t - lag, 0)]
            if lag > 0:
                carried = previous[sequence, jnp.clip(self.size - 1 + local - lag, 0, self.size - 2)]
                inside = jnp.where((local >= lag)[..., None], inside, carried)
            out = out + w[self.size - 1 - lag] * inside
        if self.bias is not None:
            out = out + self.bias[...].astype(x.dtype)
        return jax.nn.silu(out)


class GatedRMSNorm(nnx.Module):
    """RMS norm over the last axis, scaled by `weight` and gated by sigmoid(gate) (FusedRMSNormGated)."""

    def __init__(self, features, eps, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("head_dim",))
        self.eps = eps

    def __call__(self, x, gate):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...] * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(x.dtype)


class KimiDeltaAttention(nnx.Module):
    """Kimi Delta Attention layer. `layer(x)` returns the output; `layer(x, cache=c)` returns
    `(output, new_cache)` for a prefill of any length or a decode step (T = 1); `layer.init_cache(n)`
    gives an empty cache. Packed batches: `cu_seqlens` (B == 1). Padded batches: `mask [B, T]`, True
    on real tokens, padding after them (right padding); padding leaves the state untouched and its
    outputs are zero."""

    def __init__(
        self, hidden_size=2048, num_heads=16, head_dim=128, *, num_v_heads=None, expand_v=1.0, conv_size=4,
        conv_bias=False, gate_bias=True, lower_bound=None, safe_gate=False, allow_neg_eigval=False, norm_eps=1e-5,
        dtype=jnp.bfloat16, param_dtype=jnp.float32, impl="auto", rngs: nnx.Rngs,
    ):
        # The axis names are logical (mapped to a mesh by the user's rules), so nothing is placed here.
        with nnx.use_eager_sharding(False):
            self._build(hidden_size, num_heads, head_dim, num_v_heads, expand_v, conv_size, conv_bias, gate_bias,
                        lower_bound, safe_gate, allow_neg_eigval, norm_eps, dtype, param_dtype, impl, rngs)

    def _build(self, hidden_size, num_heads, head_dim, num_v_heads, expand_v, conv_size, conv_bias, gate_bias,
               lower_bound, safe_gate, allow_neg_eigval, norm_eps, dtype, param_dtype, impl, rngs):
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.num_v_heads = num_v_heads or num_heads
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim, self.value_dim = num_heads * head_dim, self.num_v_heads * self.head_v_dim
        self.conv_size, self.lower_bound, self.safe_gate = conv_size, lower_bound, safe_gate
        self.allow_neg_eigval, self.dtype, self.impl = allow_neg_eigval, dtype, impl
        hv, kd = self.num_v_heads, head_dim
        lin = lambda d_in, d_out, axes, bias=False: _linear(rngs, d_in, d_out, axes, bias=bias, dtype=dtype,
                                                           param_dtype=param_dtype)

        self.q_proj = lin(hidden_size, self.key_dim, ("embed", "heads"))
        self.k_proj = lin(hidden_size, self.key_dim, ("embed", "heads"))
        self.v_proj = lin(hidden_size, self.value_dim, ("embed", "heads"))
        conv = lambda d: ShortConvolution(d, conv_size, bias=conv_bias, rngs=rngs, param_dtype=param_dtype)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)
        self.f_a_proj = lin(hidden_size, self.head_v_dim, ("embed", "rank"))
        self.f_b_proj = lin(self.head_v_dim, hv * kd, ("rank", "heads"))
        self.b_proj = lin(hidden_size, hv, ("embed", "heads"))
        self.g_a_proj = lin(hidden_size, self.head_v_dim, ("embed", "rank"))
        self.g_b_proj = lin(self.head_v_dim, self.value_dim, ("rank", "heads"), bias=gate_bias)
        key_a, key_dt = rngs.params(), rngs.params()
        a_log = jnp.zeros((hv,)) if safe_gate else jnp.log(jax.random.uniform(key_a, (hv,), minval=1.0, maxval=16.0))
        self.A_log = nnx.Param(a_log.astype(param_dtype), out_sharding=("heads",))
        dt = jnp.exp(jax.random.uniform(key_dt, (hv * kd,), minval=math.log(1e-3), maxval=math.log(1e-1)))
        dt = jnp.maximum(dt, 1e-4)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), out_sharding=("heads",))
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps, param_dtype=param_dtype)
        self.o_proj = lin(self.value_dim, hidden_size, ("heads", "embed"))

    def init_cache(self, batch_size: int) -> KDACache:
        hist = lambda d: jnp.zeros((batch_size, self.conv_size - 1, d), self.dtype)
        state = jnp.zeros((batch_size, self.num_v_heads, self.head_v_dim, self.head_dim), jnp.float32)
        return KDACache(state, hist(self.key_dim), hist(self.key_dim), hist(self.value_dim))

    def __call__(self, x, *, cache: Optional[KDACache] = None, cu_seqlens=None, mask=None):
        x = jnp.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, hidden_size], got shape {x.shape}")
        b, t, hidden = x.shape
        if hidden != self.hidden_size:
            raise ValueError(f"x has hidden size {hidden}, the layer {self.hidden_size}")
        packed = cu_seqlens is not None
        if packed and (b != 1 or mask is not None):
            raise ValueError("cu_seqlens packs sequences along T: it requires B == 1 and no mask")
        n = cu_seqlens.shape[0] - 1 if packed else b
        if cache is not None and cache.state.shape[0] != n:
            raise ValueError(f"the cache holds {cache.state.shape[0]} sequences, the input {n}")
        valid = jnp.ones((b, t), bool) if mask is None else _mask_of_real_tokens(mask, b, t)
        # Padding is selected away where it enters, never multiplied by zero: a NaN or Inf there would
        # reach the real tokens, the cache and the gradients (0 * NaN is NaN). From here on padding is a
        # finite function of zeros; the bias-free projections make its conv inputs zero.
        x = jnp.where(valid[..., None], x.astype(self.dtype), 0)
        carry = self.init_cache(n) if cache is None else cache

        # Each token's sequence (a row of the cache) and its position within it.
        t_idx = jnp.arange(t)
        if packed:
            cu = jnp.asarray(cu_seqlens, jnp.int32)
            seq = token_sequence_ids(cu, t)[None]
            local = t_idx[None] - cu[seq]
        else:
            seq = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
            local = jnp.broadcast_to(t_idx[None], (b, t))

        def conv(layer, proj, previous):
            inputs = proj(x)
            return layer(inputs, previous, seq, local), inputs

        q, q_in = conv(self.q_conv1d, self.q_proj, carry.conv_q)
        k, k_in = conv(self.k_conv1d, self.k_proj, carry.conv_k)
        v, v_in = conv(self.v_conv1d, self.v_proj, carry.conv_v)
        hv, kd, vd = self.num_v_heads, self.head_dim, self.head_v_dim
        q = q.reshape(b, t, self.num_heads, kd)
        k = k.reshape(b, t, self.num_heads, kd)
        v = v.reshape(b, t, hv, vd)
        g = self.f_b_proj(self.f_a_proj(x)).reshape(b, t, hv, kd)
        beta = self.b_proj(x)
        # Padding: no decay (g -> -inf makes the fused gate exactly 0) and no write (beta -> -inf).
        g = jnp.where(valid[..., None, None], g.astype(jnp.float32), -jnp.inf)
        beta = jnp.where(valid[..., None], beta.astype(jnp.float32), -jnp.inf)

        flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                     allow_neg_eigval=self.allow_neg_eigval, lower_bound=self.lower_bound,
                     A_log=self.A_log[...], dt_bias=self.dt_bias[...], state_v_first=True)
        if t == 1 and cache is not None and not packed:
            step_impl = "xla" if self.impl == "reference" else self.impl  # the token step is the reference's
            o, state = kda_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], carry.state, impl=step_impl,
                                       **flags)
            o = o[:, None]
        else:
            o, state = kda_prefill(q, k, v, g, beta, initial_state=carry.state, output_final_state=True,
                                   safe_gate=self.safe_gate, cu_seqlens=cu_seqlens, impl=self.impl, **flags)
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(b, t, hv, vd)
        o = jnp.where(valid[..., None, None], self.o_norm(o, gate), 0)  # padding outputs are exactly zero
        out = self.o_proj(o.reshape(b, t, self.value_dim))
        if cache is None:
            return out
        history = lambda inputs, previous: _last_inputs(inputs, previous, valid, cu_seqlens, self.conv_size - 1)
        return out, KDACache(state, history(q_in, carry.conv_q), history(k_in, carry.conv_k),
                             history(v_in, carry.conv_v))


def _mask_of_real_tokens(mask, batch, length):
    mask = jnp.asarray(mask)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be [B, T] = {(batch, length)}, got shape {mask.shape}")
    if mask.dtype != jnp.bool_ and not jnp.issubdtype(mask.dtype, jnp.integer):
        raise ValueError(f"mask must be boolean (True on real tokens), got {mask.dtype}")
    return mask.astype(bool)


def _last_inputs(inputs, previous, valid, cu_seqlens, width):
    """The last `width` conv inputs of each sequence after this call: `[N, width, D]`."""
    if width == 0:
        return previous
    if cu_seqlens is None:
        history = jnp.concatenate([previous, inputs], axis=1)  # [B, width + T, D]
        t = jnp.arange(inputs.shape[1])
        end = width + jnp.max(jnp.where(valid, t + 1, 0), axis=1)  # just past the last real token
        idx = end[:, None] + jnp.arange(-width, 0)[None]
        return jnp.take_along_axis(history, idx[..., None], axis=1)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    starts, ends = cu[:-1], cu[1:]
    idx = ends[:, None] + jnp.arange(-width, 0)[None]  # [N, width] token positions
    from_tokens = inputs[0, jnp.clip(idx, 0, inputs.shape[1] - 1)]
    from_previous = jnp.take_along_axis(previous, jnp.clip(idx - starts[:, None] + width, 0, width - 1)[..., None], 1)
    return jnp.where((idx >= starts[:, None])[..., None], from_tokens, from_previous)
