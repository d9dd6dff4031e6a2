"""Agent stages on a shared, append-only KV trace (LatentMAS / DiffMAS).

An upstream agent prefills its role prompt on top of the trace, then takes m
"latent thought" steps: the final-norm hidden state is realigned into the input
embedding space and fed back as the next input, appending one K/V slot per step.
Stages with equal prompt shapes compose with `lax.scan`, so adding agents adds
no compile time; each stage can be rematerialised because gradients cross the
trace in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from diffmas_jax import model as model_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Realigner:
  """realign(h) = (h @ w_a) * target_norm / max(||h @ w_a||, 1e-6)."""

  w_a: Any  # [D, D] f32
  target_norm: Any  # [] f32: mean row norm of the input embedding


REALIGN_ROWS = ("tokenizer", "all")


def realign_row_count(mode: str, tokenizer_size: int | None, embedding_rows: int) -> int:
  """How many vocabulary rows W_a and target_norm are built from.

  "tokenizer" (default) matches LatentMAS, which resizes the embeddings to
  len(tokenizer) first: on Qwen checkpoints that drops the padding rows no
  token uses (Qwen3: 151936 - 151669 = 267), which changes target_norm; where
  the tokenizer covers every row (Llama, SmolLM2) it changes nothing. "all"
  uses every row. A tokenizer larger than the embedding (LatentMAS would add
  fresh random rows), or one of unknown size (None), uses every row.
  """
  if mode not in REALIGN_ROWS:
    raise ValueError(f"realign_rows={mode!r}; expected one of {REALIGN_ROWS} "
                     "(--config.agents.realign_rows)")
  if mode == "all" or tokenizer_size is None:
    return embedding_rows
  return min(tokenizer_size, embedding_rows)


def make_realigner(weights: Weights, lam: float = 1e-5, enabled: bool = True,
                   rows: int | None = None) -> Realigner:
  """Ridge map from output (LM-head) space back to input-embedding space, in f32.

  W_a = solve(W_out^T W_out + lam I, W_out^T W_in). With `enabled=False`, W_a = I
  but the norm rescale still applies: without it latent inputs drift off the
  embedding manifold and generation degenerates. `rows`: use only the first
  `rows` vocabulary rows of both embeddings (see `realign_row_count`); None = all.
  """
  w_in = weights.embed.astype(jnp.float32)[:rows]  # [V, D]
  head = model_lib.untied_lm_head(weights)
  w_out = w_in if head is None else head.astype(jnp.float32).T[:rows]
  target_norm = jnp.mean(jnp.linalg.norm(w_in, axis=-1))
  d = w_in.shape[1]
  if not enabled:
    return Realigner(jnp.eye(d, dtype=jnp.float32), target_norm)
  gram = w_out.T @ w_out + lam * jnp.eye(d, dtype=jnp.float32)
  w_a = jnp.linalg.solve(gram, w_out.T @ w_in)
  return Realigner(w_a, target_norm)


def realign(h: jax.Array, r: Realigner) -> jax.Array:
  """[B, D] hidden -> [B, D] input embedding (f32)."""
  e = h.astype(jnp.float32) @ r.w_a
  norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
  return e * (r.target_norm / jnp.maximum(norm, 1e-6))


def latent_steps(weights: Weights, cfg: ModelConfig, cache: KVCache, h: jax.Array,
                 realigner: Realigner, steps: int, lora: LoRA | None = None
                 ) -> tuple[KVCache, jax.Array]:
  """Runs `steps` latent thoughts from hidden state h [B, D]; appends `steps` slots.

  The steps write into a `steps`-slot working cache and attend to `cache` as a
  read-only context, so the scan carries (and reverse-mode AD saves per step)
  only those few slots, not the whole trace.
  """
  if steps == 0:
    return cache, h
  take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, cache.end, steps, axis=axis)
  work = KVCache(k=take(cache.k, 3), v=take(cache.v, 3), pos=take(cache.pos, 1),
                 end=jnp.zeros((), jnp.int32))  # the (empty) slots the steps will fill

  def step(carry, _):
    work, h = carry
    e = realign(h, realigner)[:, None]  # [B, 1, D]
    out = model_lib.forward(weights, cfg, work, embeds=e, lora=lora, logits="none",
                            context=cache)
    return (out.cache, out.hidden[:, -1]), None

  (work, h), _ = jax.lax.scan(step, (work, h), None, length=steps)
  put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new, cache.end, axis)
  return KVCache(k=put(cache.k, work.k, 3), v=put(cache.v, work.v, 3),
                 pos=put(cache.pos, work.pos, 1), end=cache.end + steps), h


def agent_stage(weights: Weights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                valid: jax.Array, realigner: Realigner, steps: int,
                lora: LoRA | None = None, start_pos: jax.Array | None = None
                ) -> tuple[KVCache, jax.Array]:
  """Prefills one agent's left-padded prompt [B, T] and takes `steps` latent steps.

  Left padding puts each row's true last token in the last column, so every
  row's latent rollout starts from its own last prompt token.
  `start_pos` [B] overrides where the prompt's positions start (default: after
  the cache's last position). Returns the extended cache (T + steps more slots)
  and the final hidden state [B, D].
  """
  positions = None
  if start_pos is not None:
    positions = start_pos[:, None] + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  out = model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, positions=positions,
                          lora=lora, logits="none")
  return latent_steps(weights, cfg, out.cache, out.hidden[:, -1], realigner, steps, lora)


def build_trace(weights: Weights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                valid: jax.Array, realigner: Realigner, steps: int,
                lora: LoRA | None = None, per_agent_lora: bool = False,
                remat: bool = False,
                before_stage: Callable[[KVCache, jax.Array], KVCache] | None = None
                ) -> tuple[KVCache, jax.Array]:
  """Sequential agents via `lax.scan` over stacked prompts.

  Args:
    tokens, valid: [A, B, T] left-padded role prompts, one per upstream agent.
    lora: None; one LoRA shared by every stage; or, with `per_agent_lora`, a
      LoRA whose leaves carry a leading [A] agent axis.
    remat: wrap each stage in `jax.checkpoint` (training: activations of a stage
      are recomputed in the backward pass instead of stored for all stages).
    before_stage: optional `(cache, agent_index) -> cache` applied before each
      stage (topology.py uses it to hide slots for the trace-keep options).
  Returns:
    The trace (A * (T + steps) more slots) and final hidden states [A, B, D].
  """
  chex.assert_rank([tokens, valid], 3)
  chex.assert_equal_shape([tokens, valid])
  chex.assert_axis_dimension(tokens, 1, cache.batch)

  def stage(cache, tok, val, lo):
    return agent_stage(weights, cfg, cache, tok, val, realigner, steps, lo)

  if remat:
    stage = jax.checkpoint(stage)

  def body(cache, xs):
    j, tok, val, lo = xs
    if before_stage is not None:
      cache = before_stage(cache, j)
    cache, h = stage(cache, tok, val, lo if per_agent_lora else lora)
    return cache, h

  agent_ids = jnp.arange(tokens.shape[0])
  return jax.lax.scan(body, cache, (agent_ids, tokens, valid, lora if per_agent_lora else None))


def trace_length(num_agents: int, prompt_len: int, steps: int) -> int:
  """Slots an A-agent sequential trace occupies (padding slots included)."""
  return num_agents * (prompt_len + steps)
