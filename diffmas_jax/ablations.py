"""What a training run optimises, by `train.method`: DiffMAS, TextMAS+SFT or C2C.

  diffmas      LoRA through the latent trace (train.loss_fn; grad modes in train.py).
  textmas_sft  the paper's TextMAS + SFT ablation: the upstream agents decode text
               once with the frozen model (`textmas_notes`), those notes are fixed
               inputs, and only the solver's adapter learns, with the same loss, on
               its prompt holding the notes. No trace.
  c2c          the C2C baseline: only the cache fuser (diffmas_jax/c2c.py) trains;
               the trace is built by the frozen model.

StitchMAS needs no code of its own: it is DiffMAS with the hierarchical topology
(independent segments, concatenated) in training and evaluation.

Every objective is `(params, weights, cache, batch, realigner, key, step) ->
(loss, metrics)`, pure; `key` None means evaluation behaviour (no dropout, hard
C2C gates), which the trainer's probe loss uses.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from diffmas_jax import c2c, lora as lora_lib, model as model_lib, multihost, paths, topology
from diffmas_jax import train as train_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import PipelineBatch, trace_capacity

log = logging.getLogger(__name__)

METHODS = ("diffmas", "textmas_sft", "c2c")
Objective = Callable[..., tuple[jax.Array, dict]]


def check_method(method: str, grad_mode: str) -> str:
  if method not in METHODS:
    raise ValueError(f"train.method={method!r} does not exist; choose one of {METHODS}")
  if method == "textmas_sft" and grad_mode != "final_only":
    raise ValueError("train.method=textmas_sft trains the solver's adapter only: set "
                     "--config.train.grad_mode=final_only (the textmas_sft config variant does)")
  return method


def init_params(method: str, cfg: ModelConfig, lora_cfg: lora_lib.LoraConfig, grad_mode: str,
                num_agents: int, key: jax.Array, fuser_cfg: c2c.FuserConfig | None = None) -> Any:
  """The trained parameters: adapters (diffmas, textmas_sft) or the C2C fuser."""
  if method == "c2c":
    return c2c.init_fuser(cfg, fuser_cfg or c2c.FuserConfig(), key)
  return train_lib.init_params(cfg, lora_cfg, grad_mode, num_agents, key)


def capacity(method: str, batch: PipelineBatch, spec: topology.TraceSpec) -> int:
  """Cache slots one training batch needs (the cache is made outside jit)."""
  if method == "c2c":
    return c2c.capacity(batch, spec)
  if method == "textmas_sft":
    return 1  # no trace: the solver's prompt and targets are scored without being stored
  return trace_capacity(batch, spec)


def solver_only_logits(solver: model_lib.LoRA | None, weights, cfg: ModelConfig,
                       batch: PipelineBatch) -> jax.Array:
  """[B, U, V] target logits of the solver on its prompt alone (no trace)."""
  tokens = jnp.concatenate([batch.solver_tokens, batch.target_tokens[:, :-1]], axis=1)
  valid = jnp.concatenate([batch.solver_valid, batch.target_valid[:, :-1]], axis=1)
  empty = KVCache.init(cfg, tokens.shape[0], 1, weights.embed.dtype)
  out = model_lib.forward(weights, cfg, empty, tokens=tokens, valid=valid, lora=solver,
                          logits="none", fresh_cache=True, append=False)
  return model_lib.lm_head(weights, out.hidden[:, batch.solver_tokens.shape[1] - 1:])


def _diffmas(params, weights, cache, batch, realigner, key, step, *, sc: train_lib.StepConfig):
  del step
  dropout = sc.dropout if key is not None else 0.0
  return train_lib.loss_fn(params, weights, sc.cfg, cache, batch, realigner, sc.spec,
                           sc.grad_mode, sc.remat, dropout, key)


def _textmas_sft(params, weights, cache, batch, realigner, key, step, *, cfg: ModelConfig,
                 dropout: float):
  del cache, realigner, step
  solver = params.solver if isinstance(params, topology.AgentLoRA) else params
  if key is not None and dropout > 0.0:
    solver = lora_lib.with_dropout(solver, dropout, key)
  logits = solver_only_logits(solver, weights, cfg, batch)
  return train_lib.loss_and_metrics(logits, batch.target_tokens, batch.target_valid)


def _c2c(params, weights, cache, batch, realigner, key, step, *, cfg: ModelConfig,
         spec: topology.TraceSpec, fc: c2c.FuserConfig):
  tau = fc.tau(step) if step is not None else fc.tau_end
  logits = c2c.target_logits(params, weights, cfg, cache, batch, realigner, spec, key, tau)
  loss, metrics = train_lib.loss_and_metrics(logits, batch.target_tokens, batch.target_valid)
  metrics["gate_k_open"] = jnp.mean(params["k"]["gate"] > 0)
  metrics["tau"] = jnp.asarray(tau, jnp.float32)
  return loss, metrics


def objective(method: str, sc: train_lib.StepConfig,
              fuser_cfg: c2c.FuserConfig | None = None) -> Objective:
  """The loss a train step differentiates with respect to its trained parameters."""
  if method == "c2c":
    return functools.partial(_c2c, cfg=sc.cfg, spec=sc.spec, fc=fuser_cfg or c2c.FuserConfig())
  if method == "textmas_sft":
    return functools.partial(_textmas_sft, cfg=sc.cfg, dropout=sc.dropout)
  return functools.partial(_diffmas, sc=sc)


# --- TextMAS+SFT data: the upstream agents' text, generated once and kept fixed ---

def textmas_notes(model: Any, examples: Sequence[Any], agents_cfg: Any, eval_cfg: Any,
                  cache_path: str | None = None) -> list[list[tuple[str, str]]]:
  """[(role, text)] per example: the upstream agents' TextMAS outputs (frozen model).

  Decoded like the text_mas method at evaluation (same roles, prompts, sampling
  and `agents.agent_max_new_tokens`). With `cache_path` (a JSONL in the workdir,
  local or a URL) the notes are written once, by process 0, and read back on
  resume, so a resumed run trains on exactly the same inputs. Process 0 reads the
  file and sends its rows to the others: every process decodes (a collective
  computation) or none does, even when only process 0 can see the workdir.
  """
  from diffmas_jax.data import as_record
  from diffmas_jax.methods import RunContext, text_mas
  cached = _read_notes(cache_path, examples) if cache_path and multihost.is_main() else None
  cached = json.loads(multihost.broadcast_bytes(json.dumps(cached).encode(), "textmas_notes"))
  if cached is not None:
    return [[tuple(n) for n in notes] for notes in cached]
  ctx = RunContext.from_config(model, agents_cfg, eval_cfg).replace(max_new_tokens=1)
  size = int(eval_cfg.batch_size)
  records = [as_record(ex) for ex in examples]
  notes = []
  for i in range(0, len(records), size):
    chunk = records[i:i + size]
    outs = text_mas.run(ctx, chunk + [chunk[-1]] * (size - len(chunk)), seed=int(eval_cfg.seed))
    notes += [list(zip([r.name for r in ctx.roles], o.agent_texts)) for o in outs[:len(chunk)]]
    log.info("textmas notes: %d / %d examples", len(notes), len(records))
  if cache_path and multihost.is_main():
    paths.write_atomic(cache_path, "".join(json.dumps({"id": ex.id, "notes": n}) + "\n"
                                           for ex, n in zip(examples, notes)))
  return notes


def _read_notes(path: str, examples: Sequence[Any]) -> list | None:
  """The cached notes of `examples` in order, or None when the file misses any."""
  p = paths.as_path(path)
  if not p.exists():
    return None
  rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
  by_id = {r["id"]: r["notes"] for r in rows}
  return [by_id[ex.id] for ex in examples] if all(ex.id in by_id for ex in examples) else None


def fingerprint_extra(cfg: Any) -> dict:
  """Config sections beyond train/lora/agents that a run's checkpoints depend on."""
  if cfg.train.get("method", "diffmas") == "c2c":
    return {"c2c": cfg.c2c.to_dict()}
  return {}

