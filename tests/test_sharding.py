"""Sharded prefill on 8 CPU devices: batch, heads and sequence splits equal the single-device result."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_kda import kda_prefill
from hlo import collectives
from oracle import rel_err

pytestmark = pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices")


def cpu_mesh(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape), devices=jax.devices("cpu")[: np.prod(shape)])


def place(mesh, case, spec):
    """The case's arrays laid out for `spec` = (batch, tokens, heads) mesh axes."""
    b, t, h = spec
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, P(*s)))
    args = [put(a, (b, t, h, None)) for a in case.args[:4]] + [put(case.args[4], (b, t, h))]
    kwargs = dict(case.kwargs)
    if "initial_state" in kwargs:
        kwargs["initial_state"] = put(kwargs["initial_state"], (None if "cu_seqlens" in kwargs else b, h, None, None))
    return args, kwargs


def single_device(case):
    with jax.default_device(jax.devices("cpu")[0]):
        return kda_prefill(*case.args, **case.kwargs)


@pytest.fixture
def problem(case):
    return case(B=4, T=128, H=4, HV=8, K=16, V=16, gate="softplus", state_v_first=True)


@pytest.mark.parametrize("spec", [("b", None, None), (None, None, "h"), ("b", None, "h"), (("b", "h"), None, None)],
                         ids=["batch", "heads", "batch+heads", "batch-over-two-axes"])
def test_batch_and_head_sharding_needs_no_collective(problem, spec):
    mesh = cpu_mesh((2, 2, 2), ("b", "t", "h"))
    want = single_device(problem)
    args, kwargs = place(mesh, problem, spec)
    fn = lambda *a: kda_prefill(*a, **kwargs)
    got = jax.jit(fn)(*args)
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6
    assert got[0].sharding.spec[:3] == P(*spec)[:3] or got[0].sharding.is_equivalent_to(
        NamedSharding(mesh, P(*spec, None)), 4)
    assert not any(collectives(fn, *args).values()), collectives(fn, *args)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("spec", [(None, "t", None), ("b", "t", "h"), (None, ("t", "b", "h"), None)],
                         ids=["tokens", "all-three", "tokens-over-8"])
def test_sequence_sharding_is_context_parallel(problem, spec, explicit):
    mesh = cpu_mesh((2, 2, 2), ("b", "t", "h"), explicit)
    want = single_device(problem)
    args, kwargs = place(mesh, problem, spec)
    fn = lambda *a: kda_prefill(*a, **kwargs)
    got = jax.jit(fn)(*args)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    if not explicit:
        counts = collectives(fn, *args)
        assert counts["all-gather"] == 1 and sum(counts.values()) == 1, counts


@pytest.mark.parametrize("spec", [("b", None, "h"), (None, "t", None)], ids=["batch+heads", "tokens"])
def test_explicit_mesh(problem, spec):
    mesh = jax.make_mesh((2, 2, 2), ("b", "t", "h"), devices=jax.devices("cpu"))  # Explicit axes by default
    want = single_device(problem)
    args, kwargs = place(mesh, problem, spec)
    got = jax.jit(lambda *a: kda_prefill(*a, **kwargs))(*args)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    assert tuple(jax.typeof(got[0]).sharding.spec)[:3] == spec


def test_packed_sequences_under_head_sharding(case):
    c = case(seqlens=[30, 0, 70, 28], H=4, HV=8, K=16, V=16, gate="bounded", state_v_first=True)
    mesh = cpu_mesh((2, 2, 2), ("b", "t", "h"))
    want = single_device(c)
    args, kwargs = place(mesh, c, (None, None, "h"))
    fn = lambda *a: kda_prefill(*a, **kwargs)
    got = jax.jit(fn)(*args)
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6
    assert tuple(got[1].sharding.spec[:2]) == (None, "h")  # the state follows the heads
    assert not any(collectives(fn, *args).values())


def test_shard_map_with_axis_name(problem):
    mesh = cpu_mesh((8,), ("t",))
    want = single_device(problem)
    kwargs = dict(problem.kwargs)
    state = kwargs.pop("initial_state")

    def local(q, k, v, g, beta, s0):
        return kda_prefill(q, k, v, g, beta, initial_state=s0, axis_name="t", **kwargs)

    tok = P(None, "t")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(tok,) * 5 + (P(),), out_specs=(tok, P()), check_vma=False))
    got = fn(*problem.args, state)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5


def test_pmap_over_batch(problem):
    kwargs = dict(problem.kwargs)
    state = kwargs.pop("initial_state")
    one = lambda q, k, v, g, beta, s0: kda_prefill(q[None], k[None], v[None], g[None], beta[None],
                                                   initial_state=s0[None], **kwargs)
    got = jax.pmap(one, devices=jax.devices("cpu")[:4])(*problem.args, state)
    want = single_device(problem)
    assert rel_err(got[0][:, 0], want[0]) < 1e-6 and rel_err(got[1][:, 0], want[1]) < 1e-6


@pytest.mark.parametrize("spec", [("b", None, "h"), (None, "t", None)], ids=["batch+heads", "tokens"])
def test_gradients_through_sharded_call(problem, spec):
    mesh = cpu_mesh((2, 2, 2), ("b", "t", "h"))
    args, kwargs = place(mesh, problem, spec)
    weight = jnp.asarray(np.random.default_rng(3).standard_normal(problem.args[2].shape), jnp.float32)

    def loss(v, *rest):
        o, final = kda_prefill(rest[0], rest[1], v, rest[2], rest[3], **kwargs)
        return jnp.sum(o * weight) + jnp.sum(final)

    others = (args[0], args[1], args[3], args[4])
    got = jax.jit(jax.grad(loss))(args[2], *others)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.grad(loss)(problem.args[2], *(problem.args[i] for i in (0, 1, 3, 4)))
    assert rel_err(got, want) < 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed():
    script = os.path.join(os.path.dirname(__file__), "distributed_prefill.py")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "ok" in out, out[-3000:]
