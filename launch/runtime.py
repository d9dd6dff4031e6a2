"""Process-level setup shared by the launchers: multi-process init, mesh, workdir.

Importing this module defines the multi-process flags (--multihost,
--coordinator_address, --num_processes, --process_id); launchers call
`init_runtime()` before anything touches a JAX device.
"""

from __future__ import annotations

import os
from typing import Mapping

from absl import flags

flags.DEFINE_bool("multihost", False,
                  "Join a multi-process JAX job: cluster auto-detection (Cloud TPU, SLURM, "
                  "Open MPI, Kubernetes), or the three flags below / their JAX_* variables.")
flags.DEFINE_string("coordinator_address", "",
                    "HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS); implies --multihost.")
flags.DEFINE_integer("num_processes", 0, "Processes in the job (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's id, 0..num_processes-1 (or "
                     "JAX_PROCESS_ID).")

# jax 0.10.2 reads JAX_COORDINATOR_ADDRESS (and JAX_LOCAL_DEVICE_IDS,
# JAX_COORDINATOR_BIND_ADDRESS) itself but not these two; we read them here.
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


class MultihostConfigError(ValueError):
  """Inconsistent multi-process settings."""


def distributed_args(multihost: bool, coordinator_address: str = "", num_processes: int = 0,
                     process_id: int = -1, env: Mapping[str, str] | None = None
                     ) -> dict | None:
  """Keyword arguments for jax.distributed.initialize, or None for a single process.

  Flags win over environment variables; what neither gives is left to jax's
  cluster auto-detection (TPU, SLURM, Open MPI, Kubernetes).
  """
  env = os.environ if env is None else env
  try:
    num = num_processes or int(env.get(NUM_PROCESSES_ENV) or 0)
    pid = process_id if process_id >= 0 else int(env.get(PROCESS_ID_ENV) or -1)
  except ValueError as e:
    raise MultihostConfigError(f"{NUM_PROCESSES_ENV} / {PROCESS_ID_ENV} must be integers ({e})"
                               ) from None
  coordinator = coordinator_address or env.get(COORDINATOR_ENV, "")
  explicit = bool(coordinator_address or num_processes or process_id >= 0)
  if not (multihost or explicit):
    return None
  if num and pid >= 0 and not 0 <= pid < num:
    raise MultihostConfigError(f"process_id={pid} is outside 0..{num - 1} "
                               f"(num_processes={num}); give each process its own id")
  if num == 1:
    return None
  args = {}
  if coordinator:
    if ":" not in coordinator:
      raise MultihostConfigError(f"coordinator address {coordinator!r} needs a port: HOST:PORT "
                                 "(e.g. --coordinator_address=10.0.0.1:1234)")
    args["coordinator_address"] = coordinator
  if num:
    args["num_processes"] = num
  if pid >= 0:
    args["process_id"] = pid
  return args


def init_runtime(multihost: bool | None = None) -> None:
  """Joins a multi-process JAX job when asked (flags, JAX_* variables or auto-detection)."""
  import jax

  f = flags.FLAGS
  args = distributed_args(f.multihost if multihost is None else multihost,
                          f.coordinator_address, f.num_processes, f.process_id)
  if args is not None:
    try:
      jax.distributed.initialize(**args)
    except ValueError as e:
      raise MultihostConfigError(
          f"multi-process setup incomplete ({e}); no cluster was auto-detected (Cloud TPU, "
          "SLURM, Open MPI, Kubernetes): pass --coordinator_address=HOST:PORT "
          "--num_processes=N --process_id=I to every process (or set JAX_COORDINATOR_ADDRESS, "
          "JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from None
  if jax.process_index() == 0:
    print(f"JAX {jax.__version__}: {jax.process_count()} process(es), "
          f"{jax.device_count()} {jax.default_backend()} device(s) "
          f"({jax.local_device_count()} per process)")


def mesh_from_config(mesh_cfg, model_cfg=None):
  """The mesh of `mesh_cfg` (parallelism modes need `model_cfg`: sharding.resolve_mesh_sizes)."""
  import jax

  from diffmas_jax import sharding
  mesh = sharding.make_mesh(**sharding.resolve_mesh_sizes(mesh_cfg, model_cfg))
  if jax.process_index() == 0:
    print(f"mesh {dict(mesh.shape)} (mesh.parallelism={mesh_cfg.get('parallelism', 'manual')})")
  return mesh


def make_workdir(workdir: str, default_name: str) -> str:
  """Resolves and creates the run directory (runs/<name> when not given); URLs stay URLs."""
  from diffmas_jax import paths
  workdir = workdir or os.path.join("runs", default_name)
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  return workdir
