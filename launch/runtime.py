"""Process-level setup shared by the launchers: multi-host init, mesh, workdir."""

from __future__ import annotations

import os

import jax
import ml_collections as mlc

from diffmas_jax import sharding


def init_runtime(multihost: bool = False) -> None:
  """Joins a multi-process JAX job when asked (TPU pods, SLURM, or JAX_* env vars)."""
  if multihost:
    jax.distributed.initialize()
  if jax.process_index() == 0:
    print(f"JAX {jax.__version__}: {jax.process_count()} process(es), "
          f"{jax.device_count()} {jax.default_backend()} device(s)")


def mesh_from_config(mesh_cfg: mlc.ConfigDict, model_cfg=None) -> jax.sharding.Mesh:
  """The mesh of `mesh_cfg` (parallelism modes need `model_cfg`: sharding.resolve_mesh_sizes)."""
  mesh = sharding.make_mesh(**sharding.resolve_mesh_sizes(mesh_cfg, model_cfg))
  if jax.process_index() == 0:
    print(f"mesh {dict(mesh.shape)} (mesh.parallelism={mesh_cfg.get('parallelism', 'manual')})")
  return mesh


def make_workdir(workdir: str, default_name: str) -> str:
  """Resolves and creates the run directory (runs/<name> when not given)."""
  workdir = workdir or os.path.join("runs", default_name)
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
  return workdir
