"""TextMAS: the same roles as latent_mas, but each upstream agent decodes text.

Sequential: every agent's text goes into the next agents' prompts and into the
solver's. Hierarchical: the specialists answer independently (none sees another's
text) and the solver reads all of them.
"""

from __future__ import annotations

from typing import Sequence

import jax

from diffmas_jax import prompts, sampling, topology
from diffmas_jax.methods.base import MethodOutput, RunContext, split_generation
from diffmas_jax.tasks import Record


def _generate(ctx: RunContext, chats, max_new: int, seed: int, lora):
  """Batched prefill + decode; returns per-row results and prompt lengths."""
  tokens, valid = ctx.encode(chats)
  sc = ctx.sampling_config(max_new)
  m = ctx.model
  gen = sampling.prefill_and_decode(m.weights, m.cfg, ctx.put(tokens), ctx.put(valid),
                                    jax.random.key(seed), sc, tokens.shape[1] + max_new, lora,
                                    ctx.mesh)
  return split_generation(gen, m.tokenizer, sc.stop_ids), valid.sum(axis=1).tolist()


def run(ctx: RunContext, records: Sequence[Record], seed: int = 0) -> list[MethodOutput]:
  up_lora, per_agent, solver_lora = topology.split_lora(ctx.lora)
  chained = ctx.topology == "sequential"
  notes: list[list[tuple[str, str]]] = [[] for _ in records]
  trace_len: list[list[int]] = [[] for _ in records]
  generated = [0] * len(records)
  for j, role in enumerate(ctx.roles):
    lora = jax.tree.map(lambda x: x[j], up_lora) if per_agent else up_lora
    chats = [prompts.upstream_messages(role, r, notes[i] if chained else ())
             for i, r in enumerate(records)]
    rows, prompt_lens = _generate(ctx, chats, ctx.agent_max_new_tokens, seed + 1 + j, lora)
    for i, (row, n) in enumerate(zip(rows, prompt_lens)):
      notes[i].append((role.name, row["text"]))
      trace_len[i].append(n + row["tokens"])
      generated[i] += row["tokens"]
  chats = [prompts.solver_messages(r, notes[i], ctx.solver_text) for i, r in enumerate(records)]
  rows, _ = _generate(ctx, chats, ctx.max_new_tokens, seed, solver_lora)
  return [MethodOutput(text=row["text"], output_tokens=generated[i] + row["tokens"],
                       answer_tokens=row["tokens"], answer_nll=row["nll"],
                       mean_token_entropy=row["entropy"], trace_len_per_agent=trace_len[i],
                       agent_texts=[text for _, text in notes[i]])
          for i, row in enumerate(rows)]
