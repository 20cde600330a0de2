import gc
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# Eight CPU devices for the sharding tests; set before any computation initialises the backends.
jax.config.update("jax_num_cpu_devices", 8)

from inputs import make_case  # noqa: E402


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (Hopper for the kernels); skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test file. XLA:CPU keeps every live executable's code in
    memory mappings of its own, and a process may hold at most vm.max_map_count (65530 by default) of
    them: the whole suite in one process, hundreds of distinct programs, passed that limit, a compile
    then failed and the process crashed (docs/PERFLOG.md, CPU section)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is in the test's report so a failure can be replayed
    with JAX_KDA_TEST_SEED."""
    seed = int(os.environ.get("JAX_KDA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def case(rng):
    return lambda **kw: make_case(rng, **kw)
