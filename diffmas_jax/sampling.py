"""Jitted autoregressive decoding over a fixed-capacity KV cache.

One `lax.while_loop` decodes every step (no per-token Python or recompiles) and
exits early once all rows have hit a stop token. Greedy when temperature == 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import kv_cache, model as model_lib, sharding
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 -> greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 -> off
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0


class Generation(NamedTuple):
  tokens: jax.Array  # [B, N] generated ids, pad_id after the stop token
  lengths: jax.Array  # [B] tokens generated, stop token included
  logprobs: jax.Array  # [B, N] log p(token) under the untempered model (0 after stop)
  entropy: jax.Array  # [B, N] entropy of the untempered next-token distribution
  cache: KVCache


def greedy_token(logits: jax.Array) -> jax.Array:
  """[B, V] -> [B] int32: the first index of each row's maximum, as `jnp.argmax`.

  Two plain reductions (max, then the smallest index holding it): XLA:CPU runs
  argmax's (value, index) reduction 2.4x slower at [8, 49152], a millisecond of
  every batch-8 decode step. A row with NaNs gets V - 1 (argmax: the NaN's index).
  """
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def sample_token(logits: jax.Array, key: jax.Array, sc: SamplingConfig) -> jax.Array:
  """[B, V] f32 logits -> [B] token ids (greedy, or temperature/top-k/top-p)."""
  if sc.temperature <= 0:
    return greedy_token(logits)
  logits = logits / sc.temperature
  if sc.top_k > 0:
    kth = jax.lax.top_k(logits, sc.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sc.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Smallest logit still inside the nucleus (the first token is always kept).
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sc.top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _log_prob_and_entropy(logits: jax.Array, tok: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log p(tok) and the entropy log Z - sum(p z) of each row of [B, V] logits.

  One exp per logit, and the last sum as a dot product: inside the decode loop
  XLA:CPU ran `sum(exp(logp) * logp)` as a 0.45 ms multiply-reduce per step at
  batch 1, the dot in 0.13 ms (jax.profiler trace, docs/performance.md ninth pass).
  """
  z = logits - jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(z)
  total = jnp.sum(e, axis=-1)
  log_total = jnp.log(total)
  lp = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - log_total
  return lp, log_total - jnp.einsum("bv,bv->b", e, z) / total


def decode(weights: Weights, cfg: ModelConfig, cache: KVCache, last_logits: jax.Array,
           key: jax.Array, sc: SamplingConfig, lora: LoRA | None = None,
           by_layer: bool = True, transpose_keys: bool | None = None) -> Generation:
  """Decodes up to `sc.max_new_tokens` tokens after a prefill.

  Args:
    cache: prefilled cache with at least `max_new_tokens` free slots.
    last_logits: [B, V] logits at each row's last prompt position.
    by_layer: run the loop on per-layer K/V buffers (kv_cache.by_layer): each step
      reads every layer's keys and values in place instead of slicing them out of
      the stacked cache; one copy each way per call instead of one per layer per
      token. False keeps the stacked cache (bench/bench_decode_cache.py compares).
    transpose_keys: with `by_layer`, store each layer's keys [B, K, Dh, S] for the
      loop (layers.TransposedKeys), transposed in the same per-call copy. Default:
      for XLA's attention only; packed weights' attention kernel reads [B, K, S, Dh]
      faster (docs/performance.md, ninth pass).
  """
  if transpose_keys is None:
    transpose_keys = not model_lib.is_packed(weights)
  b = last_logits.shape[0]
  n = sc.max_new_tokens
  stop_ids = jnp.asarray(sc.stop_ids or (-1,), jnp.int32)

  def cond(state):
    i, _, _, done, *_ = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, cache, logits, done, key, toks, lps, ents = state
    key, sub = jax.random.split(key)
    tok = sample_token(logits, sub, sc)
    tok = jnp.where(done, sc.pad_id, tok)
    lp, ent = _log_prob_and_entropy(logits, tok)
    lp, ent = jnp.where(done, 0.0, lp), jnp.where(done, 0.0, ent)
    toks, lps, ents = (jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], i, axis=1)
                       for buf, val in ((toks, tok), (lps, lp), (ents, ent)))
    out = model_lib.forward(weights, cfg, cache, tokens=tok[:, None], valid=~done[:, None],
                            lora=lora, logits="last")
    done = done | jnp.isin(tok, stop_ids)
    return i + 1, out.cache, out.logits[:, 0], done, key, toks, lps, ents

  init = (jnp.int32(0), kv_cache.by_layer(cache, transpose_keys) if by_layer else cache,
          last_logits.astype(jnp.float32), jnp.zeros((b,), bool), key,
          jnp.full((b, n), sc.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b, n), jnp.float32))
  _, cache, _, _, _, toks, lps, ents = jax.lax.while_loop(cond, body, init)
  cache = kv_cache.stacked(cache)
  is_stop = jnp.isin(toks, stop_ids)
  first_stop = jnp.where(is_stop.any(axis=1), jnp.argmax(is_stop, axis=1) + 1, n)
  return Generation(toks, first_stop.astype(jnp.int32), lps, ents, cache)


def prefill_and_decode(weights: Weights, cfg: ModelConfig, tokens: jax.Array, valid: jax.Array,
                       key: jax.Array, sc: SamplingConfig, capacity: int,
                       lora: LoRA | None = None, mesh: jax.sharding.Mesh | None = None
                       ) -> Generation:
  """Prefills left-padded prompts [B, T] into a fresh cache, then decodes.

  `mesh`: the cache's rows are split over its batch axes, like `tokens` (eval_mesh).
  """
  # Made outside jit: a cache of compile-time zeros makes XLA constant-fold the
  # prefill's attention over it (seconds of compile time for nothing).
  cache = sharding.empty_cache(cfg, tokens.shape[0], capacity, mesh)
  return _prefill_and_decode(weights, cfg, cache, tokens, valid, key, sc, lora)


@functools.partial(jax.jit, static_argnames=("cfg", "sc"), donate_argnames=("cache",))
def _prefill_and_decode(weights, cfg, cache, tokens, valid, key, sc, lora):
  # No-op for weights the caller keeps in this layout (built once); others are split here,
  # one copy per call instead of one per layer per decoded token (model.per_layer).
  weights = model_lib.per_layer(weights)
  return prefill_then_decode(weights, cfg, cache, tokens, valid, key, sc, lora)


def prefill_then_decode(weights: Weights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                        valid: jax.Array, key: jax.Array, sc: SamplingConfig,
                        lora: LoRA | None = None) -> Generation:
  """The body of `prefill_and_decode` for weights in any layout (bench/bench_compile.py)."""
  out = model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=lora,
                          logits="last", fresh_cache=True)
  return decode(weights, cfg, out.cache, out.logits[:, 0], key, sc, lora)


def left_pad(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a common length (rounded up to `multiple`, bounding recompiles).

  Returns: tokens [B, T] int32 and valid [B, T] bool.
  """
  if not seqs or any(len(s) == 0 for s in seqs):
    raise ValueError("left_pad needs non-empty token sequences")
  t = max(len(s) for s in seqs)
  t = -(-t // multiple) * multiple
  tokens = np.full((len(seqs), t), pad_id, np.int32)
  valid = np.zeros((len(seqs), t), bool)
  for r, s in enumerate(seqs):
    tokens[r, t - len(s):] = s
    valid[r, t - len(s):] = True
  return tokens, valid


def generate(weights: Weights, cfg: ModelConfig, prompts: list[list[int]], sc: SamplingConfig,
             seed: int = 0, lora: LoRA | None = None, bucket: int = 64) -> list[list[int]]:
  """Convenience: token-id prompts in, generated ids (stop token stripped) out."""
  tokens, valid = left_pad(prompts, sc.pad_id, bucket)
  capacity = tokens.shape[1] + sc.max_new_tokens
  gen = prefill_and_decode(weights, cfg, jnp.asarray(tokens), jnp.asarray(valid),
                           jax.random.key(seed), sc, capacity, lora)
  toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  out = []
  for row, n in zip(toks, lengths):
    ids = row[:n].tolist()
    if ids and ids[-1] in sc.stop_ids:
      ids = ids[:-1]
    out.append(ids)
  return out
