"""Pure building blocks: RMSNorm, RoPE, attention with position-derived masks."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from diffmas_jax import kernels
from diffmas_jax.config import ModelConfig

# Finite (not -inf) so fully masked rows (padding queries) stay NaN-free.
MASK_VALUE = -2.38e38


class LayerBuffer(NamedTuple):
  """The current layer's buffer out of L separate ones (per-layer weights or K/V),
  picked by the layer scan's index.

  XLA:CPU copies a dynamic slice of a stacked [L, ...] array before every product
  that reads it (each weight matrix, each layer's keys and values, every decode
  step); here each such product runs inside a `lax.switch` branch on the layer's
  own buffer, so the layer body is still compiled once and nothing is copied.
  """

  index: jax.Array  # [] int32 layer index
  buffers: tuple  # L arrays of one shape (a weight matrix, or [B, K, S, Dh] keys / values)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.buffers[0].shape

  @property
  def dtype(self):
    return self.buffers[0].dtype

  def apply(self, fn: Callable[..., jax.Array], *args) -> jax.Array:
    """fn(this layer's buffer, *args), without slicing the buffer out first."""
    return jax.lax.switch(self.index, [functools.partial(fn, b) for b in self.buffers], *args)


class TransposedKeys(LayerBuffer):
  """Per-layer key buffers stored [B, K, Dh, S] (`kv_cache.by_layer(transpose_keys=True)`).

  A single query's scores are then a canonical `[G, Dh] x [Dh, S]` product, which
  XLA:CPU runs wide along S; with keys [S, Dh] the product is `[S, Dh] x [Dh, G]`,
  only G = 3 wide.
  """


class StackedLayer(NamedTuple):
  """The current layer of a stacked [L, B, K, S, Dh] key or value cache, unsliced, so
  the attention kernel reads it in place (`attention(kernel=True)`); anything else
  takes the slice."""

  index: jax.Array  # [] int32 layer index
  stack: jax.Array  # [L, B, K, S, Dh]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack.shape[1:]

  @property
  def dtype(self):
    return self.stack.dtype

  def apply(self, fn: Callable[..., jax.Array], *args) -> jax.Array:
    return fn(self.stack[self.index], *args)


def _apply(x: Any, fn: Callable[..., jax.Array], *args) -> jax.Array:
  """fn(x, *args) for an array, a LayerBuffer or a StackedLayer."""
  return x.apply(fn, *args) if isinstance(x, (LayerBuffer, StackedLayer)) else fn(x, *args)


def _materialized(x: Any) -> jax.Array:
  """The array itself (a copy for a LayerBuffer: only multi-query attention needs it)."""
  if isinstance(x, TransposedKeys):
    return _apply(x, lambda b: jnp.swapaxes(b, -1, -2))
  return _apply(x, lambda b: b)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in f32, returned in x's dtype. x: [..., D], weight: [D]."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[Dh/2] inverse frequencies, with Llama 3 scaling when configured (static numpy)."""
  e = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
  s = cfg.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  # Llama 3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * np.pi / inv
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  scaled = np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
  return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates half-split pairs (HF `rotate_half` convention).

  Args:
    x: [B, T, N, Dh].
    positions: [B, T] int (negative for padding; value irrelevant, it is masked).
  """
  # [B, T, Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
  """[B, T, S] causal mask from stored positions: key filled and not in the future."""
  return (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])


def attention(q: jax.Array, blocks: list[tuple[jax.Array, jax.Array, jax.Array]],
              kernel: bool = False) -> jax.Array:
  """Grouped-query attention over one or more key/value blocks, softmax in f32.

  All blocks share one softmax, so the decoder attends to the (read-only) cache
  and the new tokens without first writing them into the cache: the cache is
  then updated once, in place, after the layer scan. A single query (decode, a
  latent step) scores each block separately, which avoids copying the cache;
  several queries concatenate the blocks and go through `_attend`, whose
  backward pass recomputes the probabilities instead of storing them.

  Args:
    q: [B, T, H, Dh].
    blocks: (k, v, mask) with k, v: [B, K, S_i, Dh] and mask: [B, T, S_i] bool.
    kernel: a single f32 query runs on the CPU attention kernel
      (`kernels.partial_attention`), which reads each block's keys and values in
      place, once, and skips the slots no row sees. Set by `model.forward` for
      packed weights (model.per_layer).
  Returns:
    [B, T, H, Dh]
  """
  b, t, h, e = q.shape
  kv_heads = blocks[0][0].shape[1]
  g = h // kv_heads
  # [B, K, G*T, Dh]: a canonical batched matmul layout; XLA:CPU runs other dot
  # layouts through a much slower path (measured 1.8x on a 1024-token prefill).
  qc = (q * jnp.asarray(1.0 / np.sqrt(e), q.dtype)).reshape(b, t, kv_heads, g, e)
  qc = qc.transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, e)
  if t == 1 and kernel and _kernel_fits(qc, blocks):
    out = _attend_blocks_kernel(qc, blocks)
  elif t == 1 and len(blocks) > 1:
    out = _attend_blocks(qc, blocks, g)
  else:
    blocks = [(_materialized(k), _materialized(v), mask) for k, v, mask in blocks]
    cat = lambda i, axis: (blocks[0][i] if len(blocks) == 1 else
                           jnp.concatenate([blk[i] for blk in blocks], axis=axis))
    out = _attend(qc, cat(0, 2), cat(1, 2), cat(2, 2), g)
  return out.reshape(b, kv_heads, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def _masked_scores(qc, k, mask, g, keys_left: bool = False):
  """[B, K, G*T, S] f32 scores, MASK_VALUE where `mask` [B, T, S] is False.

  `keys_left` computes (k qc^T)^T: for a handful of queries (decode, latent
  steps) XLA:CPU would otherwise copy each layer's keys transposed ([S, Dh] ->
  [Dh, S]) before every step; with k as the left operand only the small query
  block and the [S, G*T] product are transposed. Keys stored transposed
  (`TransposedKeys`, decode loops) need neither: qc [G*T, Dh] x k [Dh, S].
  """
  b, kv_heads, gt, _ = qc.shape
  if isinstance(k, TransposedKeys):
    s = _apply(k, lambda kt, q: jnp.matmul(q, kt, preferred_element_type=jnp.float32), qc)
  elif keys_left:
    kq = lambda k, q_t: jnp.matmul(k, q_t, preferred_element_type=jnp.float32)
    s = jnp.swapaxes(_apply(k, kq, jnp.swapaxes(qc, -1, -2)), -1, -2)
  else:
    s = jnp.matmul(qc, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
  s = jnp.where(mask[:, None, None], s.reshape(b, kv_heads, g, gt // g, -1), MASK_VALUE)
  return s.reshape(b, kv_heads, gt, -1)


def _attend_blocks(qc, blocks, g):
  """Softmax over several key blocks scored separately (autodiff backward)."""
  scores = [_masked_scores(qc, k, mask, g, keys_left=True) for k, _, mask in blocks]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out, offset = 0.0, 0
  for _, v, _ in blocks:
    p = probs[..., offset:offset + v.shape[2]].astype(v.dtype)
    out = out + _apply(v, lambda v, p: jnp.matmul(p, v), p)
    offset += v.shape[2]
  return out  # [B, K, G*T, Dh]


def _kernel_fits(qc, blocks) -> bool:
  return (qc.dtype == jnp.float32 and qc.shape[-1] in (16, 32, 64, 128) and
          all(k.dtype == v.dtype == jnp.float32 for k, v, _ in blocks))


def _attend_blocks_kernel(qc, blocks):
  """`_attend_blocks` for one query, each block's statistics from the kernel, merged
  here (the softmax shared over blocks, as there)."""
  stats = []
  for k, v, mask in blocks:
    row_mask = mask[:, 0]  # [B, S]: one query
    if isinstance(k, LayerBuffer):  # per-layer buffers: the layer's pair, in place
      transposed = isinstance(k, TransposedKeys)
      one = lambda kb, vb, t=transposed: _block_stats(qc, kb[None], vb[None], row_mask,
                                                       jnp.int32(0), t)
      stats.append(jax.lax.switch(k.index, [functools.partial(one, kb, vb)
                                            for kb, vb in zip(k.buffers, v.buffers)]))
    elif isinstance(k, StackedLayer):
      stats.append(_block_stats(qc, k.stack, v.stack, row_mask, k.index, False))
    else:
      stats.append(_block_stats(qc, k[None], v[None], row_mask, jnp.int32(0), False))
  top = functools.reduce(jnp.maximum, [m for _, m, _ in stats])
  weights = [jnp.exp(m - top) for _, m, _ in stats]
  total = sum(w * l for w, (_, _, l) in zip(weights, stats))
  out = sum(w[..., None] * o for w, (o, _, _) in zip(weights, stats))
  return out / total[..., None]  # [B, K, G, Dh]


def _block_stats_xla(qc, keys, values, mask, layer, keys_transposed):
  """kernels.partial_attention's statistics in XLA: its derivative."""
  k, v = keys[layer], values[layer]
  s = jnp.einsum("bkgd,bkds->bkgs" if keys_transposed else "bkgd,bksd->bkgs", qc, k)
  s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  return jnp.einsum("bkgs,bksd->bkgd", p, v), m, jnp.sum(p, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_stats(qc, keys, values, mask, layer, keys_transposed):
  return kernels.partial_attention(qc, keys, values, mask, layer, keys_transposed)


def _block_stats_fwd(qc, keys, values, mask, layer, keys_transposed):
  return (_block_stats(qc, keys, values, mask, layer, keys_transposed),
          (qc, keys, values, mask, layer))


def _block_stats_bwd(keys_transposed, res, cotangents):
  qc, keys, values, mask, layer = res
  _, vjp = jax.vjp(lambda q, k, v: _block_stats_xla(q, k, v, mask, layer, keys_transposed),
                   qc, keys, values)
  return (*vjp(cotangents), None, None)


_block_stats.defvjp(_block_stats_fwd, _block_stats_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qc, k, v, mask, g):
  """softmax(qc k^T, masked) v: qc [B, K, G*T, Dh] (pre-scaled), k, v [B, K, S, Dh]."""
  return _attend_fwd(qc, k, v, mask, g)[0]


def _attend_fwd(qc, k, v, mask, g):
  s = _masked_scores(qc, k, mask, g)
  m = jnp.max(s, axis=-1, keepdims=True)  # [B, K, G*T, 1]
  p = jnp.exp(s - m)
  total = jnp.sum(p, axis=-1, keepdims=True)
  # Normalising the [G*T, Dh] output is cheaper than normalising [G*T, S] probabilities.
  out = (jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / total)
  out = out.astype(v.dtype)
  m, total = checkpoint_name(m, "attn_stats"), checkpoint_name(total, "attn_stats")
  return out, (qc, k, v, mask, checkpoint_name(out, "attn_stats"), m, total)


def _attend_bwd(g, res, d_out):
  """The probabilities are recomputed from the saved row max and sum, never
  stored (FlashAttention's backward): memory stays O(T * Dh) per layer."""
  qc, k, v, mask, out, m, total = res
  p = jnp.exp(_masked_scores(qc, k, mask, g) - m) / total  # [B, K, G*T, S]
  # Products that contract over G*T are computed transposed (dv^T = d_out^T p),
  # so only small [*, Dh] operands are transposed, never a [G*T, S] one:
  # XLA:CPU would copy a transposed left-hand operand before the matmul.
  t = lambda x: jnp.swapaxes(x, -1, -2)
  d_out_t = t(d_out).astype(v.dtype)  # [B, K, Dh, G*T]
  dv = t(jnp.matmul(d_out_t, p.astype(v.dtype), preferred_element_type=jnp.float32))
  dp = jnp.matmul(d_out.astype(v.dtype), t(v), preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  # A query with no visible key (padding) averages v uniformly; its scores are
  # constants, so nothing flows back to q or k from it.
  has_key = m > MASK_VALUE / 2
  ds = jnp.where(has_key, p * (dp - delta), 0.0).astype(qc.dtype)  # [B, K, G*T, S]
  dq = jnp.matmul(ds, k, preferred_element_type=jnp.float32)
  dk = t(jnp.matmul(t(qc), ds, preferred_element_type=jnp.float32))
  return dq.astype(qc.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# Queries per attention block of a multi-token pass (see causal_attention).
QUERY_CHUNK = 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     context: list[tuple[Any, Any, jax.Array]] = (),
                     chunk: int | None = None, kernel: bool = False) -> jax.Array:
  """Attention of T new tokens to read-only `context` blocks and to themselves.

  The queries run in chunks: chunk i attends to the context and to the new keys
  up to its own end only. Valid when the new tokens are in position order (masks
  from positions are causal, so no query sees a later new key): the blocks above
  the diagonal are skipped, and each chunk's [G * chunk, S] scores stay small
  enough for the CPU caches (the train step's 634-token solver pass over a
  1033-slot trace: 1.6x faster forward + backward than one block,
  `python -m bench.bench_attention`).

  Args:
    q: [B, T, H, Dh]; k, v: [B, K, T, Dh] the new tokens' keys and values;
    mask: [B, T, T] their causal mask; context: (k, v, mask [B, T, S_i]) blocks;
    chunk: queries per block (default QUERY_CHUNK).
    kernel: see `attention`.
  """
  t, chunk = q.shape[1], chunk or QUERY_CHUNK
  if t <= chunk:
    return attention(q, [*context, (k, v, mask)], kernel)
  outs = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    blocks = [(ck, cv, cm[:, start:end]) for ck, cv, cm in context]
    blocks.append((k[:, :, :end], v[:, :, :end], mask[:, start:end, :end]))
    outs.append(attention(q[:, start:end], blocks))
  return jnp.concatenate(outs, axis=1)
