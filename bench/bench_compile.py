"""First-call compile time and decode speed of the inference entry points, per weight layout.

  python -m bench.bench_compile                 # 3 runs, fresh processes, compile cache off
  python -m bench.bench_compile --compile_runs=1 --compile_paths=generate

Paths (embedded SmolLM2-135M-Instruct, f32, greedy, no early stop):
  generate: launch.generate's computation, prefill of one chat prompt + NEW tokens, batch 1;
  latent:   one latent_mas batch (3 agents, m = 10, solver prefill + NEW tokens), batch 4.
Layouts: `stacked` (the layer scan over stacked weights: XLA:CPU copies every
weight slice before its matmul) and `per_layer` (one scan, per-layer matrices
picked by `lax.switch`: the inference layout). Each (path, layout) runs in its own process, so nothing
is compiled before; within a run the layouts go one after the other, and the
ratios are taken within the run (the load moves between runs). `compile s` is
XLA's backend compile time plus tracing and lowering, as reported by
`jax.monitoring`; `cpu s` is the process CPU time of the first call (compile +
run: steadier than wall time on a loaded machine); `ms/token` is the best of 3
later calls divided by NEW (the short prefill included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from absl import app, flags

from bench.stats import fmt, ratios

flags.DEFINE_string("compile_worker", "", "Internal: PATH:LAYOUT.")
flags.DEFINE_integer("compile_runs", 3, "Fresh-process runs of every (path, layout).")
flags.DEFINE_list("compile_paths", ["generate", "latent"], "generate and/or latent.")
FLAGS = flags.FLAGS

LAYOUTS = {"generate": ("stacked", "per_layer"), "latent": ("stacked", "per_layer")}
NEW, REPEATS, LATENT_BATCH = 64, 3, 4
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _layout(weights, name: str):
  from diffmas_jax import model as model_lib
  return {"stacked": lambda w: w, "per_layer": model_lib.per_layer}[name](weights)


def _generate_call(m, weights):
  """launch.generate's computation (sampling.prefill_then_decode) on one chat prompt."""
  import jax
  import jax.numpy as jnp
  from diffmas_jax import sampling
  from diffmas_jax.kv_cache import KVCache
  prompt = m.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
  tokens, valid = sampling.left_pad([prompt], m.tokenizer.pad_id, 64)
  sc = sampling.SamplingConfig(max_new_tokens=NEW, stop_ids=())  # always NEW tokens
  fn = jax.jit(sampling.prefill_then_decode, static_argnames=("cfg", "sc"))

  def call():
    cache = KVCache.init(m.cfg, 1, tokens.shape[1] + NEW)
    return fn(weights, m.cfg, cache, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(0),
              sc=sc)
  return call


def _latent_call(m, weights):
  """latent_mas's computation (latent_mas.trace_then_decode) on LATENT_BATCH GSM8K questions."""
  import jax
  from diffmas_jax import agents, prompts, sampling, topology
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.methods import latent_mas
  from diffmas_jax.tasks import load_task
  roles = [prompts.AgentRole(r, latent_steps=10) for r in ("planner", "critic", "refiner")]
  batch = latent_mas.encode_pipeline(m.tokenizer, load_task("gsm8k", limit=LATENT_BATCH), roles)
  spec = topology.TraceSpec((10,) * len(roles))
  sc = sampling.SamplingConfig(max_new_tokens=NEW, stop_ids=())
  realigner = agents.make_realigner(weights)
  fn = jax.jit(latent_mas.trace_then_decode, static_argnames=("cfg", "sc", "spec"))
  jbatch = batch.as_jax()

  def call():
    cache = KVCache.init(m.cfg, LATENT_BATCH, latent_mas.pipeline_capacity(batch, spec, NEW))
    return fn(weights, m.cfg, cache, jbatch, realigner, jax.random.key(0), None, sc=sc, spec=spec)
  return call


def worker(path: str, layout: str) -> dict:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # every compile is a first one
  from jax import monitoring
  from diffmas_jax.loading import load_model
  seconds = defaultdict(float)
  monitoring.register_event_duration_secs_listener(
      lambda event, s, **kw: seconds.__setitem__(event, seconds[event] + s))
  m = load_model()
  weights = jax.block_until_ready(_layout(m.weights, layout))  # built once, like the launchers
  m.weights = None
  call = {"generate": _generate_call, "latent": _latent_call}[path](m, weights)
  t, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(call())
  first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
  compile_s = sum(seconds[e] for e in _COMPILE_EVENTS)
  times = []
  for _ in range(REPEATS):
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return {"first_s": first, "first_cpu_s": first_cpu, "compile_s": compile_s,
          "ms_per_token": 1000 * min(times) / NEW}


def run(paths, runs: int) -> dict:
  per_run = []
  for i in range(runs):
    res = {}
    for path in paths:
      for layout in LAYOUTS[path]:
        out = subprocess.run([sys.executable, "-m", "bench.bench_compile",
                              f"--compile_worker={path}:{layout}"],
                             check=True, capture_output=True, text=True)
        res[f"{path}:{layout}"] = json.loads(out.stdout.strip().splitlines()[-1])
    res["load"] = os.getloadavg()[0]
    per_run.append(res)
    print(f"compile run {i + 1}/{runs} done (load {res['load']:.1f}): {json.dumps(res)}",
          file=sys.stderr)
  for path in paths:
    col = lambda layout, key: [r[f"{path}:{layout}"][key] for r in per_run]
    print(f"\n## {path}: median [min, max] of {runs} fresh-process runs, compile cache off "
          f"(load {fmt([r['load'] for r in per_run])}); ratio = layout / stacked within each run")
    print("| layout | compile s | ratio | first call cpu s | ratio | ms/token | ratio |\n"
          "|---|---|---|---|---|---|---|")
    for layout in LAYOUTS[path]:
      cells = []
      for key in ("compile_s", "first_cpu_s", "ms_per_token"):
        cells += [fmt(col(layout, key), 1),
                  fmt(ratios(col(layout, key), col("stacked", key)), 2, "x")]
      print(f"| {layout} | " + " | ".join(cells) + " |")
  return {"runs": per_run}


def main(argv):
  del argv
  if FLAGS.compile_worker:
    path, layout = FLAGS.compile_worker.split(":")
    print(json.dumps(worker(path, layout)))
    return
  unknown = set(FLAGS.compile_paths) - set(LAYOUTS)
  if unknown:
    raise app.UsageError(f"--compile_paths: unknown {sorted(unknown)}; choose from {list(LAYOUTS)}")
  run(FLAGS.compile_paths, FLAGS.compile_runs)


if __name__ == "__main__":
  app.run(main)
