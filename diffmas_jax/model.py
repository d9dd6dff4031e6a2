"""Pure-functional decoder forward over an explicit KV cache.

`forward(weights, cfg, cache, tokens=... | embeds=...)` appends the new tokens'
keys/values at `cache.end`, attends over every filled slot whose position is not
in the future, and returns logits, the final-norm hidden states and the new
cache. Layers run as one `lax.scan` (optionally rematerialised) over stacked
weights, or over per-layer buffers picked by index (`per_layer`: inference, no
per-layer weight copies); the cache's layer axis is read alongside.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from diffmas_jax import kernels
from diffmas_jax import layers as L
from diffmas_jax.config import ModelConfig
from diffmas_jax.kernels import PackedMatrix
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.params import LayerWeights, Weights

_save = jax.checkpoint_policies.save_only_these_names
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Named activations (see _layer): keep the attention output and its softmax
    # statistics (layers._attend_fwd: row max and sum, O(T) per head), recompute the
    # rest; the backward pass then rescores once instead of re-running the forward.
    "attn": _save("attn_out", "attn_stats"),
    # ... and the MLP's gate/up projections: only q/k/v and norms are recomputed.
    "attn_mlp": _save("attn_out", "attn_stats", "mlp_gate", "mlp_up"),
}

# Projection einsums (weights are [*in, *out]; LoRA adds scale * (x @ A) @ B on the flattened dims).
PROJ_EQ = {
    "q": "btd,dhe->bthe",
    "k": "btd,dke->btke",
    "v": "btd,dke->btke",
    "o": "bthe,hed->btd",
    "gate": "btd,df->btf",
    "up": "btd,df->btf",
    "down": "btf,fd->btd",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRA:
  """Low-rank adapters on stacked layers: a[name]: [L, *in, r], b[name]: [L, r, *out].

  `scale` (alpha / rank) and `dropout` are static metadata, so they never
  receive gradients. `dropout_key` ([L] PRNG keys, training only; see
  `lora.with_dropout`) turns on dropout of the adapter's input.
  """

  a: dict[str, Any]
  b: dict[str, Any]
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  dropout_key: Any = None


class ForwardOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V] f32 ("all"), [B, 1, V] ("last") or None
  hidden: jax.Array  # [B, T, D] final-norm hidden states
  cache: KVCache


class PerLayerMatrix(L.LayerBuffer):
  """One projection's separate per-layer buffers (`per_layer`), each [*in, *out]."""

  def matmul(self, x2: jax.Array) -> jax.Array:
    """[N, in] @ (the indexed layer's weight as [in, out]) -> [N, out]."""
    return _per_layer_matmul(self.index, x2, self.buffers)


# Under reverse-mode AD a plain switch makes each step's weight a residual of the
# scan (JAX stacks it per iteration: a copy of every weight, then a slice per
# layer). Here the residuals are the buffers themselves, which JAX hoists out of
# the scan as loop-invariant, and the backward is a switch over `g @ w^T`.
# The buffers are frozen (inference, LoRA training): differentiating them raises.
@jax.custom_vjp
def _per_layer_matmul(index: jax.Array, x2: jax.Array, buffers: tuple) -> jax.Array:
  product = lambda w, x2: w.matmul(x2) if isinstance(w, PackedMatrix) else _matmul_2d(x2, w)
  return jax.lax.switch(index, [functools.partial(product, b) for b in buffers], x2)


def _per_layer_matmul_fwd(index, x2, buffers):
  is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)
  if any(b.perturbed for b in jax.tree.leaves(buffers, is_leaf=is_primal)):
    raise TypeError("per-layer weights (model.per_layer) are frozen: take gradients w.r.t. "
                    "the stacked layout (model.stacked) to train the base weights")
  index, x2 = index.value, x2.value
  buffers = jax.tree.map(lambda b: b.value, buffers, is_leaf=is_primal)
  return _per_layer_matmul(index, x2, buffers), (index, buffers)


def _per_layer_matmul_bwd(res, g):
  index, buffers = res

  def x_grad(w, g):
    if isinstance(w, PackedMatrix):
      return w.transposed_matmul(g)
    return g @ w.reshape(-1, g.shape[1]).T

  return None, jax.lax.switch(index, [functools.partial(x_grad, b) for b in buffers], g), None


_per_layer_matmul.defvjp(_per_layer_matmul_fwd, _per_layer_matmul_bwd, symbolic_zeros=True)


def _matmul_2d(x2: jax.Array, w: jax.Array) -> jax.Array:
  return x2 @ w.reshape(x2.shape[1], -1)


def _num_contracted(eq: str) -> int:
  """Number of weight dims contracted with x ('bthe,hed->btd' -> 2)."""
  x, w = eq.split("->")[0].split(",")
  return sum(c in x for c in w)


def _project(x, w, name: str, lora_layer: LoRA | None, n_in: int | None = None):
  """y = x @ w over w's leading (input) dims; every weight here is [*in, *out].

  `n_in` overrides the number of contracted dims (fused q|k|v and gate|up
  buffers, whose adapters are added per projection by `_add_lora`).
  """
  n_in = _num_contracted(PROJ_EQ[name]) if n_in is None else n_in
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  # One 2-D matmul: XLA:CPU runs these ~1.5x faster than the equivalent 3-D einsum at decode.
  x2 = x.reshape(-1, math.prod(in_shape))
  y2 = w.matmul(x2) if isinstance(w, PerLayerMatrix) else _matmul_2d(x2, w)
  return _add_lora(x, y2.reshape(*lead, *out_shape), name, lora_layer)


def _add_lora(x, y, name: str, lora_layer: LoRA | None):
  """y + the adapter's scale * (x @ A) @ B for projection `name` (x: its input)."""
  if lora_layer is None or name not in lora_layer.a:
    return y
  n_in = _num_contracted(PROJ_EQ[name])
  lead, out_shape = x.shape[:x.ndim - n_in], y.shape[x.ndim - n_in:]
  xa = x
  if lora_layer.dropout_key is not None:
    key = jax.random.fold_in(lora_layer.dropout_key, list(PROJ_EQ).index(name))
    keep = jax.random.bernoulli(key, 1.0 - lora_layer.dropout, x.shape)
    xa = jnp.where(keep, x / (1.0 - lora_layer.dropout), 0).astype(x.dtype)
  a = lora_layer.a[name].astype(x.dtype)
  b = lora_layer.b[name].astype(x.dtype)
  delta = _low_rank(xa.reshape(math.prod(lead), -1), a.reshape(-1, a.shape[-1]),
                    b.reshape(b.shape[0], -1), lora_layer.scale)
  return y + delta.reshape(*lead, *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x, a, b, scale):
  """scale * (x @ a) @ b for x [N, in], a [in, r], b [r, out]."""
  return scale * ((x @ a) @ b)


def _low_rank_fwd(x, a, b, scale):
  low = x @ a  # [N, r]
  return scale * (low @ b), (x, a, b, low)


def _low_rank_bwd(scale, res, g):
  """Contractions over N are taken with the rank-r factor transposed, never the
  [N, in] / [N, out] one: XLA:CPU otherwise copies a transposed activation."""
  x, a, b, low = res
  g = scale * g
  d_low = g @ b.T  # [N, r]
  d_b = low.T @ g  # [r, out]
  d_a = (d_low.T @ x).T  # [in, r]
  return d_low @ a.T, d_a, d_b


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _layer(cfg: ModelConfig, inv_freq, positions, masks, x, lw, lora_layer, k_cache, v_cache,
           fresh_cache: bool = False, context_kv=None, kernel_attention: bool = False):
  """One decoder layer.

  Args:
    x: [B, T, D]; k_cache, v_cache: [B, K, S, Dh] read-only history.
    masks: (cache_mask [B, T, S], self_mask [B, T, T], context_mask [B, T, C] or None).
    context_kv: optional (k, v) [B, K, C, Dh] of a read-only context before the cache.
    kernel_attention: see layers.attention.
  Returns:
    x [B, T, D] and the new tokens' k, v [B, K, T, Dh] (written by the caller).
  """
  cache_mask, self_mask, context_mask = masks
  with jax.named_scope("attn"):
    h = L.rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
    if lw.k is None:  # fused [D, K, G + 2, Dh] buffer (per_layer): one matmul for q, k, v
      qkv = _project(h, lw.q, "q", None, n_in=1)  # [B, T, K, G + 2, Dh]
      b, t, _, g2, dh = qkv.shape
      q = _add_lora(h, qkv[..., :g2 - 2, :].reshape(b, t, -1, dh), "q", lora_layer)
      k = _add_lora(h, qkv[..., g2 - 2, :], "k", lora_layer)
      v = _add_lora(h, qkv[..., g2 - 1, :], "v", lora_layer)
    else:
      q = _project(h, lw.q, "q", lora_layer)  # [B, T, H, Dh]
      k = _project(h, lw.k, "k", lora_layer)  # [B, T, K, Dh]
      v = _project(h, lw.v, "v", lora_layer)  # [B, T, K, Dh]
    if cfg.qkv_bias:
      q, k, v = q + lw.q_bias, k + lw.k_bias, v + lw.v_bias
    if cfg.qk_norm:
      q = L.rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
      k = L.rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    q = L.apply_rope(q, positions, inv_freq)
    # [B, K, T, Dh], the cache's layout
    k = jnp.swapaxes(L.apply_rope(k, positions, inv_freq), 1, 2).astype(k_cache.dtype)
    v = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
    context = []  # fresh_cache: nothing to attend to in the cache
    if not fresh_cache:
      context = [(k_cache, v_cache, cache_mask)]
      if context_kv is not None:
        context.insert(0, (*context_kv, context_mask))
    attn = L.causal_attention(q, k, v, self_mask, context, kernel=kernel_attention)
    attn = checkpoint_name(attn, "attn_out")
    x = x + _project(attn, lw.o, "o", lora_layer)
  with jax.named_scope("mlp"):
    h = L.rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
    if lw.up is None:  # fused [D, 2F] gate|up buffer (per_layer)
      gate_up = _project(h, lw.gate, "gate", None)
      f = gate_up.shape[-1] // 2
      gate = _add_lora(h, gate_up[..., :f], "gate", lora_layer)
      up = _add_lora(h, gate_up[..., f:], "up", lora_layer)
    else:
      gate = _project(h, lw.gate, "gate", lora_layer)
      up = _project(h, lw.up, "up", lora_layer)
    gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
    act = jax.nn.silu(gate) * up
    x = x + _project(act, lw.down, "down", lora_layer)
  return x, k, v


def default_positions(cache: KVCache, valid: jax.Array, context: KVCache | None = None
                      ) -> jax.Array:
  """[B, T] positions continuing each row's sequence; -1 where `valid` is False."""
  start = cache.next_pos if context is None else jnp.maximum(cache.next_pos, context.next_pos)
  pos = start[:, None] + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  return jnp.where(valid, pos, -1)


def lm_head(weights: Weights, hidden: jax.Array) -> jax.Array:
  """[B, T, D] -> [B, T, V] f32 logits (tied embedding when lm_head is None)."""
  if isinstance(weights.lm_head, PackedMatrix):  # per_layer(packed=True)
    b, t, d = hidden.shape
    return weights.lm_head.matmul(hidden.reshape(b * t, d)).reshape(b, t, -1)
  if weights.lm_head is None:
    return jnp.einsum("btd,vd->btv", hidden, weights.embed, preferred_element_type=jnp.float32)
  return jnp.einsum("btd,dv->btv", hidden, weights.lm_head, preferred_element_type=jnp.float32)


def forward(weights: Weights, cfg: ModelConfig, cache: KVCache, *, tokens: jax.Array | None = None,
            embeds: jax.Array | None = None, valid: jax.Array | None = None,
            positions: jax.Array | None = None, lora: LoRA | None = None,
            logits: str = "all", fresh_cache: bool = False, append: bool = True,
            context: KVCache | None = None) -> ForwardOutput:
  """Runs T new inputs on top of `cache` and appends their K/V at `cache.end`.

  Args:
    weights: model weights.
    cfg: static model config.
    cache: the cache to extend; must have at least `end + T` slots (not checked under jit).
    tokens: [B, T] int token ids, or
    embeds: [B, T, D] input embeddings (latent steps); exactly one of the two.
    valid: [B, T] bool, False for (left) padding; default all True.
    positions: [B, T] explicit RoPE positions (-1 = padding); default continues each row.
      Over each row's valid tokens they must increase along T (attention runs in
      causal query chunks, layers.causal_attention); checked when not traced.
    lora: optional adapters (applied unmerged).
    logits: "all" -> [B, T, V]; "last" -> [B, 1, V] of the last column; "none".
    fresh_cache: static promise that the cache is empty and the new tokens are
      in position order (a first prefill): skips attending to the cache and the
      causal blocks above the diagonal. Wrong results if the promise is false.
    append: False scores the inputs on top of `cache` without storing their K/V
      (the returned cache is `cache`), so the cache needs no free slots for them:
      teacher forcing in training attends only to the trace's own slots.
    context: a read-only cache attended before `cache` (same layers, batch and
      heads; default positions continue after both). Latent steps write into a
      small `cache` of their own with the trace as context, so reverse-mode AD
      keeps one copy of the trace instead of one per step.
  Returns:
    ForwardOutput(logits, hidden [B, T, D], cache).
  """
  if (tokens is None) == (embeds is None):
    raise ValueError("pass exactly one of tokens= or embeds=")
  _check_inputs(cfg, cache, tokens, embeds, valid, positions)
  x = weights.embed[tokens] if embeds is None else embeds.astype(weights.embed.dtype)
  b, t, _ = x.shape
  if append:
    _check_capacity(cache, t)
  if valid is None:
    valid = jnp.ones((b, t), bool)
  if positions is None:
    positions = default_positions(cache, valid, context)
  positions = jnp.where(valid, positions, -1).astype(jnp.int32)
  # Slots at and after `end` are empty (pos -1), so the old cache's mask already
  # excludes the slots the new tokens are about to occupy.
  masks = (L.attention_mask(positions, cache.pos), L.attention_mask(positions, positions),
           None if context is None else L.attention_mask(positions, context.pos))
  inv_freq = L.rope_inv_freq(cfg)
  if lora is not None and lora.dropout_key is not None:
    # New masks for every call on the trace (each stage, latent step, solver pass).
    slot = cache.end if context is None else cache.end + context.end
    lora = dataclasses.replace(lora, dropout_key=jax.vmap(
        lambda k: jax.random.fold_in(k, slot))(lora.dropout_key))
  # Packed weights (per_layer on one CPU device) also get the attention kernel for
  # single-token steps; it reads a stacked cache's layer in place (layers.StackedLayer).
  kernel_attention = t == 1 and is_packed(weights)
  in_place = lambda c: kernel_attention and c is not None and not isinstance(c.k, tuple)
  ctx_kv = None if context is None or in_place(context) else (context.k, context.v)
  layers, matrices = weights.layers, None
  if isinstance(layers, tuple):  # per-layer buffers: scan over the index (see PerLayerMatrix)
    matrices = {n: tuple(getattr(lw, n) for lw in layers) for n in PROJ_EQ
                if getattr(layers[0], n) is not None}  # fused: k, v, up are None
    layers = _stack_vectors(layers)
  cache_by_layer = isinstance(cache.k, tuple)  # kv_cache.by_layer: picked like the matrices
  cache_xs = (None, None) if cache_by_layer or in_place(cache) else (cache.k, cache.v)

  def body(x, xs):
    i, lw, lora_layer, k_l, v_l, ctx_l = xs
    if matrices is not None:
      lw = dataclasses.replace(lw, **{n: PerLayerMatrix(i, bufs) for n, bufs in matrices.items()})
    if cache_by_layer:
      keys = L.TransposedKeys if cache.keys_transposed else L.LayerBuffer
      k_l, v_l = keys(i, cache.k), L.LayerBuffer(i, cache.v)
    elif in_place(cache):
      k_l, v_l = L.StackedLayer(i, cache.k), L.StackedLayer(i, cache.v)
    if in_place(context):
      ctx_l = (L.StackedLayer(i, context.k), L.StackedLayer(i, context.v))
    x, k, v = _layer(cfg, inv_freq, positions, masks, x, lw, lora_layer, k_l, v_l, fresh_cache,
                     ctx_l, kernel_attention)
    return x, (k, v)

  # A single-token step (latent thought, decode) keeps only a few vectors per
  # layer, so recomputing it would re-read every weight to save almost nothing.
  if REMAT[cfg.remat] is not None and t > 1:
    body = jax.checkpoint(body, policy=REMAT[cfg.remat])
  # The cache is only read inside the layer loop; new K/V ([L, B, K, T, Dh]) are written
  # once afterwards, which XLA does in place instead of copying the cache per layer.
  x, (k_new, v_new) = jax.lax.scan(body, x, (jnp.arange(cfg.num_layers), layers, lora,
                                             *cache_xs, ctx_kv))
  hidden = L.rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
  new_cache = cache
  if append:
    if cache_by_layer:  # each layer's buffer updated in place
      write = lambda bufs, new, axis=2: tuple(jax.lax.dynamic_update_slice_in_dim(
          buf, new[i], cache.end, axis=axis) for i, buf in enumerate(bufs))
      k_written = (write(cache.k, jnp.swapaxes(k_new, -1, -2), 3) if cache.keys_transposed
                   else write(cache.k, k_new))
    else:
      write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, cache.end, axis=3)
      k_written = write(cache.k, k_new)
    new_cache = KVCache(k=k_written, v=write(cache.v, v_new),
                        pos=jax.lax.dynamic_update_slice_in_dim(cache.pos, positions, cache.end,
                                                                axis=1),
                        end=cache.end + t, keys_transposed=cache.keys_transposed)
  if logits == "all":
    out = lm_head(weights, hidden)
  elif logits == "last":
    out = lm_head(weights, hidden[:, -1:])
  elif logits == "none":
    out = None
  else:
    raise ValueError(f"logits={logits!r}; expected 'all', 'last' or 'none'")
  return ForwardOutput(out, hidden, new_cache)


def _check_inputs(cfg: ModelConfig, cache: KVCache, tokens, embeds, valid, positions):
  """Shape/dtype contract of `forward` (trace time only: shapes are static)."""
  if tokens is not None:
    chex.assert_rank(tokens, 2)
    chex.assert_type(tokens, int)
    bt = tokens.shape
  else:
    chex.assert_shape(embeds, (None, None, cfg.hidden_size))
    bt = embeds.shape[:2]
  chex.assert_shape([x for x in (valid, positions) if x is not None], bt)
  if positions is not None and not isinstance(positions, jax.core.Tracer):
    pos = np.asarray(positions)
    if valid is not None and not isinstance(valid, jax.core.Tracer):
      pos = np.where(np.asarray(valid), pos, -1)
    for row, p in enumerate(pos):
      p = p[p >= 0]
      if np.any(np.diff(p) <= 0):
        raise ValueError(f"positions of row {row} do not increase along T ({p.tolist()[:16]}"
                         "...): give each valid token a later position than the one before")
  if isinstance(cache.k, tuple):  # per-layer buffers (kv_cache.by_layer)
    if len(cache.k) != cfg.num_layers or len(cache.v) != cfg.num_layers:
      raise ValueError(f"per-layer cache has {len(cache.k)} layers, model {cfg.num_layers}")
    keys = (bt[0], cfg.num_kv_heads, cfg.head_dim, None) if cache.keys_transposed else (
        bt[0], cfg.num_kv_heads, None, cfg.head_dim)
    chex.assert_shape(cache.k, keys)
    chex.assert_shape(cache.v, (bt[0], cfg.num_kv_heads, None, cfg.head_dim))
  else:
    chex.assert_shape([cache.k, cache.v], (cfg.num_layers, bt[0], cfg.num_kv_heads, None,
                                           cfg.head_dim))


def per_layer(weights: Weights, packed: bool | None = None) -> Weights:
  """The weights with `layers` as a tuple of per-layer LayerWeights (separate buffers).

  With the stacked layout, XLA:CPU copies each layer's weight slice out of the
  stack before every matrix product inside the layer scan, so a decode step or
  latent step reads the weights about three times (slice read, copy write,
  matvec read); separate buffers are read once. `forward` still runs one layer
  scan: each projection picks its layer's buffer with `lax.switch`
  (PerLayerMatrix), so the layer body is compiled once. Build once, outside jit
  (inside, XLA re-stacks the slices), and keep only this copy: inference and the
  LoRA train step on unsplit weights use it (trainer.train_layout; these buffers
  are frozen under jax.grad); the stacked layout stays for weights split over
  devices, full fine-tuning and conversion. Idempotent; `stacked` is the inverse.

  Unless a matrix is split over devices (tensor parallel), q, k, v are fused
  into one [D, K, G + 2, Dh] buffer held in `q` (each kv head's G query heads,
  then its key and value; `k` and `v` are None) and gate, up into one [D, 2F]
  buffer in `gate` (`up` None): a decode step then runs 4 matrix products per
  layer instead of 7, and the small k/v products (0.4 MB each on SmolLM2) no
  longer run at a fraction of the memory bandwidth.

  `packed` (None: `kernels.enabled()`, $DIFFMAS_CPU_KERNELS) stores each fused
  f32 matrix on a single CPU device as column panels (kernels.PackedMatrix),
  multiplied by a hand-written kernel that reads them at the memory bandwidth.
  """
  if isinstance(weights.layers, tuple):
    return weights
  # Layer by layer (fused, then packed), so only one layer's intermediate copies exist at
  # a time.
  stack, n = weights.layers, weights.layers.attn_norm.shape[0]
  layer = lambda i: _fuse(jax.tree.map(lambda a: a[i], stack))
  first = layer(0)
  if packed is None:
    packed = kernels.packable(first.q) and kernels.enabled()
  packed = packed and first.k is None  # a matrix split over devices: no fusing, no packing
  convert = _pack if packed else lambda lw: lw
  layers = (convert(first), *(convert(layer(i)) for i in range(1, n)))
  if not packed:
    return dataclasses.replace(weights, layers=layers)
  if weights.lm_head is not None:
    return dataclasses.replace(weights, layers=layers, lm_head=kernels.pack(weights.lm_head, 1))
  # A tied model's head gets its own packed copy of embed^T (the lookup keeps the rows).
  head = kernels.pack_rows(weights.embed, copy_of_embedding=True)
  return dataclasses.replace(weights, layers=layers,
                             lm_head=head if isinstance(head, PackedMatrix) else None)


def untied_lm_head(weights: Weights) -> jax.Array | None:
  """The [D, V] LM head as an array; None for a tied model, `per_layer`'s packed copy of
  the embedding included."""
  head = weights.lm_head
  return head.untied() if isinstance(head, PackedMatrix) else head


def is_packed(weights: Weights) -> bool:
  """Whether `per_layer` stored these weights' matrices for the packed CPU kernel."""
  return any(isinstance(x, PackedMatrix) for x in jax.tree.leaves(
      weights, is_leaf=lambda x: isinstance(x, PackedMatrix)))


def _pack(lw: LayerWeights) -> LayerWeights:
  """A fused layer's four matrices as column panels (kernels.pack; unchanged if unfit)."""
  return dataclasses.replace(lw, **{n: kernels.pack(getattr(lw, n), _num_contracted(eq))
                                    for n, eq in PROJ_EQ.items() if getattr(lw, n) is not None})


def _fuse(lw: LayerWeights) -> LayerWeights:
  """One layer's q|k|v and gate|up fused (see per_layer); unchanged when sharded."""
  split = lambda x: not getattr(getattr(x, "sharding", None), "is_fully_replicated", True)
  if any(split(getattr(lw, n)) for n in PROJ_EQ):
    return lw
  d, h, dh = lw.q.shape
  kv = lw.k.shape[1]
  qkv = jnp.concatenate([lw.q.reshape(d, kv, h // kv, dh), lw.k[:, :, None], lw.v[:, :, None]],
                        axis=2)
  return dataclasses.replace(lw, q=qkv, k=None, v=None,
                             gate=jnp.concatenate([lw.gate, lw.up], axis=1), up=None)


def _unfuse(lw: LayerWeights) -> LayerWeights:
  """Inverse of `_fuse` and `_pack` (no-op on an unfused layer)."""
  if lw.k is not None:
    return lw
  lw = dataclasses.replace(lw, **{n: getattr(lw, n).unpack() for n in PROJ_EQ
                                  if isinstance(getattr(lw, n), PackedMatrix)})
  d, kv, g2, dh = lw.q.shape
  f = lw.gate.shape[1] // 2
  return dataclasses.replace(lw, q=lw.q[:, :, :g2 - 2].reshape(d, -1, dh), k=lw.q[:, :, g2 - 2],
                             v=lw.q[:, :, g2 - 1], gate=lw.gate[:, :f], up=lw.gate[:, f:])


def stacked(weights: Weights) -> Weights:
  """Inverse of `per_layer`: layers stacked on a leading axis again (idempotent)."""
  if not isinstance(weights.layers, tuple):
    return weights
  return dataclasses.replace(weights, lm_head=untied_lm_head(weights), layers=jax.tree.map(
      lambda *xs: jnp.stack(xs), *(_unfuse(lw) for lw in weights.layers)))


def _stack_vectors(layers: tuple) -> LayerWeights:
  """Per-layer LayerWeights -> the small leaves (norms, biases) stacked [L, ...]; the
  matrices are left out (None): they stay separate buffers (PerLayerMatrix)."""
  small = [dataclasses.replace(lw, **{n: None for n in PROJ_EQ}) for lw in layers]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *small)


def _check_capacity(cache: KVCache, t: int):
  """Raises when the write would overflow; only possible when `end` is concrete."""
  try:
    end = int(cache.end)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return  # traced: callers size caches statically (see agents / sampling)
  if end + t > cache.capacity:
    raise ValueError(f"KV cache overflow: writing {t} slots at {end} exceeds capacity "
                     f"{cache.capacity}; allocate a larger cache (KVCache.init(..., capacity=...)).")


def forward_no_cache(weights: Weights, cfg: ModelConfig, tokens: jax.Array,
                     valid: jax.Array | None = None, lora: LoRA | None = None) -> jax.Array:
  """Full-sequence logits [B, T, V] with a throwaway cache of exactly T slots."""
  cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1])
  return forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=lora,
                 fresh_cache=True).logits
