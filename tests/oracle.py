"""An independent float64 NumPy evaluation of docs/CONTRACT.md, written from the spec and nothing else.

The tests hold every jax_kda path against it; it shares no code with the package.
"""

from __future__ import annotations

import numpy as np

# The contract's constants of the pre-processing (docs/CONTRACT.md).
L2NORM_EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _softplus(x):
    with np.errstate(over="ignore"):
        return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def kda_oracle(
    q, k, v, g, beta, *, scale=None, initial_state=None, use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
    lower_bound=None, A_log=None, dt_bias=None, state_v_first=False, cu_seqlens=None, **_ignored,
):
    """Returns (o [B,T,HV,V], final_state in the layout of initial_state), both float64."""
    q, k, v, g, beta = map(_f64, (q, k, v, g, beta))
    A_log, dt_bias, initial_state = map(_f64, (A_log, dt_bias, initial_state))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    scale = K ** -0.5 if scale is None else scale

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if use_qk_l2norm_in_kernel:
            q = q / np.sqrt((q * q).sum(-1, keepdims=True) + L2NORM_EPS)
            k = k / np.sqrt((k * k).sum(-1, keepdims=True) + L2NORM_EPS)
        if use_beta_sigmoid_in_kernel:
            beta = _sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
        if use_gate_in_kernel:
            x = g + (0.0 if dt_bias is None else dt_bias.reshape(HV, K))
            if lower_bound is None:
                a = -np.exp(A_log)[:, None] * _softplus(x)
            else:
                if A_log is not None:
                    x = np.exp(A_log)[:, None] * x
                a = lower_bound * _sigmoid(x)
        else:
            a = g

    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        spans = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    n_seq = len(spans)

    if initial_state is None:
        s0 = np.zeros((n_seq, HV, K, V))
    else:
        s0 = np.swapaxes(initial_state, -1, -2) if state_v_first else initial_state

    q_hv = np.repeat(q, group, axis=2) * scale  # value head hv reads q/k head hv // group
    k_hv = np.repeat(k, group, axis=2)
    o = np.zeros((B, T, HV, V))
    final = np.zeros((n_seq, HV, K, V))
    with np.errstate(invalid="ignore", over="ignore"):
        for n, (b, start, end) in enumerate(spans):
            S = s0[n].copy()  # [HV, K, V], all heads at once
            for t in range(start, end):
                kt = k_hv[b, t]
                S = np.exp(a[b, t])[:, :, None] * S
                r = v[b, t] - np.einsum("hkv,hk->hv", S, kt)
                S = S + kt[:, :, None] * (beta[b, t][:, None] * r)[:, None, :]
                o[b, t] = np.einsum("hkv,hk->hv", S, q_hv[b, t])
            final[n] = S
    if state_v_first:
        final = np.swapaxes(final, -1, -2)
    return o, final


def rel_err(x, ref):
    """The contract's metric: RMS(x - ref) / RMS(ref); NaN anywhere gives inf so it never passes."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(ref))):
        return float("inf")
    if x.size == 0:
        return 0.0
    den = np.sqrt(np.mean(ref * ref))
    num = np.sqrt(np.mean((x - ref) ** 2))
    return float(num / den) if den > 0 else float(num)
