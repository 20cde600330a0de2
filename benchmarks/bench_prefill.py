"""KDA prefill benchmark: cases A-G of ANCHORS.md and I, J, K, L, P, S (CASES), every implementation in one
process on one GPU.

    python benchmarks/bench_prefill.py [--cases ABCDEFG] [--json out.json] [--plot out.png]

Inputs follow FlashKDA's benchmark recipe (ANCHORS.md): bf16 q, k = l2normalize(randn), v, g, beta =
randn; fp32 A_log = rand(H), dt_bias = rand(H, K); lower_bound = -5; K = V = 128 (64 in case K); an fp32 initial state
[N, H, V, K] and the final state written back; gate, L2 norm and beta sigmoid fused. Rows:
  jax_kda            our CUDA kernels (bounded gate), jitted
  jax_kda softplus   the same with the softplus gate (Kimi-Linear-48B's), which FlashKDA cannot run
  jax_kda xla        our pure-JAX chunked path on the GPU
  FLA                flash-linear-attention's Triton chunk_kda, FLA_FLASH_KDA=0, bounded gate, safe_gate off
  FLA safe_gate      the same with safe_gate=True (its tensor-core diagonal path)
  jla                jax-linear-attention's Pallas Mosaic GPU KDA (gate and beta activations by XLA)
Times are medians: torch via triton.testing.do_bench (CUDA events), JAX over repeats of back-to-back
jitted calls (as ANCHORS.md measured), and for JAX also from the device trace (`timing.device_ms`,
CUPTI: each call's XLA module on the GPU, or where the trace has no module line the calls' span on the
GPU; columns "jax_kda device", "jla device"), which the speed-ups use where measured. The byte floor
reads every input once and writes every output once at the copy bandwidth measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
os.environ["FLA_FLASH_KDA"] = "0"  # FLA's own Triton kernels, not its FlashKDA backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jax_kda import kda_prefill, prefill_path  # noqa: E402
from report import plot, table  # noqa: E402
from timing import device_ms, time_jax  # noqa: E402

_SHORT = [int(n) for n in np.random.default_rng(14).integers(1, 65, 4096)]  # 4096 sequences of 1-64 tokens
CASES = {  # name: (sequence lengths, heads, K = V)
    "A": ([8192], 96, 128),
    "B": ([8192], 64, 128),
    "C": ([1300, 547, 2048, 963, 271, 3063], 96, 128),
    "D": ([1024] * 8, 96, 128),
    "E": ([32768], 32, 128),
    "F": ([2048], 32, 128),
    "G": ([131072], 32, 128),
    "I": ([65536], 8, 128),  # issue 14: long prompts with few heads per GPU
    "J": ([131072], 4, 128),
    "L": ([1048576], 4, 128),  # issue 14: a 1M-token prompt, 4 heads (per token as J or better)
    "P": ([65536, 512, 3000, 64, 1024, 7000, 300, 100], 8, 128),  # issue 14: a long prompt among short ones
    "K": ([8192], 96, 64),  # issue 10: case A with K = V = 64
    "S": (_SHORT, 32, 128),  # issue 10: many short packed sequences
}
LOWER_BOUND = -5.0


def make_inputs(seqlens, heads, K=128, seed=0):
    V = K
    torch.manual_seed(seed)
    T, N = sum(seqlens), len(seqlens)
    dev = "cuda"
    x = dict(
        q=F.normalize(torch.randn(1, T, heads, K, device=dev), dim=-1).bfloat16(),
        k=F.normalize(torch.randn(1, T, heads, K, device=dev), dim=-1).bfloat16(),
        v=torch.randn(1, T, heads, V, device=dev).bfloat16(),
        g=torch.randn(1, T, heads, K, device=dev).bfloat16(),
        beta=torch.randn(1, T, heads, device=dev).bfloat16(),
        A_log=torch.rand(heads, device=dev),
        dt_bias=torch.rand(heads, K, device=dev),
        h0=torch.randn(N, heads, V, K, device=dev) * 0.1,
    )
    cu = torch.tensor(np.concatenate([[0], np.cumsum(seqlens)]), dtype=torch.int64, device=dev)
    return x, cu


def to_jax(t):
    return jax.dlpack.from_dlpack(t.contiguous())


def time_torch(fn):
    import triton

    return float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))


def copy_bandwidth():
    """Bytes read plus written per second by a large device-to-device copy."""
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def byte_floor_ms(seqlens, heads, K, bandwidth):
    V = K
    T, N = sum(seqlens), len(seqlens)
    tokens = T * heads
    read = tokens * (K + K + V + K) * 2 + tokens * 2 + N * heads * K * V * 4 + heads * (K + 1) * 4
    write = tokens * V * 2 + N * heads * K * V * 4
    return (read + write) / bandwidth * 1e3


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def put_if_measured(row, key, ms):
    if ms is not None:
        row[key] = ms


def bench_case(name, seqlens, heads, K, args, bandwidth):
    x, cu = make_inputs(seqlens, heads, K)
    packed = len(seqlens) > 1
    row = {"case": name, "T": sum(seqlens), "H": heads, "N": len(seqlens), "K": K,
           "floor": byte_floor_ms(seqlens, heads, K, bandwidth)}

    jx = {n: to_jax(t) for n, t in x.items()}
    jcu = to_jax(cu.int()) if packed else None
    fused = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                 state_v_first=True, output_final_state=True)

    def ours(impl, lower_bound):
        return jax.jit(lambda q, k, v, g, beta, A_log, dt_bias, h0, cu: kda_prefill(
            q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0, cu_seqlens=cu,
            lower_bound=lower_bound, impl=impl, **fused))

    jargs = (jx["q"], jx["k"], jx["v"], jx["g"], jx["beta"], jx["A_log"], jx["dt_bias"], jx["h0"], jcu)
    for gate, lower_bound in (("bounded", LOWER_BOUND), ("softplus", None)):  # which kernel each row runs
        described = prefill_path(*jargs[:5], A_log=jx["A_log"], dt_bias=jx["dt_bias"], initial_state=jx["h0"],
                                 cu_seqlens=jcu, lower_bound=lower_bound, **fused)
        print(f"case {name}, {gate} gate: {described}", flush=True)
    fast = ours("auto", LOWER_BOUND)
    o_ours, s_ours = fast(*jargs)
    row["jax_kda"] = time_jax(fast, *jargs)
    put_if_measured(row, "jax_kda device", device_ms(fast, *jargs))
    row["jax_kda softplus"] = time_jax(ours("auto", None), *jargs)
    if "xla" in args.rows:
        row["jax_kda xla"] = time_jax(ours("xla", LOWER_BOUND), *jargs, repeats=3)

    try:
        from fla.ops.kda import chunk_kda
    except ImportError:
        chunk_kda = None
    if "peers" not in args.rows:
        return row
    if chunk_kda is not None:
        def fla(safe_gate):
            def call():
                with torch.inference_mode():
                    return chunk_kda(
                        x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5, initial_state=x["h0"],
                        output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                        use_beta_sigmoid_in_kernel=True, safe_gate=safe_gate, lower_bound=LOWER_BOUND,
                        A_log=x["A_log"], dt_bias=x["dt_bias"].reshape(-1), state_v_first=True,
                        cu_seqlens=cu if packed else None)
            return call

        o_fla, s_fla = fla(False)()
        row["FLA"] = time_torch(fla(False))
        row["FLA safe_gate"] = time_torch(fla(True))
        row["diff vs FLA"] = max(rel(o_ours, o_fla.float().cpu().numpy()), rel(s_ours, s_fla.float().cpu().numpy()))

    try:
        from jla.ops.mosaic_gpu.kda import kda as jla_kda
    except ImportError:
        jla_kda = None
    if jla_kda is not None and (not packed or len(set(seqlens)) == 1):
        seg = jnp.repeat(jnp.arange(len(seqlens), dtype=jnp.int32), seqlens[0])[None] if packed else None

        # Its packed form (segment_ids) keeps one state per batch row, so packed cases run it with zero
        # initial states and without the final ones; their outputs are then not comparable to ours.
        @jax.jit
        def jla(q, k, v, g, beta, A_log, dt_bias, h0):
            a = LOWER_BOUND * jax.nn.sigmoid(jnp.exp(A_log)[:, None] * (g.astype(jnp.float32) + dt_bias))
            o, s = jla_kda(q, k, v, a, jax.nn.sigmoid(beta.astype(jnp.float32)),
                           initial_state=None if packed else jnp.swapaxes(h0, -1, -2),
                           output_final_state=not packed, segment_ids=seg, use_qk_l2norm=True)
            return o, s

        jla_args = jargs[:8]
        try:
            o_jla, _ = jla(*jla_args)
            row["jla"] = time_jax(jla, *jla_args)
            put_if_measured(row, "jla device", device_ms(jla, *jla_args))
            if not packed:
                row["diff vs jla"] = rel(o_ours, o_jla)
        except Exception as e:  # report, keep benchmarking the others
            print(f"case {name}: jax-linear-attention failed: {type(e).__name__}: {e}", file=sys.stderr)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="ABCDEFG")
    p.add_argument("--rows", default="ours,xla,peers",
                   help="comma list: 'xla' times our pure-JAX path, 'peers' FLA and jax-linear-attention")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args()
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []

    def write_json(text=None):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "bandwidth": bandwidth, "rows": rows, "table": text}, f, indent=1)

    for name in args.cases:
        seqlens, heads, dim = CASES[name]
        rows.append(bench_case(name, seqlens, heads, dim, args, bandwidth))
        print(json.dumps(rows[-1]), flush=True)
        write_json()  # after every case: a run cut short (a device call's time limit) keeps its rows
        torch.cuda.empty_cache()
    text = table(rows, device)
    print(text)
    write_json(text)
    if args.plot:
        plot(rows, device, args.plot)


if __name__ == "__main__":
    main()
