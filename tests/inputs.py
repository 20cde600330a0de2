"""Random KDA problems for the tests: the keyword arguments of `kda_prefill` plus the float64 answer."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from oracle import kda_oracle


@dataclasses.dataclass
class Case:
    args: tuple  # q, k, v, g, beta
    kwargs: dict

    def expected(self):
        """float64 (o, final_state) of the recurrence on the same (upcast) inputs."""
        up = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
        kw = {n: (up(a) if n in ("A_log", "dt_bias", "initial_state") else a) for n, a in self.kwargs.items()}
        return kda_oracle(*map(up, self.args), **kw)


def strong_softplus_gate(c: Case) -> Case:
    """`c` (softplus gate) with the gate at large raw values, 30 g + 10 (computed in float32, kept in g's
    dtype), and A_log + 2: decays of hundreds of nats inside one chunk."""
    g = c.args[3]
    c.args = c.args[:3] + ((g.astype(jnp.float32) * 30.0 + 10.0).astype(g.dtype),) + c.args[4:]
    c.kwargs["A_log"] = c.kwargs["A_log"] + 2.0
    return c


def make_case(
    rng, *, B=1, T=40, H=2, HV=None, K=32, V=32, dtype="float32", gate="given", lower_bound=-5.0,
    use_A_log=True, dt_bias="2d", l2norm=True, beta_sigmoid=True, allow_neg_eigval=False,
    initial_state="float32", state_v_first=False, seqlens=None, cu_dtype=np.int32, scale=None,
    output_final_state=True,
):
    """gate: "given" (log-decay input), "softplus" or "bounded"; dt_bias: "2d", "flat" or None;
    initial_state: a dtype name or None; seqlens: lengths packed with cu_seqlens (then B = 1)."""
    HV = HV or H
    if seqlens is not None:
        B, T = 1, int(sum(seqlens))
    n_seq = len(seqlens) if seqlens is not None else B
    dt = jnp.dtype(dtype)
    randn = lambda *shape: rng.standard_normal(shape).astype(np.float32)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, HV, V)
    if not l2norm:  # keep the recurrence well conditioned without the in-kernel norm
        q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    if gate == "given":
        g = -np.abs(randn(B, T, HV, K)) * 0.3
    else:
        g = randn(B, T, HV, K)
    beta = randn(B, T, HV) if beta_sigmoid else rng.uniform(0.0, 1.0, (B, T, HV)).astype(np.float32)

    kwargs = dict(
        use_qk_l2norm_in_kernel=l2norm,
        use_beta_sigmoid_in_kernel=beta_sigmoid,
        allow_neg_eigval=allow_neg_eigval,
        state_v_first=state_v_first,
        output_final_state=output_final_state,
    )
    if scale is not None:
        kwargs["scale"] = scale
    if gate != "given":
        kwargs["use_gate_in_kernel"] = True
        if gate == "bounded":
            kwargs["lower_bound"] = lower_bound
        if gate == "softplus" or use_A_log:
            kwargs["A_log"] = rng.uniform(0.0, 1.0, HV).astype(np.float32)
        if dt_bias is not None:
            bias = rng.uniform(0.0, 1.0, (HV, K)).astype(np.float32)
            kwargs["dt_bias"] = bias.reshape(-1) if dt_bias == "flat" else bias
    if initial_state is not None:
        shape = (n_seq, HV, V, K) if state_v_first else (n_seq, HV, K, V)
        kwargs["initial_state"] = jnp.asarray(randn(*shape), initial_state)
    if seqlens is not None:
        kwargs["cu_seqlens"] = np.concatenate([[0], np.cumsum(seqlens)]).astype(cu_dtype)

    args = tuple(jnp.asarray(x, dt) for x in (q, k, v, g, beta))
    return Case(args=args, kwargs=kwargs)
