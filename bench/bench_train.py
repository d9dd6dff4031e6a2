"""DiffMAS train-step speed and memory: ours vs transformers + peft (PyTorch), same weights.

  python -m launch.bench --suites=train      # with the other suites (exports the model once)
  python -m bench.bench_train                # alone (--train_hf_dir=DIR: a converted model)

One step = `shared` gradient mode, 4 agents (planner, critic, refiner with m = 10
latent steps each, then the solver), a real MATH train problem, 512 teacher-forced
target tokens, LoRA r 8 / alpha 16 on q,k,v,o,gate,up,down, AdamW update, batch 1,
f32. Each framework runs in its own process (peak RSS is per process); best of 3
after a warm-up. Ours runs under several remat settings (VARIANTS: per-layer
policy `model.remat`, per-stage `train.remat_stages`), from least memory to fastest. Throughput counts every position the step
runs forward (agent prompts + latent steps + solver prompt + targets).

Model FLOPs are what the step must compute, rematerialisation not counted: 4 x
non-embedding parameters per position (forward, and the backward's input
gradients: the frozen base needs no weight gradients), attention (12 L H Dh per
query-key pair, about half the trace per query) and the LM head on the targets
(4 D V each); as a fraction of this machine's measured f32 matmul peak. The 6 N
convention of full fine-tuning is printed too, for comparison with MFU figures.
Memory vs agents: XLA's compiled memory analysis of our step (arguments +
temporaries) with 1, 2, 4 and 8 upstream agents before the solver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from bench.stats import between_probes, fmt, peak_rss_mb, ratios

flags.DEFINE_string("train_worker", "", "Internal: jax | torch | memory.")
flags.DEFINE_string("train_remat", "full", "Internal: per-layer remat policy of the jax "
                    "worker (model.REMAT).")
flags.DEFINE_bool("train_stage_remat", False, "Internal: per-stage remat of the jax and "
                  "memory workers.")
flags.DEFINE_string("train_variants", "", "Comma list of our variants to run, as "
                    "remat/stage_remat (e.g. 'none/False,attn/False'); default: all VARIANTS.")
flags.DEFINE_bool("train_memory", True, "Also measure compiled memory with 1..8 agents.")
flags.DEFINE_string("train_hf_dir", "", "HF directory of the model (default: export the "
                    "embedded SmolLM2-135M-Instruct to a temp dir).")
FLAGS = flags.FLAGS

ROLES, STEPS, TARGET, RANK, ALPHA, REPEATS = ("planner", "critic", "refiner"), 10, 512, 8, 16.0, 3
MEMORY_AGENTS = (1, 2, 4, 8)


def _example():
  """The first MATH train problem; its target text repeated to >= 512 tokens."""
  from diffmas_jax.tasks.training_data import TrainExample, math_train
  ex = math_train(1, seed=0)[0]
  return TrainExample(question=ex.question, target=(ex.target + "\n") * 12, family="math",
                      id=ex.id)


def _encoded(tokenizer, roles):
  from diffmas_jax import data, prompts
  agent_roles = [prompts.AgentRole(r, latent_steps=STEPS) for r in roles]
  probe = data.encode_examples(tokenizer, [_example()], agent_roles, max_prompt_tokens=4096,
                               max_target_tokens=TARGET)
  width = int(max(probe.agent_valid.sum(-1).max(), probe.solver_valid.sum()))
  return data.encode_examples(tokenizer, [_example()], agent_roles, max_prompt_tokens=width,
                              max_target_tokens=TARGET)


def _setup_jax(hf_dir, roles):
  import jax
  import ml_collections as mlc
  from diffmas_jax import agents, lora as lora_lib, model as model_lib, topology, train
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import load_model
  from diffmas_jax.methods.latent_mas import trace_capacity

  m = load_model(hf_dir, remat=FLAGS.train_remat)
  # The layout the trainer steps on when no weight is split (trainer.train_layout).
  m.weights = model_lib.per_layer(m.weights, packed=False)  # as trainer.train_layout
  enc = _encoded(m.tokenizer, roles)
  batch = enc.take([0])
  spec = topology.TraceSpec((STEPS,) * len(roles))
  tc = mlc.ConfigDict(dict(lr=5e-5, warmup_ratio=0.0, final_lr_ratio=0.0, max_grad_norm=1.0,
                           b1=0.9, b2=0.999, weight_decay=0.0, grad_accum=1))
  opt, sched = train.make_optimizer(tc, 10)
  params = train.init_params(m.cfg, lora_lib.LoraConfig(rank=RANK, alpha=ALPHA), "shared",
                             len(roles), jax.random.key(0))
  state = train.init_state(params, opt, 0)
  step = train.make_train_step(opt, sched, train.StepConfig(m.cfg, spec, "shared",
                                                             remat=FLAGS.train_stage_remat))
  capacity = trace_capacity(batch, spec)
  make_cache = lambda: KVCache.init(m.cfg, 1, capacity)
  realigner = agents.make_realigner(m.weights)
  real_positions = int(enc.agent_valid.sum() + len(roles) * STEPS + enc.solver_valid.sum()
                       + enc.target_valid.sum() - 1)
  return m, step, state, make_cache, batch.as_jax(), realigner, real_positions


def jax_worker(hf_dir: str) -> dict:
  import jax
  from diffmas_jax.params import count_params
  m, step, state, make_cache, batch, realigner, positions = _setup_jax(hf_dir, ROLES)
  t = time.perf_counter()
  state, metrics = step(state, m.weights, make_cache(), batch, realigner)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  times = []
  for _ in range(REPEATS):
    t = time.perf_counter()
    state, metrics = step(state, m.weights, make_cache(), batch, realigner)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  emb = m.weights.embed.size
  return {"seconds": min(times), "first_call_s": first, "positions": positions,
          "loss": float(metrics["loss"]), "nonembed_params": count_params(m.weights) - emb,
          "vocab": m.cfg.vocab_size, "hidden": m.cfg.hidden_size, "layers": m.cfg.num_layers,
          "heads": m.cfg.num_heads, "head_dim": m.cfg.head_dim, "peak_rss_mb": peak_rss_mb()}


def memory_worker(hf_dir: str) -> dict:
  """Compiled memory (MB) of our step with 1..8 upstream agents (+ the solver)."""
  out = {}
  for n in MEMORY_AGENTS:
    roles = tuple((list(ROLES) * 8)[:n])
    m, step, state, make_cache, batch, realigner, _ = _setup_jax(hf_dir, roles)
    mem = step.lower(state, m.weights, make_cache(), batch, realigner).compile().memory_analysis()
    out[str(n)] = {"temp_mb": mem.temp_size_in_bytes / 2**20,
                   "args_mb": mem.argument_size_in_bytes / 2**20}
  return out


def torch_worker(hf_dir: str) -> dict:
  """transformers + peft: the same pipeline with autograd through past_key_values."""
  import peft
  import torch
  import transformers
  from bench import torch_pipeline
  from diffmas_jax.tokenizer import Tokenizer

  enc = _encoded(Tokenizer.from_pretrained(hf_dir), ROLES)
  agent_ids = [enc.agent_tokens[0, a][enc.agent_valid[0, a]].tolist() for a in range(len(ROLES))]
  solver_ids = enc.solver_tokens[0][enc.solver_valid[0]].tolist()
  target_ids = enc.target_tokens[0][enc.target_valid[0]].tolist()
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"]))
  model.train()
  w_a, target_norm = torch_pipeline.realigner(base)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5,
                          weight_decay=0.0)

  def step():
    past = torch_pipeline.build_trace(model, agent_ids, STEPS, w_a, target_norm)
    ids = torch.tensor([solver_ids + target_ids[:-1]])
    logits = model(input_ids=ids, past_key_values=past, use_cache=True).logits
    pred = logits[0, len(solver_ids) - 1:]
    loss = torch.nn.functional.cross_entropy(pred.float(), torch.tensor(target_ids))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)

  step()
  times = []
  for _ in range(REPEATS):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return {"seconds": min(times), "torch_threads": torch.get_num_threads(),
          "peak_rss_mb": peak_rss_mb()}


# Our step under each remat setting: (per-layer policy, per-stage remat). The first
# is the paper configs' memory-bounded default; the others trade memory for speed.
VARIANTS = (("full", True), ("full", False), ("attn", False), ("attn_mlp", False),
            ("none", False))


def _worker(kind: str, hf_dir: str, module: str = "bench.bench_train", remat: str = "full",
            stage_remat: bool = False) -> dict:
  flag = "--worker" if module == "launch.bench" else "--train_worker"
  extra = [] if module == "launch.bench" else [
      f"--train_hf_dir={hf_dir}", f"--train_remat={remat}", f"--train_stage_remat={stage_remat}"]
  out = subprocess.run([sys.executable, "-m", module, f"{flag}={kind}", *extra], check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def model_flops(r: dict, per_param: int = 4) -> float:
  """`per_param` N per position + attention + LM head on the targets (module docstring)."""
  n, pos = r["nonembed_params"], r["positions"]
  attn = 12 * r["layers"] * r["heads"] * r["head_dim"] * pos * pos / 2
  head = per_param * r["hidden"] * r["vocab"] * TARGET
  return per_param * n * pos + attn + head


def _variants() -> tuple:
  if not FLAGS.train_variants:
    return VARIANTS
  out = []
  for item in FLAGS.train_variants.split(","):
    remat, _, stage = item.strip().partition("/")
    if (remat, stage == "True") not in VARIANTS or stage not in ("True", "False"):
      raise SystemExit(f"--train_variants item {item!r} is not one of "
                       f"{[f'{r}/{sr}' for r, sr in VARIANTS]}")
    out.append((remat, stage == "True"))
  return tuple(out)


def run(hf_dir: str, runs: int = 3) -> dict:
  """`runs` rounds of (hardware, each variant of ours, hardware, transformers + peft),
  each in its own process; median [min, max] over rounds, ratios within each round;
  the matmul peak is the better of the two probes around ours (stats.between_probes)."""
  variants = _variants()
  rounds = []
  for i in range(runs):
    ours, hw = between_probes(
        lambda: _worker("hardware", hf_dir, module="launch.bench"),
        lambda: {v: _worker("jax", hf_dir, remat=v[0], stage_remat=v[1]) for v in variants})
    rounds.append({"hw": hw, "ours": ours, "ref": _worker("torch", hf_dir),
                   "load": os.getloadavg()[0]})
    print(f"train run {i + 1}/{runs} done (load {rounds[-1]['load']:.1f})", file=sys.stderr)
  memory = ({sr: _worker("memory", hf_dir, stage_remat=sr) for sr in (True, False)}
            if FLAGS.train_memory else None)
  first = rounds[0]["ours"][variants[0]]
  flops, flops6, pos = model_flops(first), model_flops(first, per_param=6), first["positions"]
  peaks = [r["hw"]["matmul_gflops"] for r in rounds]
  print(f"\n## train step: shared adapters, {len(ROLES) + 1} agents, m = {STEPS}, {TARGET} target "
        f"tokens, {pos} positions, LoRA r {RANK}, f32, batch 1; best of {REPEATS} per run, "
        f"median [min, max] of {runs} runs (load {fmt([r['load'] for r in rounds])})")
  print(f"model FLOPs per step {flops / 1e12:.2f} TFLOP ({flops6 / 1e12:.2f} at 6 N); measured "
        f"f32 matmul peak {fmt(peaks, 0)} GFLOP/s; torch threads "
        f"{rounds[0]['ref']['torch_threads']}")
  print("| implementation | s/step | speed vs transformers | % of matmul peak, 4 N (6 N) | "
        "peak RSS MB | RSS vs transformers |\n|---|---|---|---|---|---|")
  ref_s = [r["ref"]["seconds"] for r in rounds]
  ref_rss = [r["ref"]["peak_rss_mb"] for r in rounds]
  rows = [(f"diffmas-jax, layer remat {v[0]}, stage remat {'on' if v[1] else 'off'}",
           [r["ours"][v] for r in rounds]) for v in variants]
  rows.append(("transformers + peft", [r["ref"] for r in rounds]))
  for name, rs in rows:
    sec = [r["seconds"] for r in rs]
    rss = [r["peak_rss_mb"] for r in rs]
    mfu = [100 * flops / s / (p * 1e9) for s, p in zip(sec, peaks)]
    mfu6 = [100 * flops6 / s / (p * 1e9) for s, p in zip(sec, peaks)]
    print(f"| {name} | {fmt(sec, 2)} | {fmt(ratios(ref_s, sec), 2, 'x')} | {fmt(mfu, 0, '%')} "
          f"({fmt(mfu6, 0, '%')}) | {fmt(rss, 0)} | {fmt(ratios(rss, ref_rss), 2, 'x')} |")
  print(f"diffmas-jax first call (compile + run), layer remat {variants[0][0]}, stage remat "
        f"{'on' if variants[0][1] else 'off'}: "
        f"{fmt([r['ours'][variants[0]]['first_call_s'] for r in rounds])}s")
  if memory:
    print("\n| upstream agents | temporaries MB, stage remat on | stage remat off | arguments MB "
          "(weights, cache, batch) |\n|---|---|---|---|")
    for n in memory[True]:
      print(f"| {n} | {memory[True][n]['temp_mb']:.0f} | {memory[False][n]['temp_mb']:.0f} | "
            f"{memory[True][n]['args_mb']:.0f} |")
  return {"runs": [{**r, "ours": {f"{a}/stage_remat={b}": v for (a, b), v in r["ours"].items()}}
                   for r in rounds], "model_flops": flops, "memory": memory}


def main(argv):
  del argv
  if FLAGS.train_worker:
    fn = {"jax": jax_worker, "torch": torch_worker, "memory": memory_worker}[FLAGS.train_worker]
    print(json.dumps(fn(FLAGS.train_hf_dir)))
    return
  from bench import model_dir
  with model_dir(FLAGS.train_hf_dir) as hf_dir:
    run(hf_dir)


if __name__ == "__main__":
  app.run(main)
