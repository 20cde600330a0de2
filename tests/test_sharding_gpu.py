"""Sharded prefill over the GPUs of one host, on the CUDA kernels (skipped with fewer than 2 GPUs)."""


import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_kda import contract, kda_prefill
from hlo import collectives
from oracle import rel_err

BF16_TOL = 5e-3

def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(len(_gpus()) < 2, reason="needs 2 or more GPUs"),
    pytest.mark.skipif(not contract.WITH_CUDA, reason="jax_kda built without its CUDA kernels"),
]


def gpu_mesh(explicit=False):
    n = len(_gpus())
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((n,), ("d",), axis_types=(kind,), devices=_gpus())


@pytest.fixture
def problem(case):
    n = len(_gpus())
    return case(B=n, T=512, H=2 * n, HV=4 * n, K=128, V=128, dtype="bfloat16", gate="softplus",
                state_v_first=True)


def place(mesh, c, split):
    b, t, h = {"batch": ("d", None, None), "heads": (None, None, "d"), "tokens": (None, "d", None)}[split]
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, P(*s)))
    args = [put(a, (b, t, h, None)) for a in c.args[:4]] + [put(c.args[4], (b, t, h))]
    kwargs = dict(c.kwargs, initial_state=put(c.kwargs["initial_state"], (b, h, None, None)))
    return args, kwargs


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("split", ["batch", "heads", "tokens"])
def test_sharded_equals_one_gpu_and_float64(problem, split, explicit):
    with jax.default_device(_gpus()[0]):
        want = kda_prefill(*problem.args, **problem.kwargs)
    ref_o, ref_s = problem.expected()
    args, kwargs = place(gpu_mesh(explicit), problem, split)
    fn = lambda *a: kda_prefill(*a, **kwargs)
    got = jax.jit(fn)(*args)
    assert rel_err(got[0], ref_o) < BF16_TOL and rel_err(got[1], ref_s) < BF16_TOL
    if split != "tokens":  # the same kernel launches on each shard: the single-GPU result exactly
        assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6
    if not explicit:
        counts = collectives(fn, *args)
        assert sum(counts.values()) == (split == "tokens"), counts  # one all-gather of summaries


def test_shard_map_with_axis_name_and_pmap(problem):
    n = len(_gpus())
    mesh = gpu_mesh()
    kwargs = dict(problem.kwargs)
    state = kwargs.pop("initial_state")
    ref_o, ref_s = problem.expected()
    specs = (P(None, "d"),) * 5 + (P(),)
    body = lambda q, k, v, g, b, s: kda_prefill(q, k, v, g, b, initial_state=s, axis_name="d", **kwargs)
    # The final state is the same on every device, which shard_map cannot infer through the all-gather.
    o, s = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(None, "d"), P()), check_vma=False))(
        *problem.args, state)
    assert rel_err(o, ref_o) < BF16_TOL and rel_err(s, ref_s) < BF16_TOL

    one = lambda a: a[:, None]  # a batch of one per device
    o, s = jax.pmap(lambda q, k, v, g, b, s: kda_prefill(q, k, v, g, b, initial_state=s, **kwargs))(
        *(one(a) for a in problem.args), one(state))
    assert rel_err(jnp.squeeze(o, 1), ref_o) < BF16_TOL and rel_err(jnp.squeeze(s, 1), ref_s) < BF16_TOL
    assert o.sharding.num_devices == n
