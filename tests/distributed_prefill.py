"""One process of test_sharding's multi-process test: `python distributed_prefill.py PORT PROCESS_ID`.

Two processes of 4 CPU devices each form one 8-device mesh through jax.distributed on localhost and
run a prefill sharded over batch, heads and tokens (context parallel); each checks its shards against
its own single-device run of the same inputs and prints "ok".
"""

import sys

import jax

port, process_id = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from jax_kda import kda_prefill  # noqa: E402

rng = np.random.default_rng(0)  # the same inputs in both processes
B, T, H, K = 2, 128, 4, 16
arrays = [rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(3)]
g = -np.abs(rng.standard_normal((B, T, H, K))).astype(np.float32) * 0.3
beta = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
state = rng.standard_normal((B, H, K, K)).astype(np.float32)
kwargs = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)

with jax.default_device(jax.local_devices()[0]):
    want_o, want_s = kda_prefill(*arrays, g, beta, initial_state=state, **kwargs)

mesh = jax.make_mesh((2, 2, 2), ("b", "t", "h"), axis_types=(AxisType.Auto,) * 3)
glob = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])
token_spec = P("b", "t", "h")
args = [glob(a, P("b", "t", "h", None)) for a in (*arrays, g)] + [glob(beta, token_spec)]
got_o, got_s = jax.jit(lambda *a, s: kda_prefill(*a, initial_state=s, **kwargs))(*args, s=glob(state, P("b", "h")))

for got, want in ((got_o, want_o), (got_s, want_s)):
    for shard in got.addressable_shards:
        diff = np.asarray(shard.data) - np.asarray(want)[shard.index]
        assert np.sqrt(np.mean(diff**2)) < 1e-5 * np.sqrt(np.mean(np.asarray(want) ** 2)) + 1e-7
print("ok", process_id)
