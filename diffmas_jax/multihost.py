"""Small cross-process helpers: who writes files, and exchanging bytes between processes.

With one process every helper is a no-op, so single-host code paths stay as
they were. With several, bytes travel through the key-value store of the
jax.distributed coordination service (what orbax uses too), not through device
collectives: processes may then drift apart by minutes (one compiles while
another runs a batch) where a first device collective waits only ~30 s for its
peers (gloo on CPU). Every process must call the helpers in the same order.
"""

from __future__ import annotations

import itertools

import jax

# How long a process waits for the others at an exchange or barrier: long enough
# for a peer to compile and run a whole evaluation batch of a large model.
TIMEOUT_MS = 2 * 3600 * 1000

_calls = itertools.count()


def is_main() -> bool:
  """True on the process that writes shared files (metrics, results, summaries)."""
  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # the coordination-service client, as orbax uses it
  return distributed.global_state.client


def _key(name: str) -> str:
  return f"diffmas/{name}/{next(_calls)}"


def broadcast_bytes(data: bytes, name: str = "broadcast") -> bytes:
  """Process 0's `data`, on every process (the others' argument is ignored)."""
  if jax.process_count() == 1:
    return data
  key = _key(name)
  if is_main():
    _client().key_value_set_bytes(key, data)
    return data
  return _client().blocking_key_value_get_bytes(key, TIMEOUT_MS)


def allgather_bytes(data: bytes, name: str = "allgather") -> list[bytes]:
  """Every process's `data`, in process order, on every process."""
  if jax.process_count() == 1:
    return [data]
  key, me = _key(name), jax.process_index()
  _client().key_value_set_bytes(f"{key}/{me}", data)
  return [data if p == me else _client().blocking_key_value_get_bytes(f"{key}/{p}", TIMEOUT_MS)
          for p in range(jax.process_count())]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(_key(name), TIMEOUT_MS)
