"""KDA prefill over several devices: batch, heads and sequence (context) parallelism.

- `jit` with sharded inputs (Auto mesh axes): the outer primitive lowers through `custom_partitioning`
  with a Shardy rule (`partitioned`; `jax_kda.primitive` registers the lowering). Batch and head shardings pass through to a per-device call of the inner
  primitive, with no collective; a sharded T axis runs the context-parallel algorithm below.
- Explicit mesh axes (`jax.make_mesh`'s default) and code inside `shard_map`: `kda_prefill` wraps
  itself in `shard_map` (`explicit_mesh_prefill`), or, given `axis_name`, runs the context-parallel
  algorithm over that axis of the surrounding `shard_map` (`context_parallel`).

Context parallelism (`jax_kda.segments`): a segment's effect on the state is affine, S_out = Φ S_in +
S_local. Each device runs one prefill of its segment with transition columns, giving (S_local, Φ)
and its outputs up to a correction; one all-gather shares the summaries, each device folds those
before it into the state entering it, and corrects its outputs with that state (a matrix product,
not a second prefill). Communication is N * HV * K * (V + K) floats per device, independent of T.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from . import cuda, paths, segments
from .activations import finish_state, initial_state_kv
from .options import KDAOperands, KDAOptions

# ---------------------------------------------------------------------------------------------
# Context parallelism


def context_parallel(x: KDAOperands, opts: KDAOptions, axis_name, run, platform: str):
    """This device's outputs of a sequence whose T axis is split over `axis_name` (in index order).

    `x` holds the local segment; `run(x, opts) -> (o, final_state)` runs a prefill on local data;
    `platform` is the devices' (`jax_kda.paths`). Returns `(o, final_state or None)`; the final state is
    the whole sequence's, on every device.
    """
    if x.cu_seqlens is not None:
        raise NotImplementedError("context parallelism over packed sequences (cu_seqlens) is not supported")
    vd = x.v.shape[3]
    # 1. One prefill of the local segment (cut further when that fills the GPU better) from zero,
    #    with the transition columns: local outputs, effective queries and the summary (S_local, Φ).
    summary_opts = dataclasses.replace(opts, transition_columns=True)
    path = paths.choose_path(x, summary_opts, platform)
    on_kernels = path.impl == paths.CUDA
    pieces = path.pieces if on_kernels else 1
    s = segments.summarize(x._replace(initial_state=None), opts, run, pieces)
    local, transition = segments.combined(s)

    # 2. Every device's summary; those before this one, folded, give the state entering it.
    gathered = jax.lax.all_gather(jnp.concatenate([local, transition], axis=-1), axis_name)  # [P, N, HV, K, V + K]
    entries, state = segments.entry_states(gathered[..., vd:], gathered[..., :vd], initial_state_kv(x, opts),
                                           axis=0)
    entry = entries[jax.lax.axis_index(axis_name)]

    # 3. The outputs from the true entry state, without running the segment again.
    o, _ = segments.finish(s, entry, cuda.correct_segments if on_kernels else segments.correct_xla)
    return o, (finish_state(state, opts) if opts.output_final_state else None)


# ---------------------------------------------------------------------------------------------
# custom_partitioning of the outer primitive


@dataclasses.dataclass(frozen=True)
class _Plan:
    batch: object  # mesh axes of B (None: replicated)
    tokens: object  # mesh axes of T: context parallel when not None
    heads: object  # mesh axes of H and HV


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def _plan(mesh, q_sharding, x: KDAOperands) -> _Plan:
    """How to split a call, from the sharding of q; an axis that does not divide evenly stays whole."""
    spec = tuple(getattr(q_sharding, "spec", P())) + (None,) * 4
    b, t, h, _ = x.q.shape
    fits = lambda axes, size: axes if axes is not None and size % _axes_size(mesh, axes) == 0 else None
    packed = x.cu_seqlens is not None
    return _Plan(
        batch=None if packed else fits(spec[0], b),
        tokens=None if packed else fits(spec[1], t),
        heads=fits(spec[2], math.gcd(h, x.v.shape[2])),
    )


def token_split(x: KDAOperands) -> int:
    """Over how many devices the sharding of q (an array or `jax.ShapeDtypeStruct`) splits T."""
    sharding = getattr(x.q, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not hasattr(sharding, "spec"):
        return 1
    return _axes_size(mesh, _plan(mesh, sharding, x).tokens)


def _specs(plan: _Plan, x: KDAOperands, opts: KDAOptions):
    """PartitionSpecs of the present operands and of the results."""
    b, t, h = plan.batch, plan.tokens, plan.heads
    state = P(b, h, None, None)
    per_field = dict(
        q=P(b, t, h, None), k=P(b, t, h, None), v=P(b, t, h, None), g=P(b, t, h, None), beta=P(b, t, h),
        A_log=P(h), dt_bias=P(h, None), initial_state=state, cu_seqlens=P(None),
    )
    operands = [per_field[f] for f, present in zip(KDAOperands._fields, x.present()) if present]
    results = [P(b, t, h, None)] + ([state] if opts.output_final_state else [])
    return operands, results


@functools.lru_cache(maxsize=None)
def partitioned(present: tuple[bool, ...], opts: KDAOptions, bind, run):
    """`bind(x, opts) -> results` (the inner primitive) under `custom_partitioning`, for these operands
    and options; `run(x, opts) -> (o, final_state)` is the same call for context parallelism."""

    @custom_partitioning
    def prefill(*args):
        return tuple(bind(KDAOperands.unflatten(present, args), opts))

    def split(mesh, arg_shapes):
        x = KDAOperands.unflatten(present, arg_shapes)
        plan = _plan(mesh, x.q.sharding, x)
        operand_specs, result_specs = _specs(plan, x, opts)
        return plan, [NamedSharding(mesh, s) for s in operand_specs], [NamedSharding(mesh, s) for s in result_specs]

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return tuple(split(mesh, arg_shapes)[2])

    def partition(mesh, arg_shapes, result_shape):
        plan, operand_shardings, result_shardings = split(mesh, arg_shapes)

        def per_device(*args):
            x = KDAOperands.unflatten(present, args)
            if plan.tokens is None:
                return tuple(bind(x, opts))
            o, final = context_parallel(x, opts, plan.tokens, run, paths.mesh_platform(mesh))
            return (o,) if final is None else (o, final)

        return mesh, per_device, tuple(result_shardings), tuple(operand_shardings)

    def sharding_rule(mesh, operand_types, result_types):
        """Shardy: B, T and the heads may be split; K and V may not. The value-head axis is the q/k
        head axis times the group of value heads per q/k head."""
        shapes = [mlir.ir.RankedTensorType(t).shape for t in operand_types]
        x = KDAOperands.unflatten(present, shapes)
        group = x[2][2] // x[0][2]  # HV // H
        heads = "(h g)" if group > 1 else "h"
        seq = "n" if x.cu_seqlens is not None else "b"
        state = lambda d: f"{seq} {heads} {d} k" if opts.state_v_first else f"{seq} {heads} k {d}"
        per_field = dict(
            q="b t h k", k="b t h k", v=f"b t {heads} d", g=f"b t {heads} k", beta=f"b t {heads}",
            A_log=heads, dt_bias=f"{heads} k", initial_state=state("d"), cu_seqlens="c",
        )
        operands = [per_field[f] for f, p in zip(KDAOperands._fields, present) if p]
        out = "e" if opts.transition_columns else "d"  # V + K result columns
        results = [f"b t {heads} {out}"] + ([state(out)] if opts.output_final_state else [])
        # Shardy wants the special factors in the order the factors first appear in the rule.
        rule = f"{', '.join(operands)} -> {', '.join(results)}"
        whole = "kde" + ("tc" if x.cu_seqlens is not None else "")
        used = set(re.findall(r"[a-z]", rule))
        replicated = tuple(f for f in "btkdce" if f in whole and f in used)
        sizes = {"g": group} if group > 1 else {}
        return rule, dict(need_replication_factors=replicated, **sizes)

    prefill.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=sharding_rule,
    )
    return prefill


# ---------------------------------------------------------------------------------------------
# Explicit mesh axes


def explicit_mesh_of(x: KDAOperands):
    """The mesh of q's type when it has Explicit axes (sharding in types), else None."""
    try:
        sharding = jax.typeof(x.q).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    explicit = jax.sharding.AxisType.Explicit
    return mesh if any(t == explicit for t in mesh.axis_types) else None


def explicit_mesh_prefill(x: KDAOperands, opts: KDAOptions, mesh, run):
    """`run` on each device's shard through `shard_map`, with the split read off q's type."""
    plan = _plan(mesh, jax.typeof(x.q).sharding, x)
    operand_specs, result_specs = _specs(plan, x, opts)

    def per_device(*args):
        local = KDAOperands.unflatten(x.present(), args)
        if plan.tokens is None:
            o, final = run(local, opts)
        else:
            o, final = context_parallel(local, opts, plan.tokens, run, paths.mesh_platform(mesh))
        return (o,) if final is None else (o, final)

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(operand_specs), out_specs=tuple(result_specs),
                           check_vma=False)
    # With sharding in types the operands must already be laid out as the specs say (the per-head
    # parameters and the state typically arrive replicated).
    operands = [jax.sharding.reshard(a, NamedSharding(mesh, spec)) for a, spec in zip(x.flatten(), operand_specs)]
    results = mapped(*operands)
    return results[0], (results[1] if opts.output_final_state else None)
