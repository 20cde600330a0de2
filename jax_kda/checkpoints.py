"""Checkpoint import for `jax_kda.flax.KimiDeltaAttention`: state dicts (PyTorch tensors or arrays) and
Hugging Face safetensors folders, with FLA's layer names or Kimi-Linear's.

PyTorch keeps a Linear weight as [out, in] and a depthwise Conv1d weight as [D, 1, size]; the layer keeps
[in, out] and [size, D]. A stored tensor may differ from the PyTorch shape the layer wants only by axes of
size 1 (Kimi-Linear stores A_log as [1, 1, H, 1]). Any other difference is an error: a reshape to the right
element count would silently scramble a transposed weight.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import numpy as np
from flax import nnx
from flax.linen import logical_to_mesh_axes

if TYPE_CHECKING:
    from .flax import KimiDeltaAttention

_RENAMES = {  # FLA's Sequential names -> this layer's (Kimi-Linear's) names
    "f_proj.0": "f_a_proj", "f_proj.1": "f_b_proj", "g_proj.0": "g_a_proj", "g_proj.1": "g_b_proj",
}
_KDA_MARKER = "f_a_proj.weight"  # a name only a KDA layer has (after the renames)
KIMI_LINEAR_PREFIX = "model.layers.{i}.self_attn."  # where Kimi-Linear keeps layer i's attention


class _Slot(NamedTuple):
    """One parameter of the layer and how it is stored."""

    name: str  # the checkpoint's name, without the prefix
    var: nnx.Variable
    stored_shape: tuple  # its shape as PyTorch keeps it
    to_layer: Callable[[np.ndarray], np.ndarray]  # from stored_shape to the layer's layout


def _slots(params: nnx.State) -> list[_Slot]:
    slots = []
    for path, var in nnx.to_flat_state(params):
        module, leaf = ".".join(map(str, path[:-1])), str(path[-1])
        shape = tuple(var.shape)
        if leaf == "kernel":
            slots.append(_Slot(f"{module}.weight", var, shape[::-1], np.transpose))
        elif module.endswith("conv1d") and leaf == "weight":
            size, features = shape
            slots.append(_Slot(f"{module}.weight", var, (features, 1, size), lambda w: w[:, 0].T))
        else:
            slots.append(_Slot(f"{module}.{leaf}" if module else leaf, var, shape, lambda w: w))
    return slots


def _layer_name(name: str) -> str:
    for old, new in _RENAMES.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _without_unit_axes(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def _host_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, float32 holds it exactly
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _placement(var: nnx.Variable, mesh, rules) -> Optional[jax.sharding.NamedSharding]:
    if mesh is None:
        return None
    logical = var.get_metadata().get("out_sharding")
    spec = logical_to_mesh_axes(logical, rules) if logical else jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(mesh, spec)


def _load(layer: KimiDeltaAttention, names: Iterable[str], shape_of, read, prefix: str, mesh, rules) -> None:
    """Checks every name and shape, then reads, converts and places one tensor at a time."""
    stored = {_layer_name(n[len(prefix):]): n for n in names if n.startswith(prefix)}
    if not stored:
        raise KeyError(f"the checkpoint has no tensor under the prefix '{prefix}'")
    params = nnx.state(layer, nnx.Param)
    slots = _slots(params)
    missing = {s.name: s.stored_shape for s in slots if s.name not in stored}
    if missing:
        hint = " (Kimi-Linear has no output-gate bias: gate_bias=False)" if "g_b_proj.bias" in missing else ""
        raise KeyError(f"the checkpoint has no {', '.join(f'{prefix}{n} {shape}' for n, shape in missing.items())}"
                       + hint)
    unknown = sorted(set(stored) - {s.name for s in slots})
    if unknown:
        raise KeyError(f"names the layer does not have: {', '.join(stored[u] for u in unknown)}")
    for s in slots:
        found = tuple(shape_of(stored[s.name]))
        if _without_unit_axes(found) != _without_unit_axes(s.stored_shape):
            raise ValueError(f"'{stored[s.name]}' has shape {found}, the layer wants {s.stored_shape} "
                             "(as PyTorch stores it; only axes of size 1 may differ)")
    for s in slots:
        value = s.to_layer(_host_array(read(stored[s.name])).reshape(s.stored_shape))
        s.var.set_value(jax.device_put(value.astype(s.var.dtype, copy=False), _placement(s.var, mesh, rules)))
    nnx.update(layer, params)


def load_torch_state_dict(layer: KimiDeltaAttention, state_dict: Mapping, prefix: str = "", *, mesh=None,
                          rules=None) -> None:
    """Loads a state dict with FLA's layer naming or Kimi-Linear's into `layer`.

    `state_dict` maps names to torch tensors or arrays (ml_dtypes bfloat16 included, as safetensors gives
    them); `prefix` selects one layer of a model's dict (e.g. "model.layers.0.self_attn."). Every
    parameter of the layer must be present with its shape, and nothing else under the prefix. `mesh` and
    `rules` place the parameters as `load_safetensors` does.
    """
    _load(layer, state_dict.keys(), lambda n: state_dict[n].shape, state_dict.__getitem__, prefix, mesh, rules)


class _SafetensorsCheckpoint:
    """A Hugging Face safetensors checkpoint (a folder with `model.safetensors.index.json` or
    `model.safetensors`, or one file), read lazily: each file is opened (memory-mapped) when a tensor in it
    is first wanted, and tensors are read one at a time."""

    def __init__(self, path: str, files: contextlib.ExitStack):
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise ImportError("reading safetensors checkpoints needs safetensors: pip install safetensors") from error
        self._safe_open, self._files, self._open = safe_open, files, {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {n: os.path.join(path, file) for n, file in json.load(f)["weight_map"].items()}
            return
        single = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{path} holds neither model.safetensors.index.json nor model.safetensors")
        self.file_of = dict.fromkeys(self._file(single).keys(), single)

    def _file(self, path):
        if path not in self._open:
            self._open[path] = self._files.enter_context(self._safe_open(path, framework="numpy"))
        return self._open[path]

    def shape(self, name: str) -> tuple:
        return tuple(self._file(self.file_of[name]).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._file(self.file_of[name]).get_tensor(name)

    def load(self, layer, prefix, mesh, rules):
        _load(layer, self.file_of, self.shape, self.read, prefix, mesh, rules)


def load_safetensors(layer: KimiDeltaAttention, path: str, prefix: str = "", *, mesh=None, rules=None) -> None:
    """Loads one layer from a Hugging Face safetensors checkpoint (`path`: a folder with
    `model.safetensors.index.json` or `model.safetensors`, or a `.safetensors` file), one tensor at a time.

    `prefix` selects the layer, e.g. `KIMI_LINEAR_PREFIX.format(i=3)`. With a `mesh`, each parameter is
    placed with `NamedSharding(mesh, flax.linen.logical_to_mesh_axes(its logical axes, rules))`: `rules`
    are (logical axis, mesh axis) pairs, the first that fits wins, logical axes no rule maps are
    replicated; `rules=None` takes those of the surrounding `nnx.logical_axis_rules` context. The layer's
    logical axes are "embed", "heads", "rank", "conv" and "head_dim". Without a mesh, the parameters are
    arrays on the default device. `layer` may be abstract (`nnx.eval_shape`), so that nothing is
    initialised only to be overwritten.
    """
    with contextlib.ExitStack() as files:
        _SafetensorsCheckpoint(path, files).load(layer, prefix, mesh, rules)


def kda_layer_indices(path: str, prefix_pattern: str = KIMI_LINEAR_PREFIX) -> list[int]:
    """The indices i of the layers of a safetensors checkpoint whose attention under
    `prefix_pattern.format(i=i)` is KDA (Kimi-Linear's other layers are MLA), in increasing order."""
    with contextlib.ExitStack() as files:
        names = _SafetensorsCheckpoint(path, files).file_of
    parts = prefix_pattern.split("{i}")
    if len(parts) != 2:
        raise ValueError(f"prefix_pattern must hold '{{i}}' once, got '{prefix_pattern}'")
    before, after = map(re.escape, parts)
    layer = re.compile(f"{before}([0-9]+){after}(.+)")
    return sorted({int(m[1]) for m in map(layer.fullmatch, names) if m and _layer_name(m[2]) == _KDA_MARKER})


def load_safetensors_layers(layers: Mapping[int, KimiDeltaAttention], path: str,
                            prefix_pattern: str = KIMI_LINEAR_PREFIX, *, mesh=None, rules=None) -> None:
    """Loads several layers of a model from one safetensors checkpoint: `layers[i]` from the tensors under
    `prefix_pattern.format(i=i)`, each as `load_safetensors` loads one (`kda_layer_indices` lists the KDA
    layers of a checkpoint)."""
    with contextlib.ExitStack() as files:
        checkpoint = _SafetensorsCheckpoint(path, files)
        for i, layer in layers.items():
            checkpoint.load(layer, prefix_pattern.format(i=i), mesh, rules)
