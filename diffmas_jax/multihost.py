"""Small cross-process helpers: who writes files, and exchanging bytes between processes.

With one process every helper is a no-op (no collective runs), so single-host
code paths stay exactly as they were. With several, the exchanges go through
`jax.experimental.multihost_utils` (device collectives: gloo on CPU), so every
process must call them in the same order.
"""

from __future__ import annotations

import jax
import numpy as np


def is_main() -> bool:
  """True on the process that writes shared files (metrics, results, summaries)."""
  return jax.process_index() == 0


def broadcast_bytes(data: bytes) -> bytes:
  """Process 0's `data`, on every process (the others' argument is ignored)."""
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data) if is_main() else 0)))
  buf = np.zeros(n, np.uint8)
  if is_main():
    buf[:] = np.frombuffer(data, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, on every process."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
  buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buf))  # [P, max]
  return [gathered[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
