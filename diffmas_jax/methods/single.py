"""Single agent: one chain-of-thought prompt, decoded directly (the baseline)."""

from __future__ import annotations

from typing import Sequence

import jax

from diffmas_jax import prompts, sampling, topology
from diffmas_jax.methods.base import MethodOutput, RunContext, split_generation
from diffmas_jax.tasks import Record


def run(ctx: RunContext, records: Sequence[Record], seed: int = 0) -> list[MethodOutput]:
  tokens, valid = ctx.encode([prompts.single_messages(r) for r in records])
  sc = ctx.sampling_config(ctx.max_new_tokens)
  m = ctx.model
  _, _, lora = topology.split_lora(ctx.lora)  # an AgentLoRA's solver adapter answers alone
  gen = sampling.prefill_and_decode(m.weights, m.cfg, ctx.put(tokens), ctx.put(valid),
                                    jax.random.key(seed), sc, tokens.shape[1] + sc.max_new_tokens,
                                    lora, ctx.mesh)
  return [MethodOutput(text=r["text"], output_tokens=r["tokens"], answer_tokens=r["tokens"],
                       answer_nll=r["nll"], mean_token_entropy=r["entropy"],
                       trace_len_per_agent=[])
          for r in split_generation(gen, m.tokenizer, sc.stop_ids)]
