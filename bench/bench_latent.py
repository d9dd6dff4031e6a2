"""LatentMAS pipeline speed: ours vs a transformers (PyTorch) implementation, same weights.

  python -m launch.bench --suites=latent     # with the other suites (exports the model once)
  python -m bench.bench_latent               # alone (--latent_hf_dir=DIR: a converted model)

Times building the 3-agent latent trace (planner, critic, refiner; m = 10 each)
on a real GSM8K question plus prefilling the solver and decoding 128 tokens
(greedy, batch 1, f32, no early stop), each framework in its own process on the
same converted weights. Best of 3 after one warm-up run (ours: compilation is
reported separately).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from absl import app, flags

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
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import load_model
  from diffmas_jax.methods.latent_mas import pipeline_capacity, trace_and_decode

  m = load_model(hf_dir)
  batch = _inputs(m.tokenizer)
  spec = topology.TraceSpec((STEPS,) * len(ROLES))
  sc = sampling.SamplingConfig(max_new_tokens=NEW, stop_ids=())  # always 128 tokens
  realigner = agents.make_realigner(m.weights)
  jbatch = batch.as_jax()
  capacity = pipeline_capacity(batch, spec, NEW)

  def run():
    cache = KVCache.init(m.cfg, 1, capacity)
    gen = trace_and_decode(m.weights, m.cfg, cache, jbatch, realigner, jax.random.key(0), None,
                           sc=sc, spec=spec)
    gen.tokens.block_until_ready()

  t = time.perf_counter()
  run()
  return {"first_call_s": time.perf_counter() - t, "seconds": _best(run),
          "trace_slots": spec.length(batch.prompt_width)}


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
  return {"seconds": _best(run), "torch_threads": torch.get_num_threads()}


def run(hf_dir: str) -> dict:
  """Runs both workers (separate processes) and prints the comparison table."""
  res = {}
  for kind in ("jax", "torch"):
    out = subprocess.run([sys.executable, "-m", "bench.bench_latent", f"--latent_worker={kind}",
                          f"--latent_hf_dir={hf_dir}"], check=True, capture_output=True, text=True)
    res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
  ratio = res["torch"]["seconds"] / res["jax"]["seconds"]
  print(f"\n## latent: {len(ROLES)} agents x (prompt + m={STEPS} latent steps) + solver prefill "
        f"+ {NEW} greedy tokens, batch 1, f32 ({res['jax']['trace_slots']} trace slots)")
  print("| | diffmas-jax | transformers | speed-up |\n|---|---|---|---|")
  print(f"| seconds end to end (best of {REPEATS}) | {res['jax']['seconds']:.2f} | "
        f"{res['torch']['seconds']:.2f} | {ratio:.2f}x |")
  print(f"diffmas-jax first call (compile + run): {res['jax']['first_call_s']:.1f}s; "
        f"torch threads: {res['torch']['torch_threads']}")
  return {**res, "speedup": ratio}


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
