"""HF tensors -> `Weights` placed straight into their target shardings.

Every leaf is built block by block (as `jax.make_array_from_callback` does, see
`_place`): for each block a local device holds, a reader fetches only the HF
rows/columns that block covers (one layer's tensor at a time for the stacked
`layers` axis), converts that slice to our layout and dtype, and puts it on its
device. No process ever holds a whole checkpoint, a whole leaf on one device,
or tensors its devices do not need; host memory holds one block in transit.

A source is anything with `shapes` ({HF name: HF shape}) and
`read(name, index) -> numpy` (index: one slice per HF axis); files are read by
`safetensors_io.SafetensorsSource` and `gguf.GGUFSource`, dicts by `DictSource`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.config import ModelConfig
from diffmas_jax.params import HFLayout, LayerWeights, Weights, param_dtype, plan_hf_tensors

Index = tuple[slice, ...]


class TensorSource(Protocol):
  shapes: Mapping[str, tuple[int, ...]]

  def read(self, name: str, index: Index) -> np.ndarray:
    """The block `index` (one slice per HF axis) of tensor `name`, HF layout, stored dtype."""


class DictSource:
  """An in-memory {HF name: array} state dict; `consume` drops tensors once converted."""

  def __init__(self, state: dict[str, Any], consume: bool = False):
    self.state, self.consume = state, consume
    self.shapes = {k: tuple(np.shape(v)) for k, v in state.items()}

  def read(self, name: str, index: Index) -> np.ndarray:
    return np.asarray(self.state[name])[index]

  def release(self, name: str) -> None:
    if self.consume:
      self.state.pop(name, None)


def _normalise(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """(start, stop) per axis; missing trailing axes are whole."""
  out = []
  for axis, n in enumerate(shape):
    s = index[axis] if axis < len(index) else slice(None)
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided block {s} is not supported")
    out.append((start, stop))
  return out


def read_block(source: TensorSource, name: str, layout: HFLayout, index: Index) -> np.ndarray:
  """Block `index` of our layout of HF tensor `name`, reading only the HF rows/cols it covers.

  An HF axis split into (outer, *inner) sizes (e.g. q rows = heads x head_dim)
  is read as whole outer units; inner sub-ranges are cut locally afterwards.

  Returns:
    The block in our layout (a transposed view; stored dtype).
  """
  ours = _normalise(index, layout.shape)
  view_range: list[tuple[int, int]] = [(0, 0)] * len(ours)
  for j, p in enumerate(layout.perm):
    view_range[p] = ours[j]
  stored, view_shape, local = [], [], []
  axis = 0
  for group in layout.view:
    inner = math.prod(group[1:])
    (o0, o1), rest = view_range[axis], view_range[axis + 1:axis + len(group)]
    stored.append(slice(o0 * inner, o1 * inner))
    view_shape += [o1 - o0, *group[1:]]
    local += [slice(0, o1 - o0)] + [slice(a, b) for a, b in rest]
    axis += len(group)
  raw = np.asarray(source.read(name, tuple(stored)))
  return raw.reshape(view_shape)[tuple(local)].transpose(layout.perm)


def _layer_leaf_reader(source, names: list[str], layout: HFLayout, dtype):
  """index over [L, *ours] -> that block, assembled one layer's HF tensor at a time."""
  def read(index: Index) -> np.ndarray:
    (l0, l1), *ours = _normalise(index, (len(names), *layout.shape))
    out = np.empty((l1 - l0, *(b - a for a, b in ours)), dtype)
    for j, i in enumerate(range(l0, l1)):
      out[j] = read_block(source, names[i], layout, tuple(slice(a, b) for a, b in ours))
    return out
  return read


def _top_leaf_reader(source, name: str, layout: HFLayout, dtype):
  return lambda index: np.ascontiguousarray(read_block(source, name, layout, index), dtype)


def _place(read, shape: tuple[int, ...], sharding) -> jax.Array:
  """One leaf: onto `sharding` block by block, or whole onto the default device.

  Like `jax.make_array_from_callback`, but each block goes to its device(s)
  as soon as it is read: make_array_from_callback first collects every local
  block, i.e. a whole leaf of host memory on a single host, before transferring
  any. Devices that replicate a block share one read.
  """
  if sharding is None:
    return jnp.asarray(read((slice(None),) * len(shape)))
  devices_of: dict[tuple, list] = {}
  index_map = sharding.addressable_devices_indices_map(shape)
  for device, index in index_map.items():
    devices_of.setdefault(tuple(_normalise(index, shape)), []).append(device)
  placed = {}
  for key, devices in devices_of.items():
    block = read(tuple(slice(a, b) for a, b in key))
    for device in devices:
      placed[device] = jax.device_put(block, device).block_until_ready()  # then drop `block`
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding,
                                                  [placed[d] for d in index_map])


def load_weights(cfg: ModelConfig, source: TensorSource, shardings: Weights | None = None
                 ) -> Weights:
  """Builds `Weights` from HF-named tensors, leaf by leaf.

  Args:
    cfg: the model config (names and shapes are checked against it before any
      tensor data is read).
    source: the HF tensors (see module docstring).
    shardings: a `Weights` tree of target shardings (`sharding.weight_shardings`);
      each process then reads only the blocks of its addressable devices. None
      puts every leaf whole on the default device (uncommitted, as `jnp.asarray`).

  Returns:
    The weights in `param_dtype(cfg)`.
  """
  plan = plan_hf_tensors(cfg, source.shapes)
  dtype = np.dtype(param_dtype(cfg))
  release = getattr(source, "release", lambda name: None)
  num_layers = cfg.num_layers

  def sharding_of(path: str):
    node = shardings
    for part in path.split("."):
      node = getattr(node, part) if node is not None else None
    return node

  layers = {}
  for ours, (names, layout) in plan.layers.items():
    layers[ours] = _place(_layer_leaf_reader(source, names, layout, dtype),
                          (num_layers, *layout.shape), sharding_of(f"layers.{ours}"))
    for name in names:
      release(name)
  top = {}
  for ours, (name, layout) in plan.top.items():
    top[ours] = _place(_top_leaf_reader(source, name, layout, dtype), layout.shape,
                       sharding_of(ours))
    release(name)
  return Weights(embed=top["embed"], layers=LayerWeights(**layers),
                 final_norm=top["final_norm"], lm_head=top.get("lm_head"))
