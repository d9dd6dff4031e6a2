"""The evaluation harness: methods x records -> per-sample JSONL, summary.md, PNG.

    out = evaluate(load_model(), load_task("gsm8k", limit=50), ["single", "latent_mas"],
                   cfg.eval, cfg.agents, "runs/gsm8k50")

Resumable: samples already in <workdir>/results.jsonl are skipped, so rerunning
the same command after a kill continues where it stopped. A workdir remembers
the settings its results were made with (run_config.json) and refuses to mix in
results made with different ones.

Batches have a fixed size: a short last batch is padded with copies of its last
record (outputs dropped), so every batch reuses the same compiled functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from diffmas_jax.eval import ResultStore, write_summary
from diffmas_jax.eval_batch import auto_batch_size
from diffmas_jax.loading import LoadedModel
from diffmas_jax.methods import Method, RunContext, resolve
from diffmas_jax.model import per_layer
from diffmas_jax.tasks import Record, score
from diffmas_jax.tasks.sandbox import check_available as check_sandbox

# Settings that do not change any sample's result (so resuming with new values is fine).
_FREE_EVAL_KEYS = ("limit", "methods", "num_samples")


def evaluate(loaded_model: LoadedModel, records: Sequence[Record], method_names: Sequence[str],
             eval_cfg: Any, agents_cfg: Any, workdir: str, lora: Any = None,
             extra_methods: Mapping[str, Method] | None = None, notes: Sequence[str] = (),
             progress: bool = True) -> dict:
  """Runs each method on every record (`eval_cfg.num_samples` times) and writes the report.

  Args:
    loaded_model: from `diffmas_jax.loading.load_model`.
    records: the benchmark items (`diffmas_jax.tasks.load_task`).
    method_names: registered methods ("single", "text_mas", "latent_mas"), any
      of them with "+lora" (run with `lora`), "diffmas" (= "latent_mas+lora"),
      or names in `extra_methods`.
    eval_cfg, agents_cfg: the `eval` and `agents` config sections.
    workdir: where results.jsonl, summary.md, summary.json, accuracy.png go.
    lora: trained adapters (a LoRA shared by all agents, or a topology.AgentLoRA).
    extra_methods: name -> run function, for methods defined elsewhere.
    notes: extra lines for summary.md (the offline stand-in is added automatically).
    progress: show a tqdm bar per method.
  Returns:
    {"title", "methods": {name: figures from summary.json}, "summary_md",
     "summary_png", "records": the per-sample rows of this evaluation}.
  """
  if any(r.family == "code" for r in records):  # refuse before any generation, not after
    check_sandbox(eval_cfg.get("sandbox") or None)
  # Inference layout (model.per_layer): decode reads each weight once per step.
  loaded_model = dataclasses.replace(loaded_model, weights=per_layer(loaded_model.weights))
  runs = _method_runs(loaded_model, method_names, eval_cfg, agents_cfg, lora, extra_methods)
  os.makedirs(workdir, exist_ok=True)
  _check_run_config(workdir, loaded_model, eval_cfg, agents_cfg, lora)
  store = ResultStore(os.path.join(workdir, "results.jsonl"))
  done = store.done_keys()
  batch_size, num_samples = int(eval_cfg.batch_size), int(eval_cfg.num_samples)
  if batch_size <= 0:  # unset: as many rows as the cache budget holds (eval_batch.py)
    batch_size = auto_batch_size(loaded_model.cfg, loaded_model.tokenizer, records, eval_cfg,
                                 agents_cfg)
  for name, (run, ctx) in runs.items():
    # Fixed chunks of the record list, so a resumed run keeps each item's seed.
    chunks = [(s, c, records[i:i + batch_size]) for s in range(num_samples)
              for c, i in enumerate(range(0, len(records), batch_size))]
    todo = [(s, c, [r for r in chunk if (name, r.id, s) not in done]) for s, c, chunk in chunks]
    todo = [t for t in todo if t[2]]
    bar = tqdm(total=sum(len(t[2]) for t in todo), desc=name, unit="sample", dynamic_ncols=True,
               disable=not progress)
    for i, (sample, chunk_index, pending) in enumerate(todo):
      if i == 0:  # the first batch compiles (or loads from the compile cache)
        bar.set_postfix_str("compiling ...", refresh=True)
      batch = list(pending) + [pending[-1]] * (batch_size - len(pending))
      seed = int(eval_cfg.seed) + 1000 * sample + chunk_index
      t0 = time.perf_counter()
      outs = run(ctx, batch, seed)[:len(pending)]
      per_sample = (time.perf_counter() - t0) / len(pending)
      for rec, out in zip(pending, outs):
        graded = score(rec, out.text, eval_cfg.get("sandbox") or None)
        store.append(dict(
            method=name, task=str(eval_cfg.task), id=rec.id, sample_index=sample, seed=seed,
            batch=chunk_index, question=rec.question, gold=rec.gold,
            prediction=graded["prediction"], correct=bool(graded["correct"]),
            detail=graded.get("detail", ""), raw_output=out.text,
            output_tokens=out.output_tokens, answer_tokens=out.answer_tokens,
            answer_nll=out.answer_nll, mean_token_entropy=out.mean_token_entropy,
            trace_len_per_agent=out.trace_len_per_agent, agent_texts=out.agent_texts,
            seconds=per_sample))
      bar.update(len(pending))
      if i == 0:
        bar.set_postfix_str("")
    bar.close()
  wanted = {(n, str(r.id), s) for n in runs for r in records for s in range(num_samples)}
  rows = [r for r in store.records
          if (r["method"], str(r["id"]), int(r.get("sample_index", 0))) in wanted]
  title = _title(eval_cfg, len(records))
  md, png = write_summary(rows, workdir, title, _notes(loaded_model, eval_cfg, agents_cfg, runs,
                                                       notes))
  with open(os.path.join(workdir, "summary.json")) as f:
    figures = json.load(f)["methods"]
  return {"title": title, "methods": figures, "summary_md": md, "summary_png": png,
          "records": rows}


def _method_runs(model, method_names, eval_cfg, agents_cfg, lora, extra_methods
                 ) -> dict[str, tuple[Method, RunContext]]:
  """name -> (run function, its context); baselines never see the adapters."""
  if not method_names:
    raise ValueError("no methods to evaluate; set --config.eval.methods")
  base = RunContext.from_config(model, agents_cfg, eval_cfg)
  with_lora = base.replace(lora=lora) if lora is not None else base
  runs = {}
  for name in method_names:
    run, uses_lora = resolve(name, extra_methods)
    if uses_lora and lora is None and not (extra_methods and name in extra_methods):
      raise ValueError(f"method {name!r} evaluates trained adapters, but none were given: pass "
                       "lora= to evaluate() (the training launcher does), or evaluate the "
                       "frozen model with 'latent_mas'")
    runs[name] = (run, with_lora if uses_lora else base)
  base.spec  # validate the trace settings before anything runs
  return runs


def _title(eval_cfg, n: int) -> str:
  split = f" {eval_cfg.split}" if eval_cfg.get("split") else ""
  return f"{eval_cfg.task}{split} ({n} items)"


def _notes(model, eval_cfg, agents_cfg, runs, extra) -> list[str]:
  ctx = next(iter(runs.values()))[1]
  roles = ", ".join(f"{r.name} (m={r.latent_steps})" for r in ctx.roles)
  notes = [f"model: {model.source} ({model.cfg.dtype})",
           f"agents: {roles} -> solver; topology {ctx.topology}"
           + (f" ({ctx.position_layout} positions)" if ctx.topology == "hierarchical" else "")
           + f"; realign {ctx.realign} (lambda {ctx.realign_lambda}, {ctx.realign_rows} rows); "
             f"trace_keep {ctx.trace_keep}"
           + (f" ({ctx.trace_cut})" if ctx.trace_keep != "all" else ""),
           f"decoding: temperature {ctx.temperature}"
           + (f", top_p {ctx.top_p}" if ctx.temperature > 0 else " (greedy)")
           + f"; max_new_tokens {ctx.max_new_tokens} (text_mas agents: "
             f"{ctx.agent_max_new_tokens}); batch {eval_cfg.batch_size or 'auto'}; seed {eval_cfg.seed}",
           "output tokens: all agents' generated tokens; trace length: positions the upstream "
           "agents ran (prompt + m latent steps, or prompt + generated text); s/sample: batch "
           "wall time / items, first batch per method includes compilation"]
  if eval_cfg.get("stand_in_for"):
    notes.append(f"offline stand-in: {eval_cfg.task} stands in for {eval_cfg.stand_in_for}")
  return notes + list(extra)


def _fingerprint(model, eval_cfg, agents_cfg, lora) -> dict:
  """The settings a workdir's results depend on (JSON-comparable)."""
  eval_items = {k: v for k, v in eval_cfg.to_dict().items() if k not in _FREE_EVAL_KEYS}
  lora_hash = None
  if lora is not None:
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(lora):
      h.update(np.asarray(leaf).tobytes())
    lora_hash = h.hexdigest()
  return json.loads(json.dumps({"model": model.source, "dtype": str(model.cfg.dtype),
                                "eval": eval_items, "agents": agents_cfg.to_dict(),
                                "lora_sha1": lora_hash}, default=str))


def _check_run_config(workdir, model, eval_cfg, agents_cfg, lora) -> None:
  path = os.path.join(workdir, "run_config.json")
  current = _fingerprint(model, eval_cfg, agents_cfg, lora)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != current:
      changed = _diff(previous, current)
      raise ValueError(f"{workdir} holds results made with other settings ({changed}); "
                       "resuming would mix them. Use a new --workdir, or delete "
                       f"{path} and results.jsonl to start over.")
    return
  with open(path, "w") as f:
    json.dump(current, f, indent=1)


def _diff(a: dict, b: dict, prefix: str = "") -> str:
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      sub = _diff(x, y, f"{prefix}{k}.")
      out += [sub] if sub else []
    elif x != y:
      out.append(f"{prefix}{k}: {x!r} -> {y!r}")
  return "; ".join(out)
