"""The Flax KimiDeltaAttention layer: forward against float64 NumPy, cache and decode, import, Linen."""

import importlib
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_kda import kda_decode_step, kda_prefill  # noqa: E402
from jax_kda.flax import KimiDeltaAttention, load_torch_state_dict  # noqa: E402
from oracle import rel_err  # noqa: E402
from oracle_layer import kda_layer_oracle, random_state_dict  # noqa: E402

DIMS = dict(hidden=48, num_heads=2, head_dim=16, num_v_heads=4)


def make_layer(dtype=jnp.float32, **kw):
    return KimiDeltaAttention(hidden_size=DIMS["hidden"], num_heads=DIMS["num_heads"], head_dim=DIMS["head_dim"],
                              num_v_heads=DIMS["num_v_heads"], dtype=dtype, rngs=nnx.Rngs(0), **kw)


@pytest.fixture
def weights(rng):
    return random_state_dict(rng, **DIMS)


@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus", "bounded"])
def test_forward_matches_float64_numpy(rng, weights, lower_bound):
    layer = make_layer(lower_bound=lower_bound)
    load_torch_state_dict(layer, weights)
    x = rng.standard_normal((2, 45, DIMS["hidden"])).astype(np.float32)
    want = kda_layer_oracle(weights, x, num_heads=2, head_dim=16, num_v_heads=4, lower_bound=lower_bound)
    assert rel_err(layer(jnp.asarray(x)), want) < 1e-4


def test_without_output_gate_bias(rng):
    """Kimi-Linear's configuration: no g_b_proj bias in the layer, the checkpoint or the oracle."""
    weights = random_state_dict(rng, **DIMS, gate_bias=False)
    layer = make_layer(gate_bias=False)
    assert layer.g_b_proj.bias is None
    load_torch_state_dict(layer, weights)
    x = rng.standard_normal((2, 21, DIMS["hidden"])).astype(np.float32)
    want = kda_layer_oracle(weights, x, num_heads=2, head_dim=16, num_v_heads=4)
    assert rel_err(layer(jnp.asarray(x)), want) < 1e-4


def test_bf16_forward(rng, weights):
    layer = make_layer(dtype=jnp.bfloat16)
    load_torch_state_dict(layer, weights)
    x = rng.standard_normal((1, 70, DIMS["hidden"])).astype(np.float32)
    want = kda_layer_oracle(weights, x, num_heads=2, head_dim=16, num_v_heads=4)
    out = layer(jnp.asarray(x))
    assert out.dtype == jnp.bfloat16 and rel_err(out.astype(jnp.float32), want) < 3e-2


def test_packed_batch(rng, weights):
    layer = make_layer()
    load_torch_state_dict(layer, weights)
    cu = np.array([0, 9, 9, 40, 41])
    x = rng.standard_normal((1, 41, DIMS["hidden"])).astype(np.float32)
    want = kda_layer_oracle(weights, x, num_heads=2, head_dim=16, num_v_heads=4, cu_seqlens=cu)
    assert rel_err(layer(jnp.asarray(x), cu_seqlens=cu), want) < 1e-4


def test_prefill_then_decode_equals_one_prefill(rng):
    layer = make_layer()
    x = jnp.asarray(rng.standard_normal((3, 30, DIMS["hidden"])), jnp.float32)
    whole = layer(x)
    out, cache = layer(x[:, :17], cache=layer.init_cache(3))
    step = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    pieces = [out]
    for t in range(17, 30):
        o, cache = step(layer, x[:, t : t + 1], cache)
        pieces.append(o)
    assert rel_err(jnp.concatenate(pieces, axis=1), whole) < 1e-5
    # Prefill in two pieces too.
    a, cache = layer(x[:, :5], cache=layer.init_cache(3))
    b, _ = layer(x[:, 5:], cache=cache)
    assert rel_err(jnp.concatenate([a, b], axis=1), whole) < 1e-5


def test_decode_step_compiles_once(rng):
    layer = make_layer()
    traces = []

    @nnx.jit
    def step(layer, x, cache):
        traces.append(1)
        return layer(x, cache=cache)

    cache = layer.init_cache(2)
    for _ in range(4):
        _, cache = step(layer, jnp.asarray(rng.standard_normal((2, 1, DIMS["hidden"])), jnp.float32), cache)
    assert len(traces) == 1


def test_padded_batch_with_mask(rng):
    layer = make_layer()
    x = jnp.asarray(rng.standard_normal((2, 25, DIMS["hidden"])), jnp.float32)
    lengths = [25, 11]
    mask = jnp.arange(25)[None] < jnp.asarray(lengths)[:, None]
    out, cache = layer(x, cache=layer.init_cache(2), mask=mask)
    for i, n in enumerate(lengths):
        alone, alone_cache = layer(x[i : i + 1, :n], cache=layer.init_cache(1))
        assert rel_err(out[i, :n], alone[0]) < 1e-5
        for got, want in zip(cache, alone_cache):
            assert rel_err(got[i], want[0]) < 1e-5
    assert not np.any(np.asarray(out[1, 11:]))  # padding outputs are zero


def poison_padding(rng, x, mask):
    """x with NaN, Inf and -Inf where mask is False."""
    poisoned = np.array(x)
    poisoned[~mask] = rng.choice([np.nan, np.inf, -np.inf], size=poisoned[~mask].shape)
    return poisoned


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_padding_never_reaches_real_tokens(rng, impl):
    """NaN and Inf in the padding of x: the real tokens' outputs and the cache are bitwise those of a run
    with finite padding, and the padding's outputs are exactly zero; in a prefill and a decode step."""
    layer = make_layer(impl=impl)
    x = rng.standard_normal((2, 19, DIMS["hidden"])).astype(np.float32)
    mask = np.arange(19)[None] < np.array([19, 7])[:, None]
    run = nnx.jit(lambda layer, x, cache, mask: layer(x, cache=cache, mask=mask))
    finite, finite_cache = run(layer, x, layer.init_cache(2), mask)
    poisoned, poisoned_cache = run(layer, poison_padding(rng, x, mask), layer.init_cache(2), mask)
    assert np.isfinite(np.asarray(finite)).all()
    np.testing.assert_array_equal(np.asarray(poisoned)[mask], np.asarray(finite)[mask])
    assert np.all(np.asarray(finite)[~mask] == 0) and np.all(np.asarray(poisoned)[~mask] == 0)
    for got, want in zip(poisoned_cache, finite_cache):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # One decode step in which the second sequence is padding: its cache stays as it was.
    token = rng.standard_normal((2, 1, DIMS["hidden"])).astype(np.float32)
    step_mask = np.array([[True], [False]])
    finite, finite_cache = run(layer, token, finite_cache, step_mask)
    poisoned, poisoned_cache = run(layer, poison_padding(rng, token, step_mask), poisoned_cache, step_mask)
    np.testing.assert_array_equal(np.asarray(poisoned)[0], np.asarray(finite)[0])
    assert np.all(np.asarray(finite)[1] == 0) and np.all(np.asarray(poisoned)[1] == 0)
    for got, want, before in zip(poisoned_cache, finite_cache, run(layer, x, layer.init_cache(2), mask)[1]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got)[1], np.asarray(before)[1])


def test_padding_never_reaches_gradients(rng):
    layer = make_layer(impl="xla")
    x = rng.standard_normal((2, 12, DIMS["hidden"])).astype(np.float32)
    mask = np.arange(12)[None] < np.array([12, 5])[:, None]
    loss = lambda layer, x: jnp.sum(layer(x, mask=mask) ** 2)
    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    (finite_params, finite_x), (poisoned_params, poisoned_x) = grad(layer, x), grad(layer, poison_padding(rng, x, mask))
    for got, want in zip(jax.tree.leaves(poisoned_params), jax.tree.leaves(finite_params)):
        assert np.isfinite(np.asarray(want)).all()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(poisoned_x), np.asarray(finite_x))
    assert not np.any(np.asarray(finite_x)[~mask])  # padding does not move the loss


def test_packed_prefill_fills_each_sequences_cache(rng):
    layer = make_layer()
    seqs = [rng.standard_normal((n, DIMS["hidden"])).astype(np.float32) for n in (2, 13)]
    packed = jnp.asarray(np.concatenate(seqs)[None])
    _, cache = layer(packed, cu_seqlens=np.array([0, 2, 15]), cache=layer.init_cache(2))
    for i, s in enumerate(seqs):
        _, alone = layer(jnp.asarray(s[None]), cache=layer.init_cache(1))
        for got, want in zip(cache, alone):
            assert rel_err(got[i], want[0]) < 1e-5


def test_decode_step_matches_prefill_of_one_token(rng, case):
    c = case(B=3, T=1, H=2, HV=4, K=16, V=8, gate="bounded", state_v_first=True)
    o, s = kda_prefill(*c.args, **c.kwargs)
    squeeze = lambda a: a[:, 0]
    kw = {k: v for k, v in c.kwargs.items() if k != "output_final_state"}
    kw.pop("initial_state")
    o1, s1 = kda_decode_step(*map(squeeze, c.args), c.kwargs["initial_state"], **kw)
    assert rel_err(o1, o[:, 0]) < 1e-6 and rel_err(s1, s) < 1e-6


def test_parameters_carry_logical_axes():
    specs = nnx.get_partition_spec(nnx.state(make_layer(), nnx.Param))
    assert tuple(specs["q_proj"]["kernel"].get_value()) == ("embed", "heads")
    assert tuple(specs["o_proj"]["kernel"].get_value()) == ("heads", "embed")
    assert tuple(specs["f_a_proj"]["kernel"].get_value()) == ("embed", "rank")
    assert tuple(specs["A_log"].get_value()) == ("heads",)


def test_default_initialisation_follows_fla():
    layer = make_layer()
    a = np.exp(np.asarray(layer.A_log[...]))
    assert a.min() >= 1 and a.max() <= 16
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias[...])))  # softplus(dt_bias) = dt
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    bound = 1 / np.sqrt(DIMS["hidden"])
    assert np.abs(np.asarray(layer.q_proj.kernel[...])).max() <= bound
    np.testing.assert_array_equal(np.asarray(layer.o_norm.weight[...]), 1.0)


def test_kimi_linear_names_with_prefix(rng, weights):
    renamed = {}
    for name, value in weights.items():
        for fla, kimi in (("f_proj.0", "f_a_proj"), ("f_proj.1", "f_b_proj"), ("g_proj.0", "g_a_proj"),
                          ("g_proj.1", "g_b_proj")):
            name = name.replace(fla, kimi)
        if name == "A_log":
            value = value.reshape(1, 1, -1, 1)  # Kimi-Linear keeps A_log as [1, 1, HV, 1]
        renamed["model.layers.3.self_attn." + name] = value
    renamed["model.layers.4.self_attn.q_proj.weight"] = weights["q_proj.weight"]  # another layer: ignored
    a, b = make_layer(), make_layer()
    load_torch_state_dict(a, weights)
    load_torch_state_dict(b, renamed, prefix="model.layers.3.self_attn.")
    x = jnp.asarray(rng.standard_normal((1, 20, DIMS["hidden"])), jnp.float32)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_import_errors(weights):
    layer = make_layer()
    missing = {n: v for n, v in weights.items() if n != "b_proj.weight"}
    with pytest.raises(KeyError, match="b_proj.weight"):
        load_torch_state_dict(layer, missing)
    with pytest.raises(KeyError, match="extra.weight"):
        load_torch_state_dict(layer, {**weights, "extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="q_proj.weight"):
        load_torch_state_dict(layer, {**weights, "q_proj.weight": np.zeros((3, 3))})


def test_safetensors_file(tmp_path, rng, weights):
    safetensors = pytest.importorskip("safetensors.numpy")
    path = os.path.join(tmp_path, "layer.safetensors")
    safetensors.save_file(weights, path)
    a, b = make_layer(), make_layer()
    load_torch_state_dict(a, weights)
    load_torch_state_dict(b, safetensors.load_file(path))
    x = jnp.asarray(rng.standard_normal((1, 8, DIMS["hidden"])), jnp.float32)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_linen_bridge(rng):
    from flax.nnx import bridge

    model = bridge.to_linen(KimiDeltaAttention, hidden_size=32, num_heads=2, head_dim=16, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


def test_bad_calls(rng):
    layer = make_layer()
    x = jnp.asarray(rng.standard_normal((2, 4, DIMS["hidden"])), jnp.float32)
    with pytest.raises(ValueError, match="B == 1"):
        layer(x, cu_seqlens=np.array([0, 2, 4]))
    with pytest.raises(ValueError, match="cache holds 3 sequences"):
        layer(x, cache=layer.init_cache(3))
    with pytest.raises(ValueError, match=r"\[B, T, hidden_size\], got shape \(4, 48\)"):
        layer(x[0])
    with pytest.raises(ValueError, match="hidden size 47, the layer 48"):
        layer(x[..., :47])
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] = \(2, 4\), got shape \(4, 2\)"):
        layer(x, mask=np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="mask must be boolean.*float32"):
        layer(x, mask=np.ones((2, 4), np.float32))
    integer_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # boolean-like: taken as its truth values
    np.testing.assert_array_equal(np.asarray(layer(x, mask=integer_mask)), np.asarray(layer(x, mask=integer_mask > 0)))


def test_import_without_flax_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)  # None in sys.modules: "import flax" fails as if missing
    monkeypatch.delitem(sys.modules, "jax_kda.flax")  # import it afresh; restored after the test
    with pytest.raises(ImportError, match=re.escape("jax_kda.flax needs flax: pip install 'jax-kda[flax]'")):
        importlib.import_module("jax_kda.flax")


@pytest.mark.gpu
def test_same_output_as_fla_layer(rng):
    """FLA's torch layer and ours from the same random weights, both against float64 NumPy."""
    os.environ["FLA_FLASH_KDA"] = "0"
    torch = pytest.importorskip("torch")
    fla_kda = pytest.importorskip("fla.layers.kda")
    torch.manual_seed(int(rng.integers(1 << 30)))
    ref = fla_kda.KimiDeltaAttention(hidden_size=256, head_dim=64, num_heads=4, mode="chunk").cuda().float()
    with torch.no_grad():  # the defaults leave o_norm at 1 and the g_proj bias small: vary them too
        ref.o_norm.weight.uniform_(0.5, 1.5)
    weights = {n: t.detach().float().cpu().numpy() for n, t in ref.state_dict().items()}
    ours = KimiDeltaAttention(hidden_size=256, num_heads=4, head_dim=64, dtype=jnp.float32, rngs=nnx.Rngs(0))
    load_torch_state_dict(ours, weights)
    x = rng.standard_normal((2, 100, 256)).astype(np.float32)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).cuda())[0].float().cpu().numpy()
    with jax.default_matmul_precision("float32"):  # the projections in full fp32, not TF32, on the GPU
        mine = np.asarray(ours(jnp.asarray(x)))
    want = kda_layer_oracle(weights, x, num_heads=4, head_dim=64)
    assert rel_err(mine, want) < 1e-4
    assert rel_err(theirs, mine) < 5e-3, (rel_err(theirs, want), rel_err(mine, want))


@pytest.mark.gpu
def test_layer_on_the_kernels(rng):
    """bf16, head size 64: the prefill inside the layer runs jax_kda's CUDA kernels."""
    weights = random_state_dict(rng, hidden=128, num_heads=2, head_dim=64)
    layer = KimiDeltaAttention(hidden_size=128, num_heads=2, head_dim=64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    load_torch_state_dict(layer, weights)
    x = rng.standard_normal((2, 300, 128)).astype(np.float32)
    text = jax.jit(lambda x: layer(x)).lower(jnp.asarray(x)).as_text()
    assert "jax_kda_prefill_cuda" in text
    want = kda_layer_oracle(weights, x, num_heads=2, head_dim=64)
    assert rel_err(np.asarray(layer(jnp.asarray(x)), np.float32), want) < 3e-2
