"""LatentMAS (and DiffMAS at inference): agents communicate through one KV trace.

Trace building (topology.build), the trace-keep mask, the solver's prefill and
its decoding are one jitted function per (batch, prompt widths, TraceSpec,
SamplingConfig), shared by every call. Adapters turn it into DiffMAS inference:
`ctx.lora` is one shared LoRA, or a `topology.AgentLoRA` (upstream adapters
stacked on a leading [A] axis and/or the solver's own).

`encode_pipeline` builds the padded batch tensors from records; the trainer
reuses it (with `targets`) and `teacher_forced_logits` for its loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import agents, prompts, sampling, topology
from diffmas_jax import model as model_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.base import (MethodOutput, RunContext, encode_chats, pad_left_to,
                                      split_generation)
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights
from diffmas_jax.tasks import Record


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PipelineBatch:
  """Padded inputs of a latent pipeline (numpy from `encode_pipeline`, or jax arrays).

  Attributes:
    agent_tokens, agent_valid: [A, B, T] upstream role prompts, left padded to
      one common width T (so the agents stack for the scan).
    solver_tokens, solver_valid: [B, Ts] solver prompts, left padded.
    target_tokens, target_valid: [B, U] teacher-forcing targets (target text +
      stop token), RIGHT padded, or None. Column u of the targets directly
      follows the solver prompt, so every row's prompt ends at column Ts - 1.
  """

  agent_tokens: Any
  agent_valid: Any
  solver_tokens: Any
  solver_valid: Any
  target_tokens: Any = None
  target_valid: Any = None

  def as_jax(self) -> "PipelineBatch":
    return jax.tree.map(jnp.asarray, self)

  @property
  def prompt_width(self) -> int:
    return self.agent_tokens.shape[-1]


def encode_pipeline(tokenizer: Any, records: Sequence[Record],
                    roles: Sequence[prompts.AgentRole], *, solver_text: str | None = None,
                    bucket: int = 32, template_kwargs: dict | None = None,
                    targets: Sequence[str] | None = None) -> PipelineBatch:
  """Records -> chat-templated, padded pipeline inputs.

  Args:
    tokenizer: a diffmas_jax Tokenizer (or anything with encode, encode_chat,
      pad_id, eos_id).
    records: the batch.
    roles: upstream agents, in order (the solver comes after them).
    solver_text: override of the solver's instruction.
    bucket: widths round up to a multiple of this (bounds recompiles).
    template_kwargs: chat-template variables (e.g. enable_thinking).
    targets: optional solver target texts (training); each gets eos appended.
  Returns:
    PipelineBatch of numpy arrays.
  """
  encoded = [encode_chats(tokenizer, [prompts.upstream_messages(role, r) for r in records],
                          bucket, template_kwargs) for role in roles]
  width = max(t.shape[1] for t, _ in encoded)  # one width for all agents: they stack
  encoded = [pad_left_to(t, v, width, tokenizer.pad_id) for t, v in encoded]
  solver = [prompts.solver_messages(r, text=solver_text) for r in records]
  solver_tokens, solver_valid = encode_chats(tokenizer, solver, bucket, template_kwargs)
  batch = PipelineBatch(np.stack([t for t, _ in encoded]), np.stack([v for _, v in encoded]),
                        solver_tokens, solver_valid)
  if targets is not None:
    if len(targets) != len(records):
      raise ValueError(f"{len(targets)} targets for {len(records)} records")
    ids = [tokenizer.encode(t) + [tokenizer.eos_id] for t in targets]
    width = -(-max(len(i) for i in ids) // bucket) * bucket
    batch.target_tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    batch.target_valid = np.zeros((len(ids), width), bool)
    for r, row in enumerate(ids):
      batch.target_tokens[r, :len(row)] = row
      batch.target_valid[r, :len(row)] = True
  return batch


def pipeline_capacity(batch: PipelineBatch, spec: topology.TraceSpec, new_tokens: int = 0) -> int:
  """Cache slots for the trace + solver prompt + `new_tokens` decoded (inference)."""
  return trace_capacity(batch, spec) + batch.solver_tokens.shape[1] + new_tokens


def trace_capacity(batch: PipelineBatch, spec: topology.TraceSpec) -> int:
  """Cache slots for the upstream trace alone: all that teacher forcing needs,
  since the solver's prompt and targets are scored without being stored."""
  return spec.length(batch.prompt_width)


def solver_prefill(weights: Weights, cfg: ModelConfig, cache: KVCache, batch: PipelineBatch,
                   realigner: agents.Realigner, spec: topology.TraceSpec,
                   lora: LoRA | topology.AgentLoRA | None = None, remat: bool = False,
                   with_targets: bool = False) -> model_lib.ForwardOutput:
  """Builds the trace, then prefills the solver prompt on top of it; logits are
  not computed. `with_targets`: also the targets but their last token, scored
  without storing their K/V (the returned cache then holds the trace only)."""
  _, _, solver_lora = topology.split_lora(lora)
  cache, _ = topology.build(weights, cfg, cache, batch.agent_tokens, batch.agent_valid,
                            realigner, spec, lora, remat)
  tokens, valid = batch.solver_tokens, batch.solver_valid
  if with_targets:
    tokens = jnp.concatenate([tokens, batch.target_tokens[:, :-1]], axis=1)
    valid = jnp.concatenate([valid, batch.target_valid[:, :-1]], axis=1)
  return model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=solver_lora,
                           logits="none", append=not with_targets)


def teacher_forced_logits(weights: Weights, cfg: ModelConfig, cache: KVCache,
                          batch: PipelineBatch, realigner: agents.Realigner,
                          spec: topology.TraceSpec, lora: LoRA | topology.AgentLoRA | None = None,
                          remat: bool = False) -> jax.Array:
  """[B, U, V] f32 logits predicting `batch.target_tokens`, conditioned on the whole trace.

  `cache` must be empty with `trace_capacity(batch, spec)` slots (more work
  too, at the cost of attending over empty ones); create it outside jit
  (`KVCache.init`) so XLA does not constant-fold attention over zeros.
  Mask the loss with `batch.target_valid`.
  """
  out = solver_prefill(weights, cfg, cache, batch, realigner, spec, lora, remat, with_targets=True)
  ts = batch.solver_tokens.shape[1]
  return model_lib.lm_head(weights, out.hidden[:, ts - 1:])


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "spec"), donate_argnames=("cache",))
def trace_and_decode(weights: Weights, cfg: ModelConfig, cache: KVCache, batch: PipelineBatch,
                     realigner: agents.Realigner, key: jax.Array,
                     lora: LoRA | topology.AgentLoRA | None, *, sc: sampling.SamplingConfig,
                     spec: topology.TraceSpec) -> sampling.Generation:
  """The whole latent pipeline, jitted: trace, solver prefill, decoding.

  `cache`: empty, `pipeline_capacity(batch, spec, sc.max_new_tokens)` slots,
  made outside jit (donated). Returns the solver's Generation.
  """
  # No-op when the caller keeps this layout (model.per_layer).
  weights = model_lib.per_layer(weights)
  return trace_then_decode(weights, cfg, cache, batch, realigner, key, lora, sc=sc, spec=spec)


def trace_then_decode(weights: Weights, cfg: ModelConfig, cache: KVCache, batch: PipelineBatch,
                      realigner: agents.Realigner, key: jax.Array,
                      lora: LoRA | topology.AgentLoRA | None, *, sc: sampling.SamplingConfig,
                      spec: topology.TraceSpec) -> sampling.Generation:
  """The body of `trace_and_decode` for weights in any layout (bench/bench_compile.py)."""
  out = solver_prefill(weights, cfg, cache, batch, realigner, spec, lora)
  _, _, solver_lora = topology.split_lora(lora)
  last = model_lib.lm_head(weights, out.hidden[:, -1:])[:, 0]  # [B, V]
  return sampling.decode(weights, cfg, out.cache, last, key, sc, solver_lora)


def run(ctx: RunContext, records: Sequence[Record], seed: int = 0) -> list[MethodOutput]:
  m, spec = ctx.model, ctx.spec
  batch = encode_pipeline(m.tokenizer, records, ctx.roles, solver_text=ctx.solver_text,
                          bucket=ctx.bucket, template_kwargs=ctx.template_kwargs)
  sc = ctx.sampling_config(ctx.max_new_tokens)
  cache = ctx.new_cache(len(records), pipeline_capacity(batch, spec, sc.max_new_tokens))
  gen = trace_and_decode(m.weights, m.cfg, cache, ctx.put_pipeline(batch), ctx.realigner,
                         jax.random.key(seed), ctx.lora, sc=sc, spec=spec)
  # [B, A]: positions each agent added to the trace (its true prompt tokens + m).
  per_agent = (batch.agent_valid.sum(axis=2) + np.asarray(spec.steps)[:, None]).T
  return [MethodOutput(text=r["text"], output_tokens=r["tokens"], answer_tokens=r["tokens"],
                       answer_nll=r["nll"], mean_token_entropy=r["entropy"],
                       trace_len_per_agent=per_agent[i].tolist())
          for i, r in enumerate(split_generation(gen, m.tokenizer, sc.stop_ids))]
