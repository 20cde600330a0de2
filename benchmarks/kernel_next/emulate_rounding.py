"""Emulated rounding of the next KDA prefill kernel (chunk 32/64, wgmma) against the float64 oracle.

Issue 10's first go/no-go program. The planned kernel (shared/KERNEL_NEXT.md, "A direction") runs, per
chunk of C tokens, with the state Sᵀ (V x K) fp32 in wgmma accumulators:
    Rᵀ = Vᵀ (Tβ)ᵀ - Sᵀ Wᵀ;   Oᵀ = Sᵀ Qdᵀ + Rᵀ Aqkᵀ;   Sᵀ <- Sᵀ diag(e^Γ_C) + Rᵀ Kend
with T = (I + L)^-1, W = Tβ (k̂ e^Γ), Qd = scale q̂ e^Γ, Kend = k̂ e^(Γ_C - Γ), Aqk the decayed causal
q-k scores. This program replays that arithmetic in NumPy float32 and rounds every operand that the
kernel feeds to a tensor core (bf16, fp16, tf32 or a hi + lo bf16 pair; products accumulate in fp32),
so that one design choice at a time can be priced in accuracy before any CUDA is written.

Anchoring (SPEC.md, jax_kda/chunked.py), with 16-token sub-blocks:
  - between sub-blocks, the pair decay exp(Γ_i - Γ_j) is factored at the boundary before row i's
    sub-block: row factor exp(Σ from that boundary to i), column factor exp(Σ from j+1 to the boundary);
    both exponents <= 0, so any gate (-1000, softplus, 0) is exact up to rounding;
  - inside a sub-block, at its row 7 (today's chunk-16 anchor): exp(Γ_i - Γ_7) exp(Γ_7 - Γ_j), with
    each token's log-decay clamped at -clamp (10) in these two factors only. The factors then stay
    within e^±80 (fp32 and bf16 reach e^88; fp16 only e^11). A clamped pair decay differs from the true
    one by at most e^-10 = 4.5e-5 absolute, and not at all for the bounded gate with lower_bound >= -10;
  - every other exponent (Qd, W, Kend, the chunk decay) uses the unclamped gate: all are <= 0.
The 16x16 diagonal blocks of T are solved by fp32 forward substitution (one warp each, as today);
larger blocks are merged by [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]] with tensor-core
products of the chosen precision.

Run: python benchmarks/kernel_next/emulate_rounding.py [--T 2048 --heads 4 --seeds 3]
     [--gates bounded,nodecay] [--designs "c32 all bf16;today"] [--v-scale 4096]
Prints a markdown table: design x gate mode -> err_o / err_state (x 1e-3), max over seeds, where
err = RMS(x - ref) / RMS(ref) (SPEC.md) and o is rounded to bf16 as the kernel returns it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices; the CPU is shared

import argparse
import dataclasses
import pathlib
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from oracle import kda_oracle, rel_err  # noqa: E402  (float64, written from SPEC.md alone)

F32 = np.float32
SUB = 16  # sub-block (and diagonal block) size
ANCHOR_ROW = 7  # anchor of the diagonal blocks: the last row of the first half
K = V = 128


# ---- operand rounding -----------------------------------------------------------------------------

def to_bf16(x):
    return np.asarray(x, F32).astype(ml_dtypes.bfloat16).astype(F32)


def to_fp16(x):
    with np.errstate(over="ignore"):  # out of range becomes inf, as on the card
        return np.asarray(x, F32).astype(np.float16).astype(F32)


def to_tf32(x):
    """cvt.rna.tf32.f32: 10 explicit mantissa bits, nearest, ties away from zero."""
    bits = np.ascontiguousarray(x, F32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(F32)


ROUND = {"bf16": to_bf16, "fp16": to_fp16, "tf32": to_tf32, "fp32": lambda x: np.asarray(x, F32)}


def parts(x, fmt):
    """The operand as the tensor core sees it: one rounded copy, or bf16 hi + lo (x ≈ hi + lo)."""
    if fmt == "hilo":
        hi = to_bf16(x)
        return [hi, to_bf16(x - hi)]
    return [ROUND[fmt](x)]


def mm(a, b, fmt_a, fmt_b=None):
    """a @ b on a tensor core: operands rounded to their formats, fp32 accumulation. A hi + lo operand
    costs one product per part; lo x lo is dropped (below fp32's precision of the sum)."""
    pa, pb = parts(a, fmt_a), parts(b, fmt_b or fmt_a)
    out = None
    for i, x in enumerate(pa):
        for j, y in enumerate(pb):
            if i + j < 2:
                p = np.matmul(x, y)
                out = p if out is None else out + p
    return out


def formats(prec, split_first):
    """Operand formats of a product group. prec: bf16 | fp16 | tf32 | fp32 | hilo (both operands
    split, 3 products) | hilo1 (only the group's main operand split, the other bf16: 2 products).
    split_first: whether the main operand is the first (a) one of `mm`."""
    if prec == "hilo1":
        return ("hilo", "bf16") if split_first else ("bf16", "hilo")
    return prec, prec


# ---- problems -------------------------------------------------------------------------------------

GATES = ("bounded", "softplus", "gate-1000", "weak", "nodecay")
GATE_NOTES = {
    "bounded": "lower_bound -5, A_log rand(H), dt_bias rand(H, K), g randn (ANCHORS.md recipe)",
    "softplus": "unbounded softplus gate, A_log rand(H), dt_bias rand(H, K), g randn",
    "gate-1000": "log-decay given: -5 sigmoid(randn); 3% of tokens -1000 on half the channels, "
                 "1% on all; 5% of entries exactly 0",
    "weak": "softplus gate, g = -8, A_log = 0, dt_bias rand: 3e-4..9e-4 nats a token (~0.02 a chunk)",
    "nodecay": "softplus gate, g = -30, A_log = 0: ~1e-13 nats a token (no decay at all)",
}


def make_problem(gate, seed, T, H, v_scale=1.0):
    """Inputs as ANCHORS.md's recipe (bf16 q, k, v, g, beta logits; fp32 gate parameters and initial
    state) for one gate mode. Arrays hold the bf16 values in float32. Returns (args, oracle kwargs).
    v_scale multiplies v and the initial state (o and the state scale with them): a range test."""
    rng = np.random.default_rng([seed, GATES.index(gate)])
    bf = lambda *shape: to_bf16(rng.standard_normal(shape))
    q, k, v, beta = bf(1, T, H, K), bf(1, T, H, K), bf(1, T, H, V), bf(1, T, H)
    v = to_bf16(v * v_scale)
    kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
              initial_state=(0.1 * v_scale * rng.standard_normal((1, H, K, V))).astype(F32))
    if gate == "gate-1000":
        g = (-5.0 / (1.0 + np.exp(-rng.standard_normal((1, T, H, K))))).astype(F32)
        hit = rng.random((1, T, H, 1)) < 0.03
        g = np.where(hit & (rng.random((1, T, H, K)) < 0.5), F32(-1000), g)
        g = np.where(rng.random((1, T, H, 1)) < 0.01, F32(-1000), g)
        g = np.where(rng.random((1, T, H, K)) < 0.05, F32(0), g)
        return (q, k, v, g, beta), kw
    kw.update(use_gate_in_kernel=True, dt_bias=rng.random((H, K)).astype(F32))
    if gate in ("bounded", "softplus"):
        g = bf(1, T, H, K)
        kw["A_log"] = rng.random(H).astype(F32)
        if gate == "bounded":
            kw["lower_bound"] = -5.0
    else:
        g = np.full((1, T, H, K), -8.0 if gate == "weak" else -30.0, F32)
        kw["A_log"] = np.zeros(H, F32)
    return (q, k, v, g, beta), kw


@dataclasses.dataclass
class Prepared:
    q: np.ndarray  # [H, T, K] float32, L2-normalised
    k: np.ndarray
    v: np.ndarray  # [H, T, V]
    a: np.ndarray  # [H, T, K] log-decay
    beta: np.ndarray  # [H, T]
    state: np.ndarray  # [H, K, V]
    scale: np.float32


def prepare(args, kw):
    """The producer's elementwise work in fp32: L2 norms, beta sigmoid, gate."""
    q, k, v, g, beta = (np.moveaxis(x[0], 1, 0).astype(F32) for x in args)
    with np.errstate(over="ignore"):
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + F32(1e-6))
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + F32(1e-6))
        beta = F32(1) / (F32(1) + np.exp(-beta))
        if kw.get("use_gate_in_kernel"):
            x = g + kw["dt_bias"][:, None, :]
            a_scale = np.exp(kw["A_log"])[:, None, None]
            if "lower_bound" in kw:
                a = F32(kw["lower_bound"]) / (F32(1) + np.exp(-a_scale * x))
            else:
                a = -a_scale * np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, F32(20)))))
        else:
            a = g
    return Prepared(q, k, v, a.astype(F32), beta, kw["initial_state"][0].copy(), F32(K ** -0.5))


# ---- the kernel's arithmetic ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Design:
    name: str
    chunk: int = 32
    diag: str = "bf16"  # q·k and k·k products inside a 16x16 diagonal block (hilo1: k-side factors split)
    offdiag: str = "bf16"  # the same between sub-blocks (hilo1: column factors split)
    inverse: str = "bf16"  # products merging the 16x16 inverses into T (fp32: forward substitution)
    wu: str = "bf16"  # W = Tβ (k̂ e^Γ) and the Tβ V product of the chain (hilo1: Tβ split)
    state: str = "bf16"  # S in S·W and S·Qd, with W and Qd (hilo1: S split, W and Qd bf16)
    r: str = "bf16"  # R in R·Aqk and R·Kend, with Aqk and Kend (hilo1: R split)
    clamp: float = 10.0  # per-token log-decay clamp inside the anchored diagonal blocks
    clamp_everywhere: bool = False  # today's chunk-16 kernel clamps the gate for every factor


def _exclusive_suffix(a, axis):
    """Σ_{s > i} a_s along `axis`, summed from the end (no cancellation of large sums)."""
    incl = np.flip(np.cumsum(np.flip(a, axis), axis=axis), axis)
    out = np.zeros_like(a)
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis], dst[axis] = slice(1, None), slice(None, -1)
    out[tuple(dst)] = incl[tuple(src)]
    return out


def _tril(x, strict):
    n = x.shape[-1]
    mask = np.tril(np.ones((n, n), bool), -1 if strict else 0)
    return np.where(mask, x, F32(0))  # a select, not a product: masked overflow stays harmless


def _scores(rows_q, rows_k, cols, prec):
    """(q-rows · cols, k-rows · cols) with the k-side factors as the split operand for hilo1."""
    fq = formats(prec, split_first=False)
    fk = ("hilo", "hilo") if prec == "hilo1" else formats(prec, split_first=False)
    cols_t = np.swapaxes(cols, -1, -2)
    return mm(rows_q, cols_t, *fq), mm(rows_k, cols_t, *fk)


def _forward_substitution(l):
    """(I + L)^-1 of strictly lower L [..., n, n] in fp32, row by row."""
    n = l.shape[-1]
    x = np.zeros_like(l)
    eye = np.eye(n, dtype=F32)
    for i in range(n):
        x[..., i, :] = eye[i] - np.einsum("...m,...mj->...j", l[..., i, :i], x[..., :i, :])
    return x


def _inverse(l, prec):
    """(I + L)^-1 for strictly lower L [..., C, C]: 16x16 blocks in fp32, merged by products."""
    c = l.shape[-1]
    if prec == "fp32":
        return _forward_substitution(l)
    blocks = [_forward_substitution(l[..., i:i + SUB, i:i + SUB]) for i in range(0, c, SUB)]
    fmt = formats(prec, split_first=True)
    size = SUB
    while size < c:
        merged = []
        for p in range(0, len(blocks), 2):
            top, low = blocks[p], blocks[p + 1]
            r0 = p * size
            below = l[..., r0 + size:r0 + 2 * size, r0:r0 + size]
            corner = -mm(low, mm(below, top, *fmt), *fmt)
            upper = np.concatenate([top, np.zeros_like(top)], axis=-1)
            merged.append(np.concatenate([upper, np.concatenate([corner, low], axis=-1)], axis=-2))
        blocks, size = merged, 2 * size
    return blocks[0]


def emulate(x: Prepared, d: Design):
    """Returns (o [H, T, V] as fp32 before the bf16 store, final state [H, K, V])."""
    H, T, _ = x.q.shape
    C, nb = d.chunk, d.chunk // SUB
    assert T % C == 0, "pad T to the chunk"
    N = T // C
    q, k = x.q.reshape(H, N, C, K), x.k.reshape(H, N, C, K)
    v, beta = x.v.reshape(H, N, C, V), x.beta.reshape(H, N, C)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        clamped = np.maximum(x.a, F32(-d.clamp)).reshape(H, N, nb, SUB, K)  # NaN stays NaN
        a = clamped if d.clamp_everywhere else x.a.reshape(H, N, nb, SUB, K)

        # Sums within sub-blocks, and block totals: every exponent below is a sum of log-decays <= 0.
        incl = np.cumsum(a, axis=-2)  # Σ from the sub-block's first row to i
        excl_after = _exclusive_suffix(a, -2)  # Σ after i to the sub-block's end
        tot = incl[..., -1, :]  # [H, N, nb, K]
        before = np.cumsum(np.concatenate([np.zeros_like(tot[..., :1, :]), tot[..., :-1, :]], axis=-2),
                           axis=-2)  # Σ of the earlier sub-blocks
        after = _exclusive_suffix(tot, -2)  # Σ of the later sub-blocks
        gamma = (before[..., None, :] + incl).reshape(H, N, C, K)  # Γ_i from the chunk's start
        to_end = (after[..., None, :] + excl_after).reshape(H, N, C, K)  # Γ_C - Γ_i
        chunk_decay = np.exp(tot.sum(-2))  # [H, N, K]

        qb, kb = q.reshape(H, N, nb, SUB, K), k.reshape(H, N, nb, SUB, K)

        # Diagonal blocks, anchored at row 7 with the clamped gate: r_i = Γ_i - Γ_7.
        lo_half = -_exclusive_suffix(clamped[..., :ANCHOR_ROW + 1, :], -2)  # -Σ_{i<s<=7}
        hi_half = np.cumsum(clamped[..., ANCHOR_ROW + 1:, :], axis=-2)  # Σ_{7<s<=i}
        r = np.concatenate([lo_half, hi_half], axis=-2)
        e_r, e_mr = np.exp(r), np.exp(-r)
        qk_d, kk_d = _scores(qb * e_r, kb * e_r, kb * e_mr, d.diag)  # [H, N, nb, 16, 16]

        aqk = np.zeros((H, N, C, C), F32)
        lkk = np.zeros((H, N, C, C), F32)
        for i in range(nb):
            s = slice(i * SUB, (i + 1) * SUB)
            aqk[..., s, s] = _tril(qk_d[..., i, :, :], strict=False)
            lkk[..., s, s] = _tril(kk_d[..., i, :, :], strict=True)
            if i == 0:
                continue
            # Off-diagonal: rows of sub-block i against every earlier column, factored at the
            # boundary before sub-block i.
            e_rows = np.exp(incl[..., i, :, :])
            cols, between = [], np.zeros_like(tot[..., 0, :])
            for j in range(i - 1, -1, -1):
                cols.insert(0, kb[..., j, :, :] * np.exp(excl_after[..., j, :, :] + between[..., None, :]))
                between = between + tot[..., j, :]
            qk_o, kk_o = _scores(qb[..., i, :, :] * e_rows, kb[..., i, :, :] * e_rows,
                                 np.concatenate(cols, axis=-2), d.offdiag)
            aqk[..., s, :i * SUB] = qk_o
            lkk[..., s, :i * SUB] = kk_o
        aqk *= x.scale
        lkk *= beta[..., :, None]

        t_beta = _inverse(lkk, d.inverse) * beta[..., None, :]
        f_wu = formats(d.wu, split_first=True)
        w = mm(t_beta, k * np.exp(gamma), *f_wu)
        qd = x.scale * q * np.exp(gamma)
        kend_t = np.swapaxes(k * np.exp(to_end), -1, -2)

        # The serial chain over chunks (all heads at once).
        f_s = formats(d.state, split_first=False)  # S is the second operand of W @ S, Qd @ S
        f_r = formats(d.r, split_first=False)  # R is the second operand of Aqk @ R, Kendᵀ @ R
        s = x.state.astype(F32).copy()
        o = np.empty((H, N, C, V), F32)
        for n in range(N):
            r_ = mm(t_beta[:, n], v[:, n], *f_wu) - mm(w[:, n], s, *f_s)
            o[:, n] = mm(qd[:, n], s, *f_s) + mm(aqk[:, n], r_, *f_r)
            s = chunk_decay[:, n, :, None] * s + mm(kend_t[:, n], r_, *f_r)
    return o.reshape(H, T, V), s


# ---- designs and the table ------------------------------------------------------------------------

FP16_REST = dict(offdiag="fp16", inverse="fp16", wu="fp16", state="fp16", r="fp16")
ALL_FP32 = dict(diag="fp32", offdiag="fp32", inverse="fp32", wu="fp32", state="fp32", r="fp32")

DESIGNS = [
    Design("c16 today's kernel", chunk=16, diag="hilo1", clamp_everywhere=True),
    Design("c16 all bf16", chunk=16),
    # Chunk 32: all bf16, then one group changed at a time.
    Design("c32 all bf16"),
    Design("c32 diag hilo1", diag="hilo1"),
    Design("c32 diag hilo", diag="hilo"),
    Design("c32 diag tf32", diag="tf32"),
    Design("c32 diag fp16", diag="fp16"),
    Design("c32 diag+off fp32", diag="fp32", offdiag="fp32"),
    Design("c32 inverse fp32", inverse="fp32"),
    Design("c32 wu hilo1", wu="hilo1"),
    Design("c32 wu fp16", wu="fp16"),
    Design("c32 state hilo1", state="hilo1"),
    Design("c32 state fp16", state="fp16"),
    Design("c32 state tf32", state="tf32"),
    Design("c32 r hilo1", r="hilo1"),
    Design("c32 r fp16", r="fp16"),
    Design("c32 state,r hilo1", state="hilo1", r="hilo1"),
    # Combinations: the candidates.
    Design("c32 diag tf32 + state,r hilo1", diag="tf32", state="hilo1", r="hilo1"),
    Design("c32 diag hilo1 + rest fp16", diag="hilo1", **FP16_REST),
    Design("c32 diag tf32 + rest fp16", diag="tf32", **FP16_REST),
    Design("c32 all fp32", **ALL_FP32),
    Design("c64 all bf16", chunk=64),
    Design("c64 diag hilo1", chunk=64, diag="hilo1"),
    Design("c64 diag tf32", chunk=64, diag="tf32"),
    Design("c64 state hilo1", chunk=64, state="hilo1"),
    Design("c64 state,r hilo1", chunk=64, state="hilo1", r="hilo1"),
    Design("c64 diag tf32 + state,r hilo1", chunk=64, diag="tf32", state="hilo1", r="hilo1"),
    Design("c64 diag tf32 + rest fp16", chunk=64, diag="tf32", **FP16_REST),
    Design("c64 all fp32", chunk=64, **ALL_FP32),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gates", default=",".join(GATES))
    ap.add_argument("--designs", default="", help="substring filter on design names, separated by ;")
    ap.add_argument("--v-scale", type=float, default=1.0, help="multiplies v and the initial state")
    opts = ap.parse_args()
    gates = opts.gates.split(",")
    wanted = [w for w in opts.designs.split(";") if w]
    designs = [d for d in DESIGNS if not wanted or any(w in d.name for w in wanted)]
    start = time.time()

    errs = {}  # (design, gate) -> list of (err_o, err_state)
    sanity = []  # fp32 designs: o before the bf16 store must match the oracle to fp32 precision
    for gate in gates:
        for seed in range(opts.seeds):
            args, kw = make_problem(gate, seed, opts.T, opts.heads, opts.v_scale)
            ref_o, ref_s = kda_oracle(*args, **kw)
            ref_o, ref_s = np.moveaxis(ref_o[0], 1, 0), ref_s[0]
            x = prepare(args, kw)
            for d in designs:
                o, s = emulate(x, d)
                errs.setdefault((d.name, gate), []).append((rel_err(to_bf16(o), ref_o), rel_err(s, ref_s)))
                if d.name.endswith("all fp32"):
                    sanity.append(rel_err(o, ref_o))

    print(f"T = {opts.T}, {opts.heads} heads, K = V = {K}, {opts.seeds} seeds, v scale {opts.v_scale:g}; "
          "err_o / err_state in units of 1e-3, max over seeds ('!': above 5e-3)\n")
    for g in gates:
        print(f"- {g}: {GATE_NOTES[g]}")
    print()
    print("| design | " + " | ".join(gates) + " |")
    print("|---|" + "---:|" * len(gates))
    for d in designs:
        cells = []
        for g in gates:
            e = np.array(errs[(d.name, g)])
            worst = e.max(axis=0) if np.all(np.isfinite(e)) else np.array([np.inf, np.inf])
            cells.append(" / ".join("nan" if not np.isfinite(w) else f"{w * 1e3:.2f}" + ("!" if w > 5e-3 else "")
                                    for w in worst))
        print(f"| {d.name} | " + " | ".join(cells) + " |")
    if sanity:
        print(f"\nall-fp32 designs, o before the bf16 store: max err {max(sanity):.1e} (emulation check)")
    print(f"runtime {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
