"""The KV cache as an explicit, append-only pytree.

Every slot stores the RoPE position of the token that wrote it (-1 = empty or
padding). Attention masks are derived from those positions alone, so prefill,
decode, appending another agent's segment, left padding and truncation all
share one code path: nothing else about the cache's history needs tracking.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from diffmas_jax.config import ModelConfig

CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "pos": ("batch", "length"),
    "end": (),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """k, v: [L, B, K, S, Dh]; pos: [B, S] int32 (-1 empty); end: [] int32 write index.

  (Inside decode loops k and v are tuples of L [B, K, S, Dh] buffers, the keys
  [B, K, Dh, S] when `keys_transposed`: `by_layer`.)

  Slots sit after the kv-head axis (as in HF caches) so decode attention reads
  each head's keys contiguously, with no per-step transpose of the cache.

  All rows share the write index: a batch is left padded, so row r's tokens are
  right-aligned and its padding slots simply keep pos = -1.
  """

  k: Any
  v: Any
  pos: Any
  end: Any
  # by_layer(transpose_keys=True): each layer's keys are stored [B, K, Dh, S].
  keys_transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=None,
           shardings: "KVCache | None" = None) -> "KVCache":
    """An empty cache; `shardings` (a KVCache of shardings) places each leaf (else the
    default device)."""
    dtype = dtype or jnp.dtype(cfg.dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    at = lambda name: None if shardings is None else getattr(shardings, name)
    return cls(k=jnp.zeros(shape, dtype, device=at("k")), v=jnp.zeros(shape, dtype, device=at("v")),
               pos=jnp.full((batch, capacity), -1, jnp.int32, device=at("pos")),
               end=jnp.zeros((), jnp.int32, device=at("end")))

  @property
  def capacity(self) -> int:
    return self.pos.shape[-1]

  @property
  def batch(self) -> int:
    return self.pos.shape[0]

  @property
  def next_pos(self) -> jax.Array:
    """[B] the RoPE position the next token of each row gets (0 for an empty row)."""
    return jnp.max(self.pos, axis=-1) + 1

  @property
  def length(self) -> jax.Array:
    """[B] number of occupied (non-padding) slots per row."""
    return jnp.sum(self.pos >= 0, axis=-1)

  def gather(self, slots: jax.Array, new_end: int | jax.Array | None = None) -> "KVCache":
    """Keeps only `slots` ([n] or [B, n] slot indices, -1 = drop), compacted to the front.

    Positions are preserved, so running on the result equals running on only
    those tokens at their original positions. Capacity is unchanged.
    """
    slots = jnp.asarray(slots, jnp.int32)
    if slots.ndim == 1:
      slots = jnp.broadcast_to(slots, (self.batch, slots.shape[0]))
    n = slots.shape[1]
    safe = jnp.maximum(slots, 0)
    take = lambda buf: jnp.take_along_axis(buf, safe[None, :, None, :, None], axis=3)
    pad = self.capacity - n
    widen = lambda x, fill: jnp.pad(x, [(0, 0)] * 3 + [(0, pad), (0, 0)], constant_values=fill)
    pos = jnp.where(slots >= 0, jnp.take_along_axis(self.pos, safe, axis=1), -1)
    return KVCache(k=widen(take(self.k), 0), v=widen(take(self.v), 0),
                   pos=jnp.pad(pos, [(0, 0), (0, pad)], constant_values=-1),
                   end=jnp.asarray(n if new_end is None else new_end, jnp.int32))

  def keep(self, keep_mask: jax.Array) -> "KVCache":
    """Drops slots where `keep_mask` [B, S] is False (they become empty); no compaction."""
    return dataclasses.replace(self, pos=jnp.where(keep_mask, self.pos, -1))


def by_layer(cache: KVCache, transpose_keys: bool = False) -> KVCache:
  """The cache with k, v as tuples of per-layer [B, K, S, Dh] buffers (one copy).

  For decode loops: `model.forward` then reads each layer's keys and values where
  they lie (layers.LayerBuffer) instead of slicing them out of the stack every
  step, and writes each new token into its layer's buffer in place. Only
  single-token steps avoid the copy; `stacked` is the inverse. Idempotent.

  `transpose_keys` stores each layer's keys [B, K, Dh, S] (`keys_transposed`):
  a single query's scores are then `[G, Dh] x [Dh, S]`, wide along the slots,
  instead of `[S, Dh] x [Dh, G]` with G (query heads per kv head) columns.
  """
  if isinstance(cache.k, tuple):
    if cache.keys_transposed != transpose_keys:
      return by_layer(stacked(cache), transpose_keys)
    return cache
  split = lambda buf: tuple(buf[i] for i in range(buf.shape[0]))
  k = jnp.swapaxes(cache.k, -1, -2) if transpose_keys else cache.k
  return dataclasses.replace(cache, k=split(k), v=split(cache.v), keys_transposed=transpose_keys)


def stacked(cache: KVCache) -> KVCache:
  """Inverse of `by_layer` (idempotent)."""
  if not isinstance(cache.k, tuple):
    return cache
  k = jnp.stack(cache.k)
  k = jnp.swapaxes(k, -1, -2) if cache.keys_transposed else k
  return dataclasses.replace(cache, k=k, v=jnp.stack(cache.v), keys_transposed=False)


def concat(caches: Sequence[KVCache], capacity: int | None = None) -> KVCache:
  """Concatenates the used prefixes [0, end) of several caches along slots.

  Ends must be concrete (Python ints or concrete arrays); used to stitch
  independently built segments (hierarchical agents, StitchMAS).
  """
  ends = [int(c.end) for c in caches]
  total = sum(ends)
  capacity = capacity or total
  if capacity < total:
    raise ValueError(f"concat needs capacity >= {total} slots, got {capacity}")
  parts = [(c.k[:, :, :, :e], c.v[:, :, :, :e], c.pos[:, :e]) for c, e in zip(caches, ends)]
  k = jnp.concatenate([p[0] for p in parts], axis=3)
  v = jnp.concatenate([p[1] for p in parts], axis=3)
  pos = jnp.concatenate([p[2] for p in parts], axis=1)
  pad = capacity - total
  return KVCache(
      k=jnp.pad(k, [(0, 0), (0, 0), (0, 0), (0, pad), (0, 0)]),
      v=jnp.pad(v, [(0, 0), (0, 0), (0, 0), (0, pad), (0, 0)]),
      pos=jnp.pad(pos, [(0, 0), (0, pad)], constant_values=-1),
      end=jnp.asarray(total, jnp.int32))


def grow(cache: KVCache, capacity: int) -> KVCache:
  """Returns the cache with more empty slots at the end (same contents)."""
  pad = capacity - cache.capacity
  if pad < 0:
    raise ValueError(f"cannot shrink a cache of capacity {cache.capacity} to {capacity}")
  widen = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, pad), (0, 0)])
  return KVCache(k=widen(cache.k), v=widen(cache.v),
                 pos=jnp.pad(cache.pos, [(0, 0), (0, pad)], constant_values=-1), end=cache.end)
