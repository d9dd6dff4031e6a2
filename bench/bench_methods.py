"""Train-step time of each trained method relative to the DiffMAS step, in one run.

  python -m launch.bench --suites=methods
  python -m bench.bench_methods            # alone (--methods_steps / --methods_target / ...)

Every method trains on the same real MATH train problem, embedded SmolLM2-135M
(f32, the CPU quickstarts' settings: no remat), batch 1, AdamW: DiffMAS in its
three gradient modes, StitchMAS (shared adapters through the stitched,
hierarchical trace), TextMAS+SFT (the solver's adapter on its prompt holding
three fixed upstream notes of `--methods_note_tokens` tokens each) and C2C (the
fuser only; the trace, sharer and receiver caches are frozen forward passes).
All steps are compiled first; then the methods are timed round robin,
`--methods_repeats` rounds, so a drift of the shared host's speed hits every
method alike. Reported: min / median / max seconds per step, and min relative to
DiffMAS `shared`.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer("methods_steps", 4, "Latent steps m per upstream agent.")
flags.DEFINE_integer("methods_target", 192, "Teacher-forced target tokens.")
flags.DEFINE_integer("methods_note_tokens", 64, "TextMAS+SFT: tokens per upstream note.")
flags.DEFINE_integer("methods_repeats", 3, "Timed rounds (after one warm-up round).")
flags.DEFINE_string("methods_out", "", "Optional JSON output path.")
FLAGS = flags.FLAGS

ROLES = ("planner", "critic", "refiner")
# (label, method, grad mode, topology)
METHODS = (("DiffMAS shared", "diffmas", "shared", "sequential"),
           ("DiffMAS final_only", "diffmas", "final_only", "sequential"),
           ("DiffMAS per_agent", "diffmas", "per_agent", "sequential"),
           ("StitchMAS (shared)", "diffmas", "shared", "hierarchical"),
           ("TextMAS+SFT", "textmas_sft", "final_only", "sequential"),
           ("C2C fuser", "c2c", "shared", "sequential"))


def _encoded(tokenizer, example, notes=None):
  from diffmas_jax import data, prompts
  roles = [prompts.AgentRole(r, latent_steps=FLAGS.methods_steps) for r in ROLES]
  kw = dict(max_target_tokens=FLAGS.methods_target, solver_previous=notes)
  probe = data.encode_examples(tokenizer, [example], roles, max_prompt_tokens=4096, **kw)
  width = int(max(probe.agent_valid.sum(-1).max(), probe.solver_valid.sum()))
  return data.encode_examples(tokenizer, [example], roles, max_prompt_tokens=width, **kw)


def _steps(m):
  """label -> (jitted step, state, make_cache, batch)."""
  import dataclasses

  import jax
  import ml_collections as mlc
  from diffmas_jax import ablations, c2c, lora as lora_lib, topology, train
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.tasks.training_data import math_train

  example = math_train(1, seed=0)[0]
  words = (example.target + " ") * 8
  note_ids = m.tokenizer.encode(words)[:FLAGS.methods_note_tokens]
  notes = [[(r, m.tokenizer.decode(note_ids)) for r in ROLES]]
  tc = mlc.ConfigDict(dict(lr=5e-5, warmup_ratio=0.0, final_lr_ratio=0.0, max_grad_norm=1.0,
                           b1=0.9, b2=0.999, weight_decay=0.0, grad_accum=1))
  opt, sched = train.make_optimizer(tc, 10)
  lora_cfg = lora_lib.LoraConfig(rank=8, alpha=16.0)
  fc = c2c.FuserConfig(anneal_steps=10)
  out = {}
  for label, method, mode, topo in METHODS:
    enc = _encoded(m.tokenizer, example, notes if method == "textmas_sft" else None)
    batch = enc.take([0])
    spec = topology.TraceSpec((FLAGS.methods_steps,) * len(ROLES), topology=topo)
    params = ablations.init_params(method, m.cfg, lora_cfg, mode, len(ROLES), jax.random.key(0),
                                   fc)
    sc = train.StepConfig(m.cfg, spec, mode, remat=False)
    if method != "diffmas":
      sc = dataclasses.replace(sc, objective=ablations.objective(method, sc, fc))
    capacity = ablations.capacity(method, batch, spec)
    out[label] = (train.make_train_step(opt, sched, sc), train.init_state(params, opt, 0),
                  lambda capacity=capacity: KVCache.init(m.cfg, 1, capacity), batch.as_jax(),
                  lora_lib.num_params(params))
  return out


def run(hf_dir: str = "", runs: int = 1) -> dict:
  import jax
  import numpy as np
  from diffmas_jax import agents
  from diffmas_jax.loading import EMBEDDED
  from launch import cli

  m = cli.load_reported(hf_dir or EMBEDDED)
  realigner = agents.make_realigner(m.weights)
  steps = _steps(m)
  states, times, first = {}, {k: [] for k in steps}, {}
  for label, (fn, state, make_cache, batch, _) in steps.items():
    t = time.perf_counter()
    state, metrics = fn(state, m.weights, make_cache(), batch, realigner)
    jax.block_until_ready(metrics)
    first[label], states[label] = time.perf_counter() - t, state
  for _ in range(FLAGS.methods_repeats):
    for label, (fn, _, make_cache, batch, _) in steps.items():
      t = time.perf_counter()
      states[label], metrics = fn(states[label], m.weights, make_cache(), batch, realigner)
      jax.block_until_ready(metrics)
      times[label].append(time.perf_counter() - t)
  ref = min(times[METHODS[0][0]])
  load = os.getloadavg()
  print(f"\n## train step per method: {len(ROLES)} upstream agents, m = {FLAGS.methods_steps}, "
        f"{FLAGS.methods_target} target tokens, f32, batch 1, no remat; round robin, "
        f"{FLAGS.methods_repeats} rounds; load average {load[0]:.1f}")
  print("| method | trained parameters | s/step min / median / max | vs DiffMAS shared (min) | "
        "first call s |\n|---|---|---|---|---|")
  rows = {}
  for label, ts in times.items():
    rows[label] = dict(min=min(ts), median=float(np.median(ts)), max=max(ts),
                       relative=min(ts) / ref, first_call_s=first[label],
                       params=steps[label][4])
    r = rows[label]
    print(f"| {label} | {r['params']:,} | {r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f} | "
          f"{r['relative']:.2f}x | {r['first_call_s']:.1f} |")
  result = {"rows": rows, "load_average": load, "steps": FLAGS.methods_steps,
            "target": FLAGS.methods_target}
  if FLAGS.methods_out:
    with open(FLAGS.methods_out, "w") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv):
  del argv
  run()


if __name__ == "__main__":
  app.run(main)
