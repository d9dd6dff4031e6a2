"""The depth sweep of the gradient probes: Proposition 3.1 measured.

For K = 2..8 agents (`probe.depths`) (K - 1 upstream roles cycling planner, critic,
refiner, then the solver) and each trace_keep mode ("all": the appended trace,
Eq. 6; "own_segment": each agent sees only the previous agent's segment, the
overwriting carrier of Eq. 5), `sweep` computes per-block gradient norms, per
agent adapter gradient norms and JVP sensitivities on one batch of real items,
and writes one JSONL row per (mode, K, agent), summary rows with per-hop decay
ratios, and a log-scale plot.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import numpy as np

from diffmas_jax import agents, data, lora as lora_lib, multihost, paths, prompts, topology
from diffmas_jax import train as train_lib
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import trace_capacity
from diffmas_jax.research import probes

ROLE_CYCLE = ("planner", "critic", "refiner")


def roles_for(num_upstream: int, m: int) -> list[prompts.AgentRole]:
  return [prompts.AgentRole(ROLE_CYCLE[j % len(ROLE_CYCLE)], latent_steps=m)
          for j in range(num_upstream)]


def encode_depth(tokenizer, examples, num_upstream: int, m: int, pc: Any):
  """The first `pc.batch_size` examples whose prompts fit, for K - 1 upstream roles."""
  enc = data.encode_examples(tokenizer, examples, roles_for(num_upstream, m),
                             max_prompt_tokens=pc.max_prompt_tokens,
                             max_target_tokens=pc.max_target_tokens)
  if len(enc) < pc.batch_size:
    raise ValueError(f"only {len(enc)} probe examples fit max_prompt_tokens="
                     f"{pc.max_prompt_tokens}; raise it or probe.num_examples")
  return enc.take(np.arange(pc.batch_size))


def probe_one(weights, cfg, realigner, batch, spec, params, grad_mode: str, jvp: bool,
              key) -> dict:
  """Gradient norms (+ JVP sensitivities) of one configuration, as numpy."""
  cache = KVCache.init(cfg, batch.solver_tokens.shape[0], trace_capacity(batch, spec))
  fn = jax.jit(lambda p, w, c, b, r: {k: v for k, v in probes.block_gradients(
      p, w, cfg, c, b, r, spec, grad_mode).items() if k != "grads"})
  out = jax.device_get(fn(params, weights, cache, batch, realigner))
  if jvp:
    sens = jax.jit(lambda p, w, c, b, r: probes.block_sensitivity(
        p, w, cfg, c, b, r, spec, grad_mode, key))
    out.update(jax.device_get(sens(params, weights, cache, batch, realigner)))
  return {k: np.asarray(v) for k, v in out.items()}


def sweep(weights, cfg, tokenizer, examples, pc: Any, lora_cfg: lora_lib.LoraConfig,
          out_dir: str, label: str, log: Callable = print) -> list[dict]:
  """Runs the depth x mode grid; appends rows to <out_dir>/probes.jsonl; returns them."""
  write = multihost.is_main()  # every process computes (collectives); process 0 writes
  if write:
    paths.as_path(out_dir).mkdir(parents=True, exist_ok=True)
  path = f"{out_dir}/probes.jsonl"
  realigner = agents.make_realigner(weights)
  rows = []
  for k in (int(d) for d in pc.depths):
    a = k - 1
    batch = encode_depth(tokenizer, examples, a, int(pc.latent_steps), pc).as_jax()
    params = train_lib.init_params(cfg, lora_cfg, pc.grad_mode, a, jax.random.key(pc.seed))
    for keep in pc.modes:
      spec = topology.TraceSpec(steps=(int(pc.latent_steps),) * a, trace_keep=keep)
      t0 = time.perf_counter()
      jvp = k in tuple(pc.jvp_agents)
      out = probe_one(weights, cfg, realigner, batch, spec, params, pc.grad_mode, jvp,
                      jax.random.key(pc.seed + 1))
      secs = time.perf_counter() - t0
      for j in range(a):
        row = dict(model=label, trace_keep=keep, agents=k, agent=j, role=ROLE_CYCLE[j % 3],
                   distance=a - j, loss=float(out["loss"]), kv_norm=float(
                       np.sqrt(np.sum(out["kv_norm"][j] ** 2))),
                   kv_norm_per_layer=out["kv_norm"][j].tolist(), k_norm=float(out["k_norm"][j]),
                   v_norm=float(out["v_norm"][j]), embed_norm=float(out["embed_norm"][j]),
                   adapter_norm=float(out["adapter_norm"][j]),
                   solver_adapter_norm=float(out["solver_adapter_norm"]))
        if jvp:
          row.update(kv_jvp=float(out["kv_jvp"][j]), embed_jvp=float(out["embed_jvp"][j]))
        rows.append(row)
      summary = dict(model=label, trace_keep=keep, agents=k, summary=True, seconds=secs)
      for key in ("kv_norm", "embed_norm", "adapter_norm", "kv_jvp", "embed_jvp"):
        vals = [r[key] for r in rows[-a:] if key in r]
        if len(vals) == a:
          summary[f"decay_{key}"] = probes.decay_ratio(vals)
      rows.append(summary)
      norms = " ".join(f"{r['kv_norm']:.2e}" for r in rows[-a - 1:-1])
      log(f"{label} {keep} K={k}: kv norms (first..last agent) {norms}, per-hop ratio "
          f"{summary.get('decay_kv_norm', float('nan')):.3f} ({secs:.0f} s)")
      if write:
        paths.append_text(path, "".join(json.dumps(r) + "\n" for r in rows[-a - 1:]))
  return rows


def plot(rows: list[dict], png: str, title: str) -> str:
  """Log-scale gradient norms vs depth, one line per (model, trace_keep)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(14, 3.8), dpi=100)
  axes = fig.subplots(1, 4)
  per_agent = [r for r in rows if not r.get("summary")]
  groups = sorted({(r["model"], r["trace_keep"]) for r in per_agent})
  styles = {"all": "-", "own_segment": "--", "latent_only": ":"}
  kmax = max(r["agents"] for r in per_agent)
  for model, keep in groups:
    rs = [r for r in per_agent if r["model"] == model and r["trace_keep"] == keep]
    first = sorted((r for r in rs if r["agent"] == 0), key=lambda r: r["agents"])
    axes[0].plot([r["agents"] for r in first], [r["kv_norm"] for r in first], styles[keep],
                 marker="o", label=f"{model} {keep}")
    last = sorted((r for r in rs if r["agents"] == kmax), key=lambda r: r["distance"])
    for ax, key in zip(axes[1:], ("kv_norm", "adapter_norm", "kv_jvp")):
      pts = [(r["distance"], r[key]) for r in last if key in r and r[key] > 0]
      if pts:
        ax.plot(*zip(*pts), styles[keep], marker="o", label=f"{model} {keep}")
  axes[0].set_xlabel("agents K")
  axes[0].set_title("first agent's K/V gradient norm", fontsize=9)
  for ax, name in zip(axes[1:], ("K/V gradient norm", "adapter gradient norm",
                                 "JVP: |d logits| per unit K/V")):
    ax.set_xlabel(f"agent's distance from the solver (K = {kmax})")
    ax.set_title(name, fontsize=9)
  for ax in axes:
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return paths.write_png(png, fig)


def decay_table(rows: list[dict]) -> str:
  """Markdown: per (model, mode, K) the first and last agents' K/V gradient norms and
  the per-hop decay ratios (1 = no decay with depth)."""
  lines = ["| model | trace_keep | K | K/V grad, first agent | K/V grad, last agent | "
           "per-hop ratio K/V | embeds | adapter | JVP K/V |", "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "–" if x is None or x != x else f"{x:.3f}"
  for s in (r for r in rows if r.get("summary")):
    rs = [r for r in rows if not r.get("summary") and r["model"] == s["model"]
          and r["trace_keep"] == s["trace_keep"] and r["agents"] == s["agents"]]
    lines.append(f"| {s['model']} | {s['trace_keep']} | {s['agents']} | {rs[0]['kv_norm']:.3e} | "
                 f"{rs[-1]['kv_norm']:.3e} | {fmt(s.get('decay_kv_norm'))} | "
                 f"{fmt(s.get('decay_embed_norm'))} | {fmt(s.get('decay_adapter_norm'))} | "
                 f"{fmt(s.get('decay_kv_jvp'))} |")
  return "\n".join(lines)
