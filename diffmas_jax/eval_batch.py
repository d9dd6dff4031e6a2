"""Evaluation batch size from a KV-cache memory budget (`eval.batch_size = 0`).

Decode reads every weight once per step whatever the batch, so throughput grows
almost linearly with the batch until the cache reads catch up with the weight
reads; the cache is also what grows with the batch. The batch is therefore the
most rows whose caches fit `eval.cache_budget_mb`, capped at MAX_AUTO_BATCH (past
it attention over the cache dominates a decode step) and at the number of records
(a short list is not padded up to a large batch).
"""

from __future__ import annotations

from typing import Any, Sequence

from diffmas_jax import prompts
from diffmas_jax.config import ModelConfig
from diffmas_jax.tasks import Record

MAX_AUTO_BATCH = 32
DEFAULT_CACHE_BUDGET_MB = 2048


def cache_bytes_per_slot(cfg: ModelConfig) -> int:
  """K and V of one token in every layer."""
  import numpy as np
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize


def slots_per_row(prompt_width: int, num_agents: int, latent_steps: int, agent_new_tokens: int,
                  new_tokens: int) -> int:
  """Cache slots one row needs in the largest method: every upstream agent's prompt plus
  its latent steps or its text (whichever is longer), the solver's prompt (which in
  text_mas also quotes the upstream texts) and its answer."""
  per_agent = prompt_width + max(latent_steps, agent_new_tokens)
  return num_agents * per_agent + prompt_width + num_agents * agent_new_tokens + new_tokens


def prompt_width(tokenizer: Any, records: Sequence[Record], roles, bucket: int,
                 template_kwargs: dict | None = None) -> int:
  """Tokens of the longest chat prompt (longest question, every role and the solver),
  rounded up to `bucket`."""
  longest = max(records, key=lambda r: len(r.question) + sum(len(c) for c in r.choices or ()))
  chats = [prompts.upstream_messages(role, longest) for role in roles]
  chats.append(prompts.solver_messages(longest))
  width = max(len(tokenizer.encode_chat(c, **(template_kwargs or {}))) for c in chats)
  return -(-width // bucket) * bucket


def auto_batch_size(cfg: ModelConfig, tokenizer: Any, records: Sequence[Record], eval_cfg: Any,
                    agents_cfg: Any) -> int:
  """The evaluation batch for `eval.batch_size = 0` (module docstring)."""
  if not records:
    raise ValueError("no records to evaluate (check eval.task / eval.limit)")
  roles = prompts.roles_from_config(agents_cfg)
  width = prompt_width(tokenizer, records, roles, int(eval_cfg.bucket),
                       prompts.template_kwargs(tokenizer, agents_cfg.get("enable_thinking")))
  return budget_batch_size(cfg, width, eval_cfg, agents_cfg, len(records))


def budget_batch_size(cfg: ModelConfig, prompt_width: int, eval_cfg: Any, agents_cfg: Any,
                      num_records: int = MAX_AUTO_BATCH) -> int:
  """The most rows whose caches fit `eval.cache_budget_mb` for prompts `prompt_width` wide
  (capped at MAX_AUTO_BATCH and `num_records`); the plan calls it with the config's width."""
  roles = prompts.roles_from_config(agents_cfg)
  slots = slots_per_row(prompt_width, len(roles), max((r.latent_steps for r in roles), default=0),
                        int(agents_cfg.agent_max_new_tokens), int(eval_cfg.max_new_tokens))
  budget = float(eval_cfg.get("cache_budget_mb", DEFAULT_CACHE_BUDGET_MB)) * 2**20
  if budget <= 0:
    raise ValueError(f"eval.cache_budget_mb must be > 0, got {eval_cfg.cache_budget_mb}")
  fits = int(budget // (slots * cache_bytes_per_slot(cfg)))
  return max(1, min(fits, MAX_AUTO_BATCH, num_records))
