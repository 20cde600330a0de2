"""Checkpoint import: Kimi-Linear's KDA layer inventory in bfloat16, strict shapes, safetensors folders read
lazily, parameters placed on a mesh by their logical axes; outputs against the float64 NumPy layer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("flax")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
import ml_dtypes  # noqa: E402  (installed with jax)
import safetensors  # noqa: E402
from flax import nnx  # noqa: E402

from jax_kda.flax import (  # noqa: E402
    KimiDeltaAttention,
    kda_layer_indices,
    load_safetensors,
    load_safetensors_layers,
    load_torch_state_dict,
)
from oracle import rel_err  # noqa: E402
from oracle_layer import KIMI_LINEAR_NAMES, kda_layer_oracle, random_state_dict  # noqa: E402

KIMI_LINEAR_48B = dict(hidden_size=2304, num_heads=32, head_dim=128)  # its 20 KDA layers
SMALL = dict(hidden_size=40, num_heads=4, head_dim=8)


def kimi_linear_layer(prefix, rng, *, hidden_size, num_heads, head_dim):
    """Random weights of one KDA layer as Kimi-Linear stores them: its names under `prefix`, A_log
    [1, 1, H, 1], conv weights [D, 1, 4], dt_bias [H * K], no output-gate bias, all bfloat16."""
    fla = random_state_dict(rng, hidden=hidden_size, num_heads=num_heads, head_dim=head_dim, gate_bias=False)
    stored = {}
    for name, value in fla.items():
        module, _, leaf = name.rpartition(".")
        if name == "A_log":
            value = value.reshape(1, 1, -1, 1)
        stored[prefix + (f"{KIMI_LINEAR_NAMES.get(module, module)}.{leaf}" if module else leaf)] = value
    return {name: value.astype(ml_dtypes.bfloat16) for name, value in stored.items()}


def under(prefix, tensors):
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def make_layer(abstract=False, **kw):
    make = lambda: KimiDeltaAttention(**{**SMALL, **kw}, gate_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()


def layer_arrays(layer):
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def test_kimi_linear_48b_inventory(rng):
    """A KDA layer of Kimi-Linear-48B-A3B with its real names, shapes and bf16 storage, loaded into an
    abstract layer (nothing initialised), against the float64 NumPy layer on the same weights."""
    prefix = "model.layers.5.self_attn."
    tensors = kimi_linear_layer(prefix, rng, **KIMI_LINEAR_48B)
    assert {name: value.shape for name, value in under(prefix, tensors).items()} == {
        "q_proj.weight": (4096, 2304), "k_proj.weight": (4096, 2304), "v_proj.weight": (4096, 2304),
        "q_conv1d.weight": (4096, 1, 4), "k_conv1d.weight": (4096, 1, 4), "v_conv1d.weight": (4096, 1, 4),
        "A_log": (1, 1, 32, 1), "dt_bias": (4096,), "f_a_proj.weight": (128, 2304), "f_b_proj.weight": (4096, 128),
        "b_proj.weight": (32, 2304), "g_a_proj.weight": (128, 2304), "g_b_proj.weight": (4096, 128),
        "o_norm.weight": (128,), "o_proj.weight": (2304, 4096),
    }
    layer = make_layer(abstract=True, **KIMI_LINEAR_48B)
    load_torch_state_dict(layer, tensors, prefix)
    x = rng.standard_normal((1, 6, 2304)).astype(np.float32)
    want = kda_layer_oracle(under(prefix, tensors), x, num_heads=32, head_dim=128)
    assert rel_err(layer(jnp.asarray(x)), want) < 1e-4


def test_strict_names_and_shapes(rng, tmp_path):
    prefix = "model.layers.0.self_attn."
    tensors = kimi_linear_layer(prefix, rng, **SMALL)
    layer = make_layer()
    before = layer_arrays(layer)

    def load(changes=None, drop=(), **kw):
        changed = {name: value for name, value in {**tensors, **(changes or {})}.items() if name not in drop}
        load_torch_state_dict(kw.pop("into", layer), changed, prefix)

    with pytest.raises(KeyError, match=r"no model\.layers\.0\.self_attn\.b_proj\.weight \(4, 40\)"):
        load(drop=[prefix + "b_proj.weight"])
    with pytest.raises(KeyError, match=r"g_b_proj\.bias \(32,\) \(Kimi-Linear has no output-gate bias"):
        load(into=KimiDeltaAttention(**SMALL, rngs=nnx.Rngs(0)))
    with pytest.raises(KeyError, match=r"does not have: model\.layers\.0\.self_attn\.g_b_proj\.bias"):
        load({prefix + "g_b_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(KeyError, match=r"does not have: model\.layers\.0\.self_attn\.extra\.weight"):
        load({prefix + "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="no tensor under the prefix 'model.layers.0.attn.'"):
        load_torch_state_dict(layer, tensors, "model.layers.0.attn.")
    # Same element count, another layout: a transposed weight, dt_bias as [H, K], a conv weight [size, 1, D].
    wrong = {
        "f_a_proj.weight": (tensors[prefix + "f_a_proj.weight"].T, r"\(40, 8\), the layer wants \(8, 40\)"),
        "dt_bias": (tensors[prefix + "dt_bias"].reshape(4, 8), r"\(4, 8\), the layer wants \(32,\)"),
        "q_conv1d.weight": (tensors[prefix + "q_conv1d.weight"].transpose(2, 1, 0),
                            r"\(4, 1, 32\), the layer wants \(32, 1, 4\)"),
    }
    for name, (value, shapes) in wrong.items():
        with pytest.raises(ValueError, match=rf"'model\.layers\.0\.self_attn\.{name}' has shape {shapes}"):
            load({prefix + name: value})
    for path, value in layer_arrays(layer).items():  # every check runs before anything is written
        np.testing.assert_array_equal(value, before[path])
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_safetensors(layer, str(tmp_path), prefix)


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    prefix = "model.layers.0.self_attn."
    tensors = kimi_linear_layer(prefix, rng, **SMALL)
    as_torch = {n: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for n, v in tensors.items()}
    a, b = make_layer(), make_layer()
    load_torch_state_dict(a, tensors, prefix)
    load_torch_state_dict(b, as_torch, prefix)
    for path, value in layer_arrays(b).items():
        np.testing.assert_array_equal(value, layer_arrays(a)[path])


def write_sharded_checkpoint(folder, tensors):
    """Two files and model.safetensors.index.json, as Hugging Face writes a model; each layer spans both."""
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        safetensors_numpy.save_file({n: tensors[n] for n in part}, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def record_reads(monkeypatch):
    """Names of the tensors read through safetensors.safe_open, in order."""
    reads, real_open = [], safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            reads.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return reads


def test_safetensors_folder_on_a_mesh(rng, tmp_path, monkeypatch):
    """Layers 0 and 2 of a three-layer model are KDA, layer 1 is MLA; each KDA tensor is read once, nothing
    else is, and every parameter lands on the 2 x 4 mesh with the sharding its logical axes ask for."""
    kda = {i: kimi_linear_layer(f"model.layers.{i}.self_attn.", rng, **SMALL) for i in (0, 2)}
    other = {"model.embed_tokens.weight": (100, 40), "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (24, 40),
             "model.layers.1.self_attn.o_proj.weight": (40, 32), "model.layers.0.input_layernorm.weight": (40,)}
    tensors = {**kda[0], **kda[2], **{n: rng.standard_normal(s).astype(ml_dtypes.bfloat16) for n, s in other.items()}}
    write_sharded_checkpoint(tmp_path, tensors)
    assert kda_layer_indices(str(tmp_path)) == [0, 2]

    reads = record_reads(monkeypatch)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    layers = {i: make_layer() for i in (0, 2)}
    load_safetensors_layers(layers, str(tmp_path), mesh=mesh, rules=(("embed", "data"), ("heads", "model")))
    assert sorted(reads) == sorted([*kda[0], *kda[2]])

    # "embed" -> data, "heads" -> model; "rank", "conv" and "head_dim" have no rule: replicated.
    want = {
        ("q_proj", "kernel"): P("data", "model"), ("k_proj", "kernel"): P("data", "model"),
        ("v_proj", "kernel"): P("data", "model"), ("q_conv1d", "weight"): P(None, "model"),
        ("k_conv1d", "weight"): P(None, "model"), ("v_conv1d", "weight"): P(None, "model"),
        ("f_a_proj", "kernel"): P("data", None), ("f_b_proj", "kernel"): P(None, "model"),
        ("b_proj", "kernel"): P("data", "model"), ("g_a_proj", "kernel"): P("data", None),
        ("g_b_proj", "kernel"): P(None, "model"), ("A_log",): P("model"), ("dt_bias",): P("model"),
        ("o_norm", "weight"): P(), ("o_proj", "kernel"): P("model", "data"),
    }
    for i, layer in layers.items():
        params = dict(nnx.to_flat_state(nnx.state(layer, nnx.Param)))
        assert set(params) == set(want)
        for path, spec in want.items():
            array = params[path].get_value()
            assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (path, array.sharding)
        x = rng.standard_normal((2, 9, 40)).astype(np.float32)
        expected = kda_layer_oracle(under(f"model.layers.{i}.self_attn.", tensors), x, num_heads=4, head_dim=8)
        assert rel_err(layer(jnp.asarray(x)), expected) < 1e-4


def test_single_safetensors_file_without_mesh(rng, tmp_path):
    prefix = "model.layers.3.self_attn."
    tensors = kimi_linear_layer(prefix, rng, **SMALL)
    safetensors_numpy.save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    layer, from_dict = make_layer(abstract=True), make_layer()
    load_safetensors(layer, str(tmp_path), prefix)
    load_torch_state_dict(from_dict, tensors, prefix)
    for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        assert var.get_value().sharding.device_set == {jax.devices()[0]}  # a plain array on the default device
    x = jnp.asarray(rng.standard_normal((1, 7, 40)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(from_dict(x)))
