"""The relay experiment: can gradients through the trace teach agents to communicate?

`run_relay(cfg, model, workdir)` (called by `python -m launch.relay`) evaluates,
on the same held-out items, in this order:

  single            the Solver alone, no fact (the floor)
  single+fact       the fact in the Solver's own prompt (an oracle reference)
  text_mas          the Reader writes text, the Solver reads it (the text channel)
  latent_mas m=M    the untrained latent channel (trace_keep=latent_only)
  diffmas MODE m=M  LoRA trained through the trace in MODE (final_only/shared/per_agent)

Each condition's per-item rows go to results.jsonl as soon as it finishes; a
rerun skips finished conditions. summary.md / summary.json / relay.png and
train_log.jsonl (loss per update of every trained condition) are rewritten
after each condition.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any

import jax
import numpy as np

from diffmas_jax import agents, data, lora as lora_lib, multihost, paths, sampling, topology
from diffmas_jax import train as train_lib
from diffmas_jax.eval.stats import bootstrap_ci
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.loading import LoadedModel
from diffmas_jax.methods.latent_mas import trace_capacity
from diffmas_jax.research import relay


def conditions(rc: Any) -> list[tuple[str, dict]]:
  """(name, settings) in run order: cheap references first, then training."""
  m0 = int(rc.latent_steps)
  trained = lambda mode, m: (f"diffmas {mode} m={m}", dict(kind="trained", m=m, mode=mode))
  out = [("single", dict(kind="alone")), ("single+fact", dict(kind="alone", with_fact=True)),
         (f"latent_mas m={m0}", dict(kind="latent", m=m0)), trained(rc.sweep_mode, m0),
         ("text_mas", dict(kind="text"))]
  out += [trained(mode, m0) for mode in rc.modes if mode != rc.sweep_mode]
  others = [int(m) for m in rc.m_grid if int(m) != m0]
  out += [(f"latent_mas m={m}", dict(kind="latent", m=m)) for m in others]
  out += [trained(rc.sweep_mode, m) for m in others]
  only = tuple(rc.get("only", ()) or ())
  unknown = set(only) - {name for name, _ in out}
  if unknown:
    raise ValueError(f"relay.only names unknown conditions {sorted(unknown)}; the grid has "
                     f"{[name for name, _ in out]}")
  return [c for c in out if not only or c[0] in only]


def _spec(m: int) -> topology.TraceSpec:
  return topology.TraceSpec(steps=(m,), trace_keep="latent_only")


def _batches(n: int, size: int):
  """Index blocks of exactly `size` (the last wraps around; callers keep the first n)."""
  for i in range(0, n, size):
    yield np.arange(i, i + size) % n


class Relay:
  """Holds the model, the split and the compiled functions of one experiment."""

  def __init__(self, cfg: Any, model: LoadedModel, log=print):
    self.cfg, self.rc, self.model, self.log = cfg, cfg.relay, model, log
    tok = model.tokenizer
    width = int(self.rc.max_prompt_tokens)
    fits = lambda r: relay.prompt_tokens(tok, r) <= width
    self.split = relay.relay_items(self.rc.num_train, self.rc.num_heldout, self.rc.task,
                                   self.rc.split, self.rc.seed, keep=fits)
    self.letters = relay.LetterSpec.from_tokenizer(tok)
    self.realigner = agents.make_realigner(model.weights)
    self.heldout = relay.encode(tok, self.split.heldout)
    self.train = relay.encode(tok, self.split.train)
    self._fns: dict = {}

  # ----- evaluation -----

  def _score_fn(self, kind: str, m: int = 0, mode: str = "shared"):
    key = (kind, m, mode)
    if key not in self._fns:
      cfg, letters = self.model.cfg, self.letters
      if kind == "alone":
        fn = lambda params, w, cache, b, r: relay.letter_scores(
            relay.solver_alone_logits(w, cfg, cache, b, params), b, letters)
      else:
        spec = _spec(m)
        fn = lambda params, w, cache, b, r: relay.letter_scores(
            relay.pipeline_logits(params, w, cfg, cache, b, r, spec, mode), b, letters)
      self._fns[key] = jax.jit(fn)
    return self._fns[key]

  def score(self, batch, kind: str, m: int = 0, mode: str = "shared", params=None) -> dict:
    """Per-item prediction, gold and NLL over the held-out batch, in eval batches."""
    n, size = batch.solver_tokens.shape[0], int(self.rc.eval_batch)
    fn = self._score_fn(kind, m, mode)
    u = batch.target_tokens.shape[1]
    cap = (batch.solver_tokens.shape[1] + u if kind == "alone"
           else trace_capacity(batch, _spec(m)))
    preds, golds, nlls = [], [], []
    for idx in _batches(n, size):
      b = _take(batch, idx)
      cache = KVCache.init(self.model.cfg, size, cap)
      p, g, nll = jax.device_get(fn(params, self.model.weights, cache, b.as_jax(),
                                    self.realigner))
      preds.append(p), golds.append(g), nlls.append(nll)
    cat = lambda xs: np.concatenate(xs)[:n]
    return dict(pred=cat(preds), gold=cat(golds), nll=cat(nlls))

  def reader_notes(self) -> list[str]:
    """text_mas: the Reader's greedy text for every held-out item (prompt incl. the key)."""
    tok, n, size = self.model.tokenizer, self.heldout.solver_tokens.shape[0], int(self.rc.eval_batch)
    sc = sampling.SamplingConfig(max_new_tokens=int(self.rc.agent_max_new_tokens),
                                 stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id)
    notes = []
    for idx in _batches(n, size):
      toks, val = self.heldout.agent_tokens[0][idx], self.heldout.agent_valid[0][idx]
      gen = sampling.prefill_and_decode(self.model.weights, self.model.cfg, toks, val,
                                        jax.random.key(0), sc, toks.shape[1] + sc.max_new_tokens)
      ids, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
      for row, k in zip(ids, lengths):
        row = [t for t in row[:k].tolist() if t not in sc.stop_ids]
        notes.append(tok.decode(row))
    return notes[:n]

  # ----- training -----

  def train_adapters(self, mode: str, m: int) -> tuple[Any, list[float], float]:
    """Trains `mode` adapters for `train.steps` updates; returns (params, losses, seconds)."""
    tc = self.cfg.train
    spec = _spec(m)
    lora_cfg = lora_lib.LoraConfig.from_config(self.cfg.lora)
    optimizer, schedule = train_lib.make_optimizer(tc, int(tc.steps))
    params = train_lib.init_params(self.model.cfg, lora_cfg, mode, 1, jax.random.key(tc.seed))
    state = train_lib.init_state(params, optimizer, tc.seed)
    step = train_lib.make_train_step(optimizer, schedule,
                                     train_lib.StepConfig(self.model.cfg, spec, mode, remat=False))
    cap = trace_capacity(self.train, spec)
    losses, t0 = [], time.perf_counter()
    n = self.train.solver_tokens.shape[0]
    for i in range(int(tc.steps)):
      idx = data.micro_batch_indices(n, int(tc.batch_size), i, int(tc.seed))
      cache = KVCache.init(self.model.cfg, int(tc.batch_size), cap)
      state, metrics = step(state, self.model.weights, cache, _take(self.train, idx).as_jax(),
                            self.realigner)
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"relay {mode} m={m}: non-finite loss at update {i}; "
                                 "lower --config.train.lr")
      losses.append(loss)
      if i % 10 == 0 or i == int(tc.steps) - 1:
        self.log(f"  {mode} m={m} update {i + 1}/{tc.steps}: loss {loss:.3f} "
                 f"({time.perf_counter() - t0:.0f} s)")
    return state.params, losses, time.perf_counter() - t0

  # ----- one condition -----

  def run_condition(self, name: str, s: dict) -> tuple[dict, dict | None]:
    t0 = time.perf_counter()
    train_log = None
    if s["kind"] == "alone":
      batch = self.heldout
      if s.get("with_fact"):
        batch = relay.encode(self.model.tokenizer, self.split.heldout, with_fact=True)
      out = self.score(batch, "alone")
    elif s["kind"] == "text":
      notes = self.reader_notes()
      batch = relay.encode(self.model.tokenizer, self.split.heldout, note_texts=notes)
      out = self.score(batch, "alone")
      out["note"] = notes
    elif s["kind"] == "latent":
      out = self.score(self.heldout, "latent", s["m"])
    else:
      params, losses, secs = self.train_adapters(s["mode"], s["m"])
      train_log = dict(condition=name, losses=losses, seconds=secs)
      out = self.score(self.heldout, "latent", s["m"], s["mode"], params)
    out["seconds"] = time.perf_counter() - t0
    return out, train_log


def _take(batch, idx):
  return jax.tree.map(lambda x: x[:, idx] if x.ndim == 3 else x[idx], batch)


def summarize(rows: list[dict], order: list[str]) -> dict[str, dict]:
  by = {}
  for name in order:
    rs = [r for r in rows if r["condition"] == name]
    if not rs:
      continue
    correct = np.array([r["correct"] for r in rs], np.float64)
    nll = np.array([r["nll"] for r in rs], np.float64)
    lo, hi = bootstrap_ci(correct)
    nlo, nhi = bootstrap_ci(nll)
    by[name] = dict(n=len(rs), accuracy=float(correct.mean()), ci_low=lo, ci_high=hi,
                    nll=float(nll.mean()), nll_ci_low=nlo, nll_ci_high=nhi,
                    seconds=float(rs[0].get("condition_seconds", 0.0)))
  return by


def write_report(workdir: str, stats: dict[str, dict], train_logs: list[dict], header: str
                 ) -> None:
  lines = [f"# Relay experiment", "", header, "",
           "| condition | n | accuracy % | 95% CI | answer NLL (nats) | 95% CI | seconds |",
           "|---|---|---|---|---|---|---|"]
  for name, s in stats.items():
    lines.append(f"| {name} | {s['n']} | {100 * s['accuracy']:.1f} | "
                 f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}] | {s['nll']:.3f} | "
                 f"[{s['nll_ci_low']:.3f}, {s['nll_ci_high']:.3f}] | {s['seconds']:.0f} |")
  paths.write_atomic(f"{workdir}/summary.md", "\n".join(lines) + "\n")
  paths.write_atomic(f"{workdir}/summary.json", json.dumps(stats, indent=1))
  plot(stats, train_logs, f"{workdir}/relay.png")


def plot(stats: dict[str, dict], train_logs: list[dict], png: str) -> str:
  from matplotlib.figure import Figure

  names = list(stats)
  fig = Figure(figsize=(13, 4.2), dpi=100)
  ax_acc, ax_nll, ax_loss = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[3, 3, 2]))
  colors = ["#888888" if n.startswith("single") else "#dd8452" if n == "text_mas"
            else "#4c72b0" if n.startswith("latent") else "#55a868" for n in names]
  x = np.arange(len(names))
  for ax, key, lo, hi, label in ((ax_acc, "accuracy", "ci_low", "ci_high", "accuracy %"),
                                 (ax_nll, "nll", "nll_ci_low", "nll_ci_high",
                                  "gold-letter NLL (nats)")):
    scale = 100 if key == "accuracy" else 1
    v = np.array([scale * stats[n][key] for n in names])
    err = [np.maximum(0, v - [scale * stats[n][lo] for n in names]),
           np.maximum(0, np.array([scale * stats[n][hi] for n in names]) - v)]
    ax.bar(x, v, yerr=err, capsize=3, color=colors)
    ax.set_xticks(x, names, rotation=55, ha="right", fontsize=7)
    ax.set_ylabel(label + " (95% CI)")
    ax.grid(axis="y", alpha=0.3)
  ax_acc.axhline(25, color="k", lw=0.6, ls=":")
  ax_acc.set_title("held-out relay items", fontsize=9)
  for t in train_logs:
    ax_loss.plot(np.arange(1, len(t["losses"]) + 1), t["losses"], lw=1, label=t["condition"])
  ax_loss.set_xlabel("update")
  ax_loss.set_ylabel("train loss (per update)")
  ax_loss.set_title("training", fontsize=9)
  if train_logs:
    ax_loss.legend(fontsize=6)
  fig.tight_layout()
  return paths.write_png(png, fig)


def run_relay(cfg: Any, model: LoadedModel, workdir: str, log=print) -> dict[str, dict]:
  """Runs (or resumes) every condition; returns the summary per condition."""
  exp = Relay(cfg, model, log)
  results, logs_path = f"{workdir}/results.jsonl", f"{workdir}/train_log.jsonl"
  rows, train_logs = paths.read_jsonl(results), paths.read_jsonl(logs_path)
  write = multihost.is_main()  # every process computes (collectives); process 0 writes
  if write:
    paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  order = [name for name, _ in conditions(cfg.relay)]
  header = (f"{cfg.relay.task}/{cfg.relay.split}: {len(exp.split.train)} training items, "
            f"{len(exp.split.heldout)} held-out items (seed {cfg.relay.seed}); trace_keep="
            f"latent_only, 1 Reader + Solver; {cfg.train.steps} updates x batch "
            f"{cfg.train.batch_size}, lr {cfg.train.lr}, LoRA r {cfg.lora.rank}. "
            "Accuracy: argmax over the 4 option letters at the letter position of "
            "`\\boxed{X}` (teacher forced); NLL: -log p(gold letter).")
  log(header)
  for name, s in conditions(cfg.relay):
    if any(r["condition"] == name for r in rows):
      continue
    log(f"{name} ...")
    out, tlog = exp.run_condition(name, s)
    new = [dict(condition=name, id=r.id, gold=r.gold, pred=relay.LETTERS[int(out["pred"][i])],
                correct=bool(out["pred"][i] == out["gold"][i]), nll=float(out["nll"][i]),
                condition_seconds=out["seconds"],
                **({"note": out["note"][i]} if "note" in out else {}))
           for i, r in enumerate(exp.split.heldout)]
    if write:
      paths.append_text(results, "".join(json.dumps(r) + "\n" for r in new))
    rows += new
    if tlog:
      train_logs.append(tlog)
      if write:
        paths.append_text(logs_path, json.dumps(tlog) + "\n")
    stats = summarize(rows, order)
    s_ = stats[name]
    log(f"{name}: accuracy {100 * s_['accuracy']:.1f}% [{100 * s_['ci_low']:.1f}, "
        f"{100 * s_['ci_high']:.1f}], NLL {s_['nll']:.3f} ({out['seconds']:.0f} s)")
    if write:
      write_report(workdir, stats, train_logs, header)
  stats = summarize(rows, order)
  if write:
    write_report(workdir, stats, train_logs, header)
  return stats
