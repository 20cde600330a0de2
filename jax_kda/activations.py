"""Input pre-processing shared by the pure-JAX paths: L2 norm, gate and beta activations, layouts.

Everything here computes in float32 and returns the quantities of the recurrence of docs/CONTRACT.md:
scaled and normalised q̂, k̂ (one per value head), v, the per-channel log-decay a (<= 0), the write strength β
and the initial state in `[N, HV, K, V]` layout.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .contract import L2NORM_EPS, SOFTPLUS_THRESHOLD
from .options import GATE_BOUNDED, GATE_GIVEN, GATE_SOFTPLUS, KDAOperands, KDAOptions


class Prepared(NamedTuple):
    q: jax.Array  # [B, T, HV, K], l2-normalised if asked, times scale
    k: jax.Array  # [B, T, HV, K]
    v: jax.Array  # [B, T, HV, V]
    a: jax.Array  # [B, T, HV, K] natural-log decay
    beta: jax.Array  # [B, T, HV]
    initial_state: jax.Array  # [N, HV, K, V]


def l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def softplus(x: jax.Array) -> jax.Array:
    """PyTorch's softplus (beta 1, threshold 20): linear above the threshold."""
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def log_decay(g, A_log, dt_bias, opts: KDAOptions) -> jax.Array:
    """The per-channel log-decay a_t of docs/CONTRACT.md from the gate input g `[..., HV, K]`."""
    g = g.astype(jnp.float32)
    if opts.gate == GATE_GIVEN:
        return g
    if dt_bias is not None:
        g = g + dt_bias.astype(jnp.float32)
    if opts.gate == GATE_SOFTPLUS:
        return -jnp.exp(A_log.astype(jnp.float32))[:, None] * softplus(g)
    assert opts.gate == GATE_BOUNDED, opts.gate
    if A_log is not None:
        g = jnp.exp(A_log.astype(jnp.float32))[:, None] * g
    return opts.lower_bound * jax.nn.sigmoid(g)


def write_strength(beta, opts: KDAOptions) -> jax.Array:
    beta = beta.astype(jnp.float32)
    if not opts.use_beta_sigmoid:
        return beta
    beta = jax.nn.sigmoid(beta)
    return 2.0 * beta if opts.allow_neg_eigval else beta


def prepare(x: KDAOperands, opts: KDAOptions) -> Prepared:
    q = x.q.astype(jnp.float32)
    k = x.k.astype(jnp.float32)
    if opts.use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    group = x.v.shape[2] // x.q.shape[2]
    if group > 1:  # value head hv reads q/k head hv // group
        q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)
    n, hv, kd = x.num_sequences, x.v.shape[2], x.q.shape[3]
    v = x.v.astype(jnp.float32)
    s0 = initial_state_kv(x, opts)
    if opts.transition_columns:
        v = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (kd,), v.dtype)], axis=-1)
        s0 = jnp.concatenate([s0, jnp.broadcast_to(jnp.eye(kd, dtype=jnp.float32), (n, hv, kd, kd))], axis=-1)
    return Prepared(
        q=q * opts.scale,
        k=k,
        v=v,
        a=log_decay(x.g, x.A_log, x.dt_bias, opts),
        beta=write_strength(x.beta, opts),
        initial_state=s0,
    )


def initial_state_kv(x: KDAOperands, opts: KDAOptions) -> jax.Array:
    """The state entering each sequence as float32 `[N, HV, K, V]`: x's initial state, or zeros."""
    if x.initial_state is None:
        return jnp.zeros((x.num_sequences, x.v.shape[2], x.q.shape[3], x.v.shape[3]), jnp.float32)
    state = x.initial_state.astype(jnp.float32)
    return jnp.swapaxes(state, -1, -2) if opts.state_v_first else state


def finish_state(s: jax.Array, opts: KDAOptions) -> jax.Array:
    """`[N, HV, K, V]` float32 state to the layout and dtype the caller asked for."""
    if opts.state_v_first:
        s = jnp.swapaxes(s, -1, -2)
    return s.astype(opts.final_state_dtype)
