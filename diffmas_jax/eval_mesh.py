"""Evaluation's mesh: each batch split over this process's own devices.

Processes evaluate different batches (evaluation.py deals them round robin),
so the inference mesh holds only local devices: the weights' own mesh
restricted to this process (`local_mesh`), or every local device on the data
axis when the weights sit on one device. Rows are split over the mesh's batch
axes (data, fsdp), weights stay as sharded (or are replicated), and a batch
whose size does not divide the batch shards is padded (`padded_rows`; the
harness drops the padding rows' outputs).

    mesh = inference_mesh(weights)
    weights = on_mesh(weights, mesh)
    batch = put_pipeline(encode_pipeline(...), mesh)   # [A, B, T] / [B, T] split on B
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffmas_jax import sharding


def local_mesh(mesh: Mesh) -> Mesh:
  """This process's block of `mesh`: its rows along the first (data) axis, same axis names.

  Raises ShardingError when the other axes (fsdp x tensor) span processes: a
  process could then not run a batch on its own.
  """
  me = jax.process_index()
  mine = np.vectorize(lambda d: d.process_index == me, otypes=[bool])(mesh.devices)
  if mine.all():
    return mesh
  rows = mine.reshape(mine.shape[0], -1)
  whole = rows.all(axis=1)
  if not whole.any() or (rows.any(axis=1) != whole).any():
    raise sharding.ShardingError(
        f"evaluation runs each process on its own devices, but mesh {dict(mesh.shape)} splits "
        f"{' x '.join(mesh.axis_names[1:])} across processes; use a mesh whose non-data axes fit "
        "in one host (e.g. --config.mesh.parallelism=tensor or data)")
  return Mesh(mesh.devices[whole], mesh.axis_names)


def host_block(mesh: Mesh, local_devices: int | None) -> Mesh:
  """The block of `mesh` that one host of `local_devices` devices evaluates on (what
  `local_mesh` gives each process), for planning with fake devices in one process."""
  per_row = mesh.devices[0].size  # fsdp x tensor
  if local_devices is None or local_devices >= mesh.devices.size:
    return mesh
  if local_devices % per_row:
    raise sharding.ShardingError(
        f"fsdp x tensor = {per_row} devices do not fit one host of {local_devices}: evaluation "
        "runs each process on its own devices; choose a mesh whose non-data axes fit a host")
  return Mesh(mesh.devices[:local_devices // per_row], mesh.axis_names)


def _leaf_mesh(tree: Any) -> Mesh | None:
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def inference_mesh(weights: Any) -> Mesh:
  """The local block of the weights' mesh, or all local devices on the data axis."""
  mesh = _leaf_mesh(weights)
  if mesh is not None:
    return local_mesh(mesh)
  return sharding.make_mesh(data=-1, devices=jax.local_devices())


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Every array leaf on `mesh`: leaves already there are kept; leaves on a mesh
  whose local block is `mesh` are re-wrapped from this process's shards (no
  copy, no communication); any other leaf is replicated."""
  replicated = NamedSharding(mesh, P())

  def one(x):
    sh = getattr(x, "sharding", None)
    if not isinstance(sh, NamedSharding) or sh.mesh == mesh:
      return x if isinstance(sh, NamedSharding) else jax.device_put(x, replicated)
    if local_mesh(sh.mesh) != mesh:
      return jax.device_put(x, replicated)
    if "data" in jax.tree.leaves(tuple(sh.spec)):
      raise sharding.ShardingError(f"a {x.shape} leaf is split over the data axis; evaluation "
                                   "needs weights and adapters whole along it")
    local = NamedSharding(mesh, sh.spec)
    shards = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, local, [shards[d] for d in local.addressable_devices_indices_map(x.shape)])

  return jax.tree.map(one, tree)


def padded_rows(rows: int, mesh: Mesh | None) -> int:
  """`rows` rounded up to a multiple of the mesh's batch shards (padding is dropped later)."""
  shards = 1 if mesh is None else sharding.batch_shards(mesh)[0]
  return -(-rows // shards) * shards


def put_rows(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """[B, ...] host rows -> a device array split on B over the batch axes (None: default device)."""
  if mesh is None:
    return jnp.asarray(x)
  axes = ("batch",) + (None,) * (np.ndim(x) - 1)
  return jax.device_put(x, sharding.named_sharding(mesh, axes, np.shape(x)))


def put_pipeline(batch: Any, mesh: Mesh | None) -> Any:
  """A PipelineBatch of numpy arrays -> device arrays split on the batch axis."""
  if mesh is None:
    return batch.as_jax()
  return jax.device_put(batch, sharding.batch_shardings(mesh, batch))
