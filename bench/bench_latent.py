"""LatentMAS pipeline speed: ours vs a transformers (PyTorch) implementation, same weights.

  python -m launch.bench --suites=latent     # with the other suites (exports the model once)
  python -m bench.bench_latent               # alone (--latent_hf_dir=DIR: a converted model)

Times building the 3-agent latent trace (planner, critic, refiner; m = 10 each)
on a real GSM8K question plus prefilling the solver and decoding 128 tokens
(greedy, batch 1, f32, no early stop), each framework in its own process on the
same converted weights. Best of 3 after one warm-up run (ours: compilation is
reported separately). `run` repeats the comparison in fresh processes and prints
median [min, max] over runs, the speed-up taken within each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from bench.stats import fmt, peak_rss_mb, ratios

flags.DEFINE_string("latent_worker", "", "Internal: jax | torch.")
flags.DEFINE_string("latent_hf_dir", "", "HF directory of the model (default: export the "
                    "embedded SmolLM2-135M-Instruct to a temp dir).")
FLAGS = flags.FLAGS

ROLES, STEPS, NEW, REPEATS = ("planner", "critic", "refiner"), 10, 128, 3


def _inputs(tokenizer):
  """PipelineBatch [A, 1, T] for the first GSM8K test question (no bucket padding)."""
  from diffmas_jax import prompts
  from diffmas_jax.methods.latent_mas import encode_pipeline
  from diffmas_jax.tasks import load_task
  record = load_task("gsm8k", limit=1)[0]
  roles = [prompts.AgentRole(r, latent_steps=STEPS) for r in ROLES]
  return encode_pipeline(tokenizer, [record], roles, bucket=1)


def _best(fn) -> float:
  times = []
  for _ in range(REPEATS):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def jax_worker(hf_dir: str) -> dict:
  import jax
  from diffmas_jax import agents, sampling, topology
  from diffmas_jax import model as model_lib
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import load_model
  from diffmas_jax.methods.latent_mas import pipeline_capacity, trace_and_decode

  m = load_model(hf_dir)
  weights = model_lib.inference_layout(m.weights, 1)  # batch-1 inference layout, built once
  m.weights = None
  batch = _inputs(m.tokenizer)
  spec = topology.TraceSpec((STEPS,) * len(ROLES))
  sc = sampling.SamplingConfig(max_new_tokens=NEW, stop_ids=())  # always 128 tokens
  realigner = agents.make_realigner(weights)
  jbatch = batch.as_jax()
  capacity = pipeline_capacity(batch, spec, NEW)

  def run():
    cache = KVCache.init(m.cfg, 1, capacity)
    gen = trace_and_decode(weights, m.cfg, cache, jbatch, realigner, jax.random.key(0), None,
                           sc=sc, spec=spec)
    gen.tokens.block_until_ready()

  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  return {"first_call_s": first, "seconds": _best(run),
          "trace_slots": spec.length(batch.prompt_width), "peak_rss_mb": peak_rss_mb()}


def torch_worker(hf_dir: str) -> dict:
  """The straightforward loop: prefill with past_key_values, realigned inputs_embeds."""
  import torch
  import transformers
  from bench import torch_pipeline
  from diffmas_jax.tokenizer import Tokenizer
  batch = _inputs(Tokenizer.from_pretrained(hf_dir))
  agent_ids = [row[0][valid[0]].tolist() for row, valid in zip(batch.agent_tokens,
                                                               batch.agent_valid)]
  solver_ids = batch.solver_tokens[0][batch.solver_valid[0]].tolist()
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  w_a, target = torch_pipeline.realigner(model)

  @torch.inference_mode()
  def run():
    past = torch_pipeline.build_trace(model, agent_ids, STEPS, w_a, target)
    out = model(input_ids=torch.tensor([solver_ids]), past_key_values=past, use_cache=True)
    for _ in range(NEW):
      nxt = out.logits[:, -1].argmax(-1, keepdim=True)
      out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)

  run()
  return {"seconds": _best(run), "torch_threads": torch.get_num_threads(),
          "peak_rss_mb": peak_rss_mb()}


def run(hf_dir: str, runs: int = 3) -> dict:
  """Runs both workers (separate processes) `runs` times and prints the comparison table."""
  per_run = []
  for i in range(runs):
    res = {}
    for kind in ("jax", "torch"):
      out = subprocess.run([sys.executable, "-m", "bench.bench_latent",
                            f"--latent_worker={kind}", f"--latent_hf_dir={hf_dir}"],
                           check=True, capture_output=True, text=True)
      res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    res["load"] = os.getloadavg()[0]
    per_run.append(res)
    print(f"latent run {i + 1}/{runs} done (load {res['load']:.1f})", file=sys.stderr)
  col = lambda who, key: [r[who][key] for r in per_run]
  speedup = ratios(col("torch", "seconds"), col("jax", "seconds"))
  print(f"\n## latent: {len(ROLES)} agents x (prompt + m={STEPS} latent steps) + solver prefill "
        f"+ {NEW} greedy tokens, batch 1, f32 ({per_run[0]['jax']['trace_slots']} trace slots); "
        f"median [min, max] of {runs} runs (load {fmt([r['load'] for r in per_run])})")
  print("| | diffmas-jax | transformers | ratio (per run) |\n|---|---|---|---|")
  print(f"| seconds end to end (best of {REPEATS}) | {fmt(col('jax', 'seconds'), 2)} | "
        f"{fmt(col('torch', 'seconds'), 2)} | {fmt(speedup, 2, 'x')} faster |")
  print(f"| peak RSS MB (own process) | {fmt(col('jax', 'peak_rss_mb'), 0)} | "
        f"{fmt(col('torch', 'peak_rss_mb'), 0)} | "
        f"{fmt(ratios(col('jax', 'peak_rss_mb'), col('torch', 'peak_rss_mb')), 2, 'x')} |")
  print(f"diffmas-jax first call (compile + run): {fmt(col('jax', 'first_call_s'))}s; "
        f"torch threads: {per_run[0]['torch']['torch_threads']}")
  return {"runs": per_run, "speedup": speedup}


def main(argv):
  del argv
  if FLAGS.latent_worker:
    fn = {"jax": jax_worker, "torch": torch_worker}[FLAGS.latent_worker]
    print(json.dumps(fn(FLAGS.latent_hf_dir)))
    return
  from bench import model_dir
  with model_dir(FLAGS.latent_hf_dir) as hf_dir:
    run(hf_dir)


if __name__ == "__main__":
  app.run(main)
