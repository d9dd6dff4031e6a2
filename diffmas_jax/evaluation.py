"""The evaluation harness: methods x records -> per-sample JSONL, summary.md, PNG.

    out = evaluate(load_model(), load_task("gsm8k", limit=50), ["single", "latent_mas"],
                   cfg.eval, cfg.agents, "runs/gsm8k50")

Resumable: samples already in <workdir>/results.jsonl are skipped, so rerunning
the same command after a kill continues where it stopped. A workdir remembers
the settings its results were made with (run_config.json) and refuses to mix in
results made with different ones.

Batches have a fixed size: a short last batch is padded with copies of its last
record (outputs dropped), so every batch reuses the same compiled functions.
Each batch runs data parallel over this process's devices (eval_mesh.py): its
rows are split over the mesh's batch axes, padded the same way to a multiple
of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from diffmas_jax import eval_mesh, multihost, paths
from diffmas_jax.eval import ResultStore, sample_key, stats_by_method, write_summary
from diffmas_jax.eval_batch import auto_batch_size
from diffmas_jax.eval.report import ACCURACY_PNG, SUMMARY_MD, _finite
from diffmas_jax.eval.results import _to_json
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
             progress: bool = True, mesh: Mesh | None = None) -> dict:
  """Runs each method on every record (`eval_cfg.num_samples` times) and writes the report.

  Args:
    loaded_model: from `diffmas_jax.loading.load_model`.
    records: the benchmark items (`diffmas_jax.tasks.load_task`).
    method_names: registered methods ("single", "text_mas", "latent_mas"), any
      of them with "+lora" (run with `lora`), "diffmas" (= "latent_mas+lora"),
      or names in `extra_methods`.
    eval_cfg, agents_cfg: the `eval` and `agents` config sections.
    workdir: where results.jsonl, summary.md, summary.json, accuracy.png go (a
      local path or a URL such as gs://bucket/run).
    lora: trained adapters (a LoRA shared by all agents, or a topology.AgentLoRA).
    extra_methods: name -> run function, for methods defined elsewhere.
    notes: extra lines for summary.md (the offline stand-in is added automatically).
    progress: show a tqdm bar.
    mesh: the process-local mesh each batch is split over (default
      `eval_mesh.inference_mesh`: the weights' mesh restricted to this process,
      or every local device on the data axis).
  Returns:
    {"title", "methods": {name: figures from summary.json}, "summary_md",
     "summary_png", "records": the per-sample rows of this evaluation}, the same
    on every process.

  Several processes (a multi-process JAX job) split the pending batches round
  robin; after each round the new rows are gathered and process 0 alone
  appends them to results.jsonl and writes the summary. Batches are fixed
  chunks of `records` whatever the process count, so a run resumed with
  another number of processes keeps every item's seed.
  """
  if any(r.family == "code" for r in records):  # refuse before any generation, not after
    check_sandbox(eval_cfg.get("sandbox") or None)
  mesh = mesh if mesh is not None else eval_mesh.inference_mesh(loaded_model.weights)
  # Inference layout (model.per_layer): decode reads each weight once per step.
  loaded_model = dataclasses.replace(
      loaded_model, weights=per_layer(eval_mesh.on_mesh(loaded_model.weights, mesh)))
  lora = None if lora is None else eval_mesh.on_mesh(lora, mesh)
  runs = _method_runs(loaded_model, method_names, eval_cfg, agents_cfg, lora, extra_methods, mesh)
  store, done_rows = _open_results(workdir, loaded_model, eval_cfg, agents_cfg, lora)
  batch_size, num_samples = int(eval_cfg.batch_size), int(eval_cfg.num_samples)
  if batch_size <= 0:  # unset: as many rows as the cache budget holds (eval_batch.py)
    batch_size = auto_batch_size(loaded_model.cfg, loaded_model.tokenizer, records, eval_cfg,
                                 agents_cfg)
  todo = []
  for name in runs:
    # Fixed chunks of the record list, so a resumed run keeps each item's seed.
    for s in range(num_samples):
      for c, i in enumerate(range(0, len(records), batch_size)):
        pending = [r for r in records[i:i + batch_size] if (name, str(r.id), s) not in done_rows]
        if pending:
          todo.append((name, s, c, pending))
  procs, me = jax.process_count(), jax.process_index()
  bar = tqdm(total=sum(len(t[3]) for t in todo), unit="sample", dynamic_ncols=True,
             disable=not progress or me != 0)
  for first in range(0, len(todo), procs):
    rows = []
    if first + me < len(todo):
      name, sample, chunk_index, pending = todo[first + me]
      bar.set_description(name)
      if (first == 0 or todo[first + me - procs][0] != name) and progress:
        # A method's first batch compiles (or loads from the compile cache).
        bar.set_postfix_str("compiling ...", refresh=True)
      rows = _run_batch(runs[name], name, pending, sample, chunk_index, eval_cfg, batch_size)
      bar.set_postfix_str("")
    if procs > 1:  # every process takes part in the exchange, with or without work
      rows = [r for b in multihost.allgather_bytes(json.dumps(rows).encode())
              for r in json.loads(b)]
    if store is not None:
      store.extend(rows)
    done_rows.update((sample_key(row), row) for row in rows)
    bar.update(sum(len(todo[j][3]) for j in range(first, min(first + procs, len(todo)))))
  bar.close()
  # Canonical order (method, sample, item), so the bootstrap sees the same rows in
  # the same order however many processes wrote them and however often it resumed.
  position = {str(r.id): i for i, r in enumerate(records)}
  order = {n: i for i, n in enumerate(runs)}
  rows = sorted((r for k, r in done_rows.items()
                 if k[0] in order and k[1] in position and k[2] < num_samples),
                key=lambda r: (order[r["method"]], int(r.get("sample_index") or 0),
                               position[str(r["id"])]))
  title = _title(eval_cfg, len(records))
  directory = paths.as_path(workdir)
  md, png = str(directory / SUMMARY_MD), str(directory / ACCURACY_PNG)
  summary_notes = _notes(loaded_model, eval_cfg, agents_cfg, runs, notes)
  if multihost.is_main():
    write_summary(rows, workdir, title, summary_notes)
    figures = json.loads((directory / "summary.json").read_text())["methods"]
  else:  # the same figures, computed from the same rows
    figures = json.loads(json.dumps(_finite(stats_by_method(rows, n_resamples=5000, level=0.95,
                                                            seed=0))))
  multihost.barrier("evaluate_summary_written")
  return {"title": title, "methods": figures, "summary_md": md, "summary_png": png,
          "records": rows}


def _run_batch(run: tuple[Method, RunContext], name: str, pending: list[Record], sample: int,
               chunk_index: int, eval_cfg: Any, batch_size: int) -> list[dict]:
  """Runs one fixed-size batch (padded with its last record to `batch_size`, then to
  a multiple of the mesh's batch shards) and scores it."""
  fn, ctx = run
  batch = list(pending) + [pending[-1]] * (eval_mesh.padded_rows(batch_size, ctx.mesh)
                                           - len(pending))
  seed = int(eval_cfg.seed) + 1000 * sample + chunk_index
  t0 = time.perf_counter()
  outs = fn(ctx, batch, seed)[:len(pending)]
  per_sample = (time.perf_counter() - t0) / len(pending)
  rows = []
  for rec, out in zip(pending, outs):
    graded = score(rec, out.text, eval_cfg.get("sandbox") or None)
    rows.append(json.loads(json.dumps(dict(
        method=name, task=str(eval_cfg.task), id=rec.id, sample_index=sample, seed=seed,
        batch=chunk_index, question=rec.question, gold=rec.gold,
        prediction=graded["prediction"], correct=bool(graded["correct"]),
        detail=graded.get("detail", ""), raw_output=out.text,
        output_tokens=out.output_tokens, answer_tokens=out.answer_tokens,
        answer_nll=out.answer_nll, mean_token_entropy=out.mean_token_entropy,
        trace_len_per_agent=out.trace_len_per_agent, agent_texts=out.agent_texts,
        seconds=per_sample), ensure_ascii=False, default=_to_json)))
  return rows


def _open_results(workdir, model, eval_cfg, agents_cfg, lora
                  ) -> tuple[ResultStore | None, dict]:
  """(the results store on process 0, else None; {sample key: row} done so far).

  Process 0 checks the settings guard and reads results.jsonl; the others get
  its rows (or its error) by broadcast, so the workdir need not be shared.
  """
  store, payload, error = None, {"rows": []}, None
  if multihost.is_main():
    try:
      paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
      _check_run_config(workdir, model, eval_cfg, agents_cfg, lora)
      store = ResultStore(str(paths.as_path(workdir) / "results.jsonl"))
      payload = {"rows": store.records}
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
      error, payload = e, {"error": f"{type(e).__name__}: {e}"}
  if jax.process_count() > 1:
    payload = json.loads(multihost.broadcast_bytes(json.dumps(payload, default=_to_json).encode()))
  if error is not None:
    raise error
  if "error" in payload:
    raise RuntimeError(f"process 0 could not open {workdir}: {payload['error']}")
  return store, {sample_key(r): r for r in payload["rows"]}


def _method_runs(model, method_names, eval_cfg, agents_cfg, lora, extra_methods, mesh=None
                 ) -> dict[str, tuple[Method, RunContext]]:
  """name -> (run function, its context); baselines never see the adapters."""
  if not method_names:
    raise ValueError("no methods to evaluate; set --config.eval.methods")
  base = RunContext.from_config(model, agents_cfg, eval_cfg).replace(mesh=mesh)
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
  path = paths.as_path(workdir) / "run_config.json"
  current = _fingerprint(model, eval_cfg, agents_cfg, lora)
  if path.exists():
    previous = json.loads(path.read_text())
    if previous != current:
      changed = _diff(previous, current)
      raise ValueError(f"{workdir} holds results made with other settings ({changed}); "
                       "resuming would mix them. Use a new --workdir, or delete "
                       f"{path} and results.jsonl to start over.")
    return
  paths.write_atomic(path, json.dumps(current, indent=1))


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
