"""An independent float64 NumPy forward of FLA's KimiDeltaAttention layer from a torch-style state dict
(weights [out, in], conv weights [D, 1, size]; FLA's names f_proj.0/1, g_proj.0/1 or Kimi-Linear's
f_a_proj/f_b_proj, g_a_proj/g_b_proj; the output-gate bias g_proj.1.bias is optional)."""

from __future__ import annotations

import numpy as np

from oracle import kda_oracle


KIMI_LINEAR_NAMES = {"f_proj.0": "f_a_proj", "f_proj.1": "f_b_proj", "g_proj.0": "g_a_proj", "g_proj.1": "g_b_proj"}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _causal_depthwise_conv(x, weight, bias=None):
    """x [T, D]; weight [D, 1, W] as torch.nn.Conv1d(groups=D, padding=W-1), output truncated to T."""
    w = weight[:, 0, :]  # [D, W]
    size = w.shape[1]
    padded = np.concatenate([np.zeros((size - 1, x.shape[1])), x], axis=0)
    out = sum(padded[j : j + x.shape[0]] * w[:, j] for j in range(size))
    return out if bias is None else out + bias


def kda_layer_oracle(sd, x, *, num_heads, head_dim, num_v_heads=None, lower_bound=None, allow_neg_eigval=False,
                     norm_eps=1e-5, cu_seqlens=None):
    """x [B, T, hidden] -> [B, T, hidden]; with cu_seqlens (B == 1) each packed sequence is separate."""
    sd = {n: np.asarray(v, np.float64) for n, v in sd.items()}
    for fla, kimi in KIMI_LINEAR_NAMES.items():
        sd.update({fla + n[len(kimi):]: v for n, v in sd.items() if n.startswith(kimi + ".")})
    x = np.asarray(x, np.float64)
    hv = num_v_heads or num_heads
    head_v_dim = sd["o_norm.weight"].shape[0]
    bsz, t, _ = x.shape
    spans = [(b, 0, t) for b in range(bsz)] if cu_seqlens is None else [
        (0, int(cu_seqlens[i]), int(cu_seqlens[i + 1])) for i in range(len(cu_seqlens) - 1)]
    out = np.zeros_like(x)
    for b, s, e in spans:
        if e == s:
            continue
        xs = x[b, s:e]
        proj = lambda name: xs @ sd[f"{name}.weight"].T
        conv = lambda name, y: _silu(_causal_depthwise_conv(y, sd[f"{name}.weight"], sd.get(f"{name}.bias")))
        q = conv("q_conv1d", proj("q_proj")).reshape(e - s, num_heads, head_dim)
        k = conv("k_conv1d", proj("k_proj")).reshape(e - s, num_heads, head_dim)
        v = conv("v_conv1d", proj("v_proj")).reshape(e - s, hv, head_v_dim)
        g = (xs @ sd["f_proj.0.weight"].T @ sd["f_proj.1.weight"].T).reshape(e - s, hv, head_dim)
        beta = xs @ sd["b_proj.weight"].T
        o, _ = kda_oracle(q[None], k[None], v[None], g[None], beta[None], use_qk_l2norm_in_kernel=True,
                          use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=allow_neg_eigval,
                          lower_bound=lower_bound, A_log=sd["A_log"].reshape(-1), dt_bias=sd["dt_bias"])
        gate = xs @ sd["g_proj.0.weight"].T @ sd["g_proj.1.weight"].T + sd.get("g_proj.1.bias", 0.0)
        gate = gate.reshape(e - s, hv, head_v_dim)
        o = o[0]
        o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + norm_eps) * sd["o_norm.weight"]
        o = o / (1.0 + np.exp(-gate))
        out[b, s:e] = o.reshape(e - s, -1) @ sd["o_proj.weight"].T
    return out


def random_state_dict(rng, *, hidden, num_heads, head_dim, num_v_heads=None, conv_size=4, conv_bias=False,
                      gate_bias=True):
    """Random weights with FLA's names and shapes (scaled as PyTorch initialises them)."""
    hv = num_v_heads or num_heads
    key_dim, value_dim = num_heads * head_dim, hv * head_dim
    u = lambda shape, fan_in: rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan_in)
    sd = {
        "q_proj.weight": u((key_dim, hidden), hidden), "k_proj.weight": u((key_dim, hidden), hidden),
        "v_proj.weight": u((value_dim, hidden), hidden),
        "q_conv1d.weight": u((key_dim, 1, conv_size), conv_size), "k_conv1d.weight": u((key_dim, 1, conv_size), conv_size),
        "v_conv1d.weight": u((value_dim, 1, conv_size), conv_size),
        "f_proj.0.weight": u((head_dim, hidden), hidden), "f_proj.1.weight": u((hv * head_dim, head_dim), head_dim),
        "b_proj.weight": u((hv, hidden), hidden),
        "g_proj.0.weight": u((head_dim, hidden), hidden), "g_proj.1.weight": u((value_dim, head_dim), head_dim),
        "g_proj.1.bias": u((value_dim,), head_dim),
        "A_log": np.log(rng.uniform(1, 16, hv)).astype(np.float32),
        "dt_bias": rng.standard_normal(hv * head_dim).astype(np.float32),
        "o_norm.weight": rng.uniform(0.5, 1.5, head_dim).astype(np.float32),
        "o_proj.weight": u((hidden, value_dim), value_dim),
    }
    if not gate_bias:
        del sd["g_proj.1.bias"]
    if conv_bias:
        for name, d in (("q_conv1d", key_dim), ("k_conv1d", key_dim), ("v_conv1d", value_dim)):
            sd[f"{name}.bias"] = u((d,), conv_size)
    return sd
