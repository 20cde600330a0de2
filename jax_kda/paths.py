"""Which implementation runs a KDA call: one decision, for a call's operands, options and platform.

`choose_path` is asked by the primitive's lowering (which knows the platform it lowers for), by
context parallelism (which knows its mesh) and by `jax_kda.prefill_path` (which reports it). It returns
the implementation, the reason, the kernel (the chunk-16 fused kernel, or the two-pass chunk-32 kernel
where it takes the call and the cost model finds it faster), and the segment plan: into how many pieces
the kernels' path cuts each sequence (`jax_kda.segments`). A decode step (`opts.decode_step`) has paths of its own: the decode
kernel or the XLA token step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import chunked, contract, segments
from .options import KDAOperands, KDAOptions

CUDA, XLA, SCAN = "cuda", "xla", "scan"  # the kernels, the chunked pure-JAX path, the token-by-token scan
DECODE_KERNEL, TOKEN_STEP = "decode_cuda", "step"  # a decode step's: its kernel, one pure-JAX token step
DESCRIPTIONS = {
    CUDA: "cuda (jax_kda CUTLASS kernels, sm_90a)",
    XLA: "xla (chunked pure JAX)",
    SCAN: "scan (token-by-token pure JAX)",
    DECODE_KERNEL: "cuda (jax_kda decode kernel, sm_90a)",
    TOKEN_STEP: "xla (one token step in pure JAX)",
}


class Path(NamedTuple):
    impl: str  # CUDA, XLA or SCAN
    reason: str  # why this path, in words
    pieces: int = 1  # segments each sequence is cut into on the kernels (1: none; packed: every T / pieces tokens)
    chunk: int = chunked.CHUNK  # tokens per serial step of the chunked pure-JAX path
    fallback: bool = False  # the kernels would have run on this platform but cannot take the call
    two_pass: bool = False  # the kernels' path (the segments' prefill, when cut) runs the two-pass chunk-32 kernel

    def describe(self) -> str:
        kernel = ", the two-pass chunk-32 kernel" if self.two_pass else ""
        cut = f", sequences cut into up to {self.pieces} segments" if self.pieces > 1 else ""
        return f"{DESCRIPTIONS[self.impl]}{kernel}{cut}: {self.reason}"


def choose_path(x: KDAOperands, opts: KDAOptions, platform: str) -> Path:
    """The path of a call lowered for `platform` ("cuda", "rocm", "cpu", "tpu", ...); shapes and dtypes
    may be avals. Raises ValueError where `impl="cuda"` cannot be honoured."""
    if opts.decode_step:
        return _choose_decode_path(x, opts, platform)
    if opts.impl == "reference":
        return Path(SCAN, "impl='reference'")
    if opts.impl == "xla":
        return Path(XLA, "impl='xla'")
    if platform != "cuda":
        if opts.impl == "cuda":
            raise ValueError(
                f"impl='cuda' runs jax_kda's CUDA kernels, which need a CUDA GPU; this call is lowered for "
                f"{platform}. Use impl='auto' or impl='xla'."
            )
        if platform != "cpu":
            return Path(XLA, f"the platform is {platform}")
        if _scan_is_faster_on_cpu(x, opts):
            return Path(SCAN, "the platform is cpu, and the token scan is faster there for this shape (a state "
                              "small enough for the caches, or less than one chunk of tokens)")
        return Path(XLA, "the platform is cpu", chunk=chunked.CPU_CHUNK)
    reason = kernel_unsupported_reason(x, opts)
    if reason is not None:
        if opts.impl == "cuda":
            raise ValueError(f"impl='cuda' cannot run this call: {reason}")
        return Path(XLA, reason, fallback=True)
    plan = kernel_plan(x, opts)
    if plan.pieces > 1 and x.cu_seqlens is not None:
        return Path(CUDA, "the kernels take this call (a packed batch: its sequences are cut where the device "
                          "finds one long enough)", pieces=plan.pieces, two_pass=plan.two_pass)
    if plan.two_pass:
        return Path(CUDA, "the two-pass kernel takes this call" + (" (its segments)" if plan.pieces > 1 else "")
                    + ", and the cost model finds it faster than the chunk-16 kernel", pieces=plan.pieces,
                    two_pass=True)
    return Path(CUDA, "the kernels take this call", pieces=plan.pieces)


def _scan_is_faster_on_cpu(x: KDAOperands, opts: KDAOptions) -> bool:
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    chains = hv if x.cu_seqlens is not None else b * hv
    return chunked.scan_is_faster_on_cpu(t, chains, kd, vd + kd if opts.transition_columns else vd)


def _choose_decode_path(x: KDAOperands, opts: KDAOptions, platform: str) -> Path:
    # `auto` takes the kernel wherever it runs: on an H200 it beat the token step at every batch size
    # and state layout measured (1.14-2.57x, BENCHMARKS.md).
    if opts.impl == "xla":
        return Path(TOKEN_STEP, "impl='xla'")
    if platform != "cuda":
        if opts.impl == "cuda":
            raise ValueError(
                f"impl='cuda' runs jax_kda's CUDA decode kernel, which needs a CUDA GPU; this call is lowered "
                f"for {platform}. Use impl='auto' or impl='xla'."
            )
        return Path(TOKEN_STEP, f"the platform is {platform}")
    reason = decode_kernel_unsupported_reason(x, opts)
    if reason is not None:
        if opts.impl == "cuda":
            raise ValueError(f"impl='cuda' cannot run this decode step: {reason}")
        return Path(TOKEN_STEP, reason, fallback=True)
    return Path(DECODE_KERNEL, "the decode kernel takes this step")


def platform_of(device) -> str:
    """The lowering platform of a device: "cuda" or "rocm" for GPUs, else the device's platform."""
    if device.platform == "gpu":
        return "rocm" if "rocm" in getattr(device.client, "platform_version", "").lower() else "cuda"
    return device.platform


def default_platform() -> str:
    return platform_of(jax.devices()[0])


def mesh_platform(mesh) -> str:
    """The platform of a mesh's devices (the default backend's for an abstract mesh)."""
    if isinstance(mesh, jax.sharding.Mesh):
        return platform_of(mesh.devices.flat[0])
    return default_platform()


_KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)


def kernel_unsupported_reason(x: KDAOperands, opts: KDAOptions) -> str | None:
    """Why the kernels cannot run this call (shapes and dtypes may be avals), or None if they can."""
    if not contract.WITH_CUDA:
        return "jax_kda was built without its CUDA kernels (JAX_KDA_CUDA=0 or no nvcc at build time)"
    kd, vd = x.q.shape[3], x.v.shape[3]
    width = vd + kd if opts.transition_columns else vd
    why = contract.prefill_unsupported(kd, width)
    if why is not None:
        sizes = f"K = {kd}, V = {vd}" + (f" (+ K transition columns = {width})" if opts.transition_columns else "")
        return f"{why}, got {sizes}"
    if x.q.dtype != jnp.bfloat16:
        return f"the kernels take bfloat16 q, k, v, got {x.q.dtype}"
    for name in ("g", "beta", "initial_state"):
        arr = getattr(x, name)
        if arr is not None and arr.dtype not in _KERNEL_DTYPES:
            return f"the kernels take {name} in bfloat16 or float32, got {arr.dtype}"
    if jnp.dtype(opts.final_state_dtype) not in _KERNEL_DTYPES:
        return f"the kernels write the final state in float32 or bfloat16, not {opts.final_state_dtype}"
    return _not_hopper()


def two_pass_unsupported_reason(x: KDAOperands, opts: KDAOptions, packed_segments: int | None = None) -> str | None:
    """Why the two-pass kernel cannot run a call the kernels take (the chunk-16 kernel then runs it), or
    None if it can (contract.two_pass_unsupported on the call's shapes, gate and dtypes). `packed_segments`:
    the prefill of the call's segments instead (`jax_kda.segments`: no initial state, fp32 final states),
    packed as that many sequences (0: not packed)."""
    segment_prefill = packed_segments is not None
    states = [x.initial_state.dtype] if x.initial_state is not None and not segment_prefill else []
    if opts.output_final_state and not segment_prefill:
        states.append(jnp.dtype(opts.final_state_dtype))
    packed = bool(packed_segments) if segment_prefill else x.cu_seqlens is not None
    return contract.two_pass_unsupported(
        x.q.shape[3], x.v.shape[3], packed, packed_segments if segment_prefill else x.num_sequences,
        contract.GATE_CODES[opts.gate], float(opts.lower_bound if opts.lower_bound is not None else 0.0),
        x.g.dtype == jnp.bfloat16 and x.beta.dtype == jnp.bfloat16, all(d == jnp.float32 for d in states))


def decode_kernel_unsupported_reason(x: KDAOperands, opts: KDAOptions) -> str | None:
    """Why the decode kernel cannot run this step (operands `[N, 1, ...]`, shapes and dtypes may be
    avals), or None if it can."""
    if not contract.WITH_CUDA:
        return "jax_kda was built without its CUDA kernels (JAX_KDA_CUDA=0 or no nvcc at build time)"
    kd, vd = x.q.shape[3], x.v.shape[3]
    why = contract.decode_unsupported(kd, vd)
    if why is not None:
        return f"{why}, got K = {kd}, V = {vd}"
    for name in ("q", "g", "beta", "initial_state"):  # k and v have the dtype of q
        dtype = getattr(x, name).dtype
        if dtype not in _KERNEL_DTYPES:
            return f"the decode kernel takes {name} in bfloat16 or float32, got {dtype}"
    return _not_hopper()


def _not_hopper() -> str | None:
    """Why this process's GPUs cannot run the kernels (built for sm_90a), or None."""
    sms = _local_gpu_compute_capabilities()
    if sms and not all(cc.startswith("9.") for cc in sms):
        return f"the kernels need Hopper (compute capability 9.x), found {', '.join(sorted(set(sms)))}"
    return None


@functools.lru_cache(maxsize=None)
def _local_gpu_compute_capabilities() -> tuple[str, ...]:
    """Compute capabilities of this process's GPUs; empty when it has none (lowering ahead of time)."""
    try:
        return tuple(str(d.compute_capability) for d in jax.devices("gpu"))
    except RuntimeError:
        return ()


# ---------------------------------------------------------------------------------------------
# The segment plan: cut few long sequences when their (sequence, head) chains leave most
# multiprocessors idle. The kernels run one chain (or V-slice of one) per CTA, one CTA per
# multiprocessor; a chain's 16-token step takes longer the more CTAs run beside it (they share the
# memory system). The cut costs its transition columns (V + K columns instead of V), the join of the
# segment summaries and a correction pass over o.
_CHUNK = 16
_MAX_PIECES = 64  # the join in fp32 is as accurate at 64 segments as at 1 (docs/PERFLOG.md)
_MIN_PIECE_TOKENS = 256
_MAX_SUMMARY_BYTES = 256 << 20  # a packed batch of many sequences is not cut: its summaries would be large
WORTH_IT = 0.8  # a cut must promise at least 20% less time than the uncut call
# Piece counts within 5% of the fastest count as fast, and the fewest of them is taken (of equal
# segments first): the model leaves out what more segments cost besides the waves (J measured 6% slower
# at 32 than at 16 on the chunk-16 kernel).
_TIE = 0.05


class CardFigures(NamedTuple):
    """What the kernel choice and the segment plan know of a GPU: the chunk-16 kernel's figures measured
    with `benchmarks/sweep_segments.py`, the two-pass kernel's with `benchmarks/kernel_next/run_two_pass.sh`,
    the cut's own costs with `benchmarks/kernel_times.py`."""

    chunk_seconds: float  # one 16-token step of a chain whose CTA runs alone
    crowding: float  # the step's relative slow-down when every multiprocessor runs a CTA
    correction_bandwidth: float  # bytes / s the correction kernel moves (it reads o with its columns, writes o)
    join_seconds: float  # the fold of the segments' summaries and the cut's reshapes (XLA's small kernels)
    factor_seconds: float  # two-pass: one 32-token chunk's factors, per multiprocessor, the GPU full
    state_seconds: float  # two-pass: one 32-token step of a chain's state pass
    overlapped_state_seconds: float  # the same step with the next window's factor pass beside it
    window_seconds: float  # two-pass: what each window after the first adds (a factor-pass tail, launches)


# By `device_kind`. H200 (docs/PERFLOG.md): the cut's costs from the device trace of cases I, J and F
# (2026-12-02: the correction kernel 0.174-0.176 ms on I's and J's 403 MB; XLA's kernels of the join
# 0.05-0.13 ms a call); the chunk-16 figures fitted to the J sweep of 2026-12-02 with those costs
# taken off (2 segments 2.27 us a step with 16 CTAs, 16 segments 2.70 us with 128; cases E and G of the
# H200 benchmark within 3%), plus the 3-4% the non-finite isolation added (the softplus rows of I and J
# measured after it, 2026-12-02); the two-pass ones from the prototype's runs of 2026-12-02
# (factor pass 3.8-3.9 us a chunk a multiprocessor; state step 1.05 us on E, 1.38 on A; windows of
# 128 MB: +15-23 us a window), which the library's kernel matched (A: factor pass 0.710 ms, state
# pass 0.328 for 24,576 chunks of 96 chains); the factor pass with its lean addresses (2026-12-02,
# seventh session: A 0.659 ms, C 0.666, D 0.662, CUPTI) 3.55 us a chunk; the state step with the
# factor pass beside it (overlapped windows; slower for the memory they share, the clock staying at its
# maximum) 1.63 us, the overlapped schedule played out window by window fitted to the eighth session's
# GPU busy time per call (2026-12-03: A 1.009, B 0.722 split in halves, E 1.844, G 6.913 ms; the model
# gives 1.009, 0.722, 1.771, 6.664).
MEASURED_CARDS = {"NVIDIA H200": CardFigures(chunk_seconds=2.28e-6, crowding=0.23, correction_bandwidth=2.3e12,
                                             join_seconds=1e-4, factor_seconds=3.55e-6, state_seconds=1.25e-6,
                                             overlapped_state_seconds=1.63e-6,
                                             window_seconds=2e-5)}
# Cards not measured: an H100 SXM has the H200's multiprocessors and clocks (its bandwidth, 3.0 TB/s
# against 4.8, only enters the correction term); the multiprocessor count is always the card's own.
_UNMEASURED = MEASURED_CARDS["NVIDIA H200"]


def launch_ctas(sequences, value_heads, width, multiprocessors) -> int:
    """CTAs of a prefill launch over `width` value columns (V, or V + K with transition columns)."""
    return sequences * value_heads * (width // contract.prefill_v_slice(sequences, value_heads, width, multiprocessors))


def _kernel_seconds(sequences, tokens, value_heads, width, multiprocessors, card: CardFigures) -> float:
    ctas = launch_ctas(sequences, value_heads, width, multiprocessors)
    waves = -(-ctas // multiprocessors)
    step = card.chunk_seconds * (1 + card.crowding * min(ctas, multiprocessors) / multiprocessors)
    return waves * -(-tokens // _CHUNK) * step


def two_pass_state_ctas(chains, transition) -> int:
    """The two-pass kernel's state-pass CTAs (one a multiprocessor): one a chain, two with transition columns."""
    return chains * (2 if transition else 1)


def _two_pass_seconds(sequences, tokens, value_heads, transition, multiprocessors, card: CardFigures) -> float:
    chains, chunks = sequences * value_heads, -(-tokens // contract.TWO_PASS_CHUNK)
    state_ctas = two_pass_state_ctas(chains, transition)
    schedule = contract.two_pass_schedule(sequences, tokens, value_heads, False, state_ctas, multiprocessors)
    windows = schedule["windows"]
    factors = chains * chunks * card.factor_seconds  # multiprocessor-seconds
    steps = -(-state_ctas // multiprocessors) * chunks
    tails = max(windows - 1, 0) * card.window_seconds
    if schedule["streamed"]:  # the factors on the multiprocessors the chains leave, beside their steps
        free = max(multiprocessors - state_ctas, 1)
        return max(factors / free, steps * card.overlapped_state_seconds) + card.factor_seconds
    if not schedule["overlapped"]:
        return factors / multiprocessors + steps * card.state_seconds + tails
    window = schedule["window"]
    chunks_of = [min(window, chunks - i * window) for i in range(windows)]
    return _overlapped_windows_seconds([chains * c * card.factor_seconds for c in chunks_of], chunks_of,
                                       multiprocessors - state_ctas, multiprocessors, card) + tails


def _overlapped_windows_seconds(factor_work, state_steps, free, multiprocessors, card: CardFigures) -> float:
    """The overlapped schedule played out (kda_two_pass_kernel.cu's events): window i's factor pass
    (`factor_work[i]` multiprocessor-seconds) after window i - 1's and after the state pass of window
    i - 2, which read its buffer, on the `free` multiprocessors a running state pass leaves, else on
    all; window i's state pass (`state_steps[i]` steps of one wave of chains) after its factors and
    window i - 1's state pass, its steps at the overlapped figure while a factor pass runs beside it."""
    windows, t = len(factor_work), 0.0
    factors_done, states_done = [], []
    factor_left = state_left = None  # the running passes' work left (multiprocessor-seconds, steps)
    while len(states_done) < windows:
        f, s = len(factors_done), len(states_done)
        if factor_left is None and f < windows and (f < 2 or s >= f - 1):
            factor_left = factor_work[f]
        if state_left is None and s < f:
            state_left = state_steps[s]
        rate = (free if state_left is not None else multiprocessors) if factor_left is not None else 0.0
        step = card.overlapped_state_seconds if factor_left is not None else card.state_seconds
        to_factors = factor_left / rate if factor_left is not None and rate > 0 else float("inf")
        to_state = state_left * step if state_left is not None else float("inf")
        dt = min(to_factors, to_state)
        t += dt
        if factor_left is not None:
            factor_left -= rate * dt
        if state_left is not None:
            state_left -= dt / step
        if to_factors <= dt:
            factors_done.append(t)
            factor_left = None
        if to_state <= dt:
            states_done.append(t)
            state_left = None
    return t


def two_pass_is_faster(sequences, tokens, value_heads, head_dim_k, head_dim_v, transition) -> bool:
    """Whether the cost model puts the two-pass kernel below the chunk-16 kernel on one launch over
    `sequences` of `tokens` tokens (`transition`: with transition columns)."""
    sms, card = multiprocessors(), card_figures()
    width = head_dim_v + head_dim_k if transition else head_dim_v
    return (_two_pass_seconds(sequences, tokens, value_heads, transition, sms, card)
            < _kernel_seconds(sequences, tokens, value_heads, width, sms, card))


class KernelPlan(NamedTuple):
    pieces: int  # segments each sequence is cut into (1: none)
    two_pass: bool  # the uncut call, or the segments' prefill, runs on the two-pass kernel
    seconds: float  # the cost model's time


def planned(x: KDAOperands, opts: KDAOptions, pieces: int) -> KernelPlan:
    """The cost model's kernel and time for this call cut into `pieces` segments (1: uncut; packed
    sequences, `cu_seqlens`, planned as one sequence of all T tokens, cut every T / pieces tokens)."""
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    sms, card = multiprocessors(), card_figures()
    if pieces == 1:
        sequences, transition, two_pass_takes = b, opts.transition_columns, two_pass_unsupported_reason(x, opts) is None
        correction_s = 0.0
    else:  # equal segments run as a batch of B x pieces sequences; others packed
        sequences, transition = (1 if x.cu_seqlens is not None else b) * pieces, True
        if x.cu_seqlens is not None:
            packed_segments = segments.packed_segments(x.num_sequences, t, pieces)
        else:
            packed_segments = 0 if segments.equal_segments(t, pieces) else b * pieces
        two_pass_takes = two_pass_unsupported_reason(x, opts, packed_segments) is None
        # The correction reads o with its transition columns and writes o; a call with transition columns
        # (context parallelism) is not corrected.
        correction_s = 0.0 if opts.transition_columns else (
            b * t * hv * (2 * vd + kd) * 2 / card.correction_bandwidth + card.join_seconds)
    tokens = -(-t // pieces)
    if two_pass_takes and two_pass_is_faster(sequences, tokens, hv, kd, vd, transition):
        return KernelPlan(pieces, True, _two_pass_seconds(sequences, tokens, hv, transition, sms, card) + correction_s)
    width = vd + kd if transition else vd
    return KernelPlan(pieces, False, _kernel_seconds(sequences, tokens, hv, width, sms, card) + correction_s)


def kernel_plan(x: KDAOperands, opts: KDAOptions) -> KernelPlan:
    """How the kernels run this call: into how many segments each sequence is cut (1: none), and on
    which kernel the launch (of the call, or of its segments) runs.

    Packed sequences (`cu_seqlens`, whose lengths only the device knows) are planned as one sequence
    of all T tokens: the plan is to cut every sequence every T / pieces tokens, and the device takes
    it when its longest sequence is long enough (`segments.split_packed_prefill_where_long`); they run
    on either kernel.

    With `opts.transition_columns` the call already pays for them (context parallelism), so only the
    kernel time counts."""
    b, t, hv, vd = x.v.shape
    kd = x.q.shape[3]
    uncut = planned(x, opts, 1)
    if opts.whole_sequences or contract.prefill_unsupported(kd, vd + kd) is not None:
        return uncut
    if x.cu_seqlens is not None and (opts.transition_columns or contract.correct_unsupported(kd, vd) is not None):
        return uncut
    cuts = [planned(x, opts, pieces) for pieces in range(2, min(_MAX_PIECES, t // _MIN_PIECE_TOKENS) + 1)]
    if not cuts:
        return uncut
    fastest = min(plan.seconds for plan in cuts)
    # Among the fast ones, segments of one length first (not packed: no plan, no longer last segment).
    equal = lambda plan: x.cu_seqlens is None and segments.equal_segments(t, plan.pieces)
    plan = min((plan for plan in cuts if plan.seconds <= fastest * (1 + _TIE)),
               key=lambda plan: (not equal(plan), plan.pieces))
    if plan.seconds >= WORTH_IT * uncut.seconds:
        return uncut
    if x.cu_seqlens is not None:
        summaries = segments.packed_segments(x.num_sequences, t, plan.pieces) * hv * kd * (vd + kd) * 4  # fp32
        return plan if summaries <= _MAX_SUMMARY_BYTES else uncut
    return plan


@functools.lru_cache(maxsize=None)
def card_figures() -> CardFigures:
    """The segment plan's figures for this process's first GPU (the measured H200's when unknown)."""
    try:
        return MEASURED_CARDS.get(jax.devices("gpu")[0].device_kind, _UNMEASURED)
    except RuntimeError:
        return _UNMEASURED


@functools.lru_cache(maxsize=None)
def multiprocessors() -> int:
    """Multiprocessors of this process's first GPU (an H100's 132 when lowering without one)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", 0) or 132)
    except RuntimeError:
        return 132
