"""Speed and memory of the core model against transformers, measured in one run.

  python -m launch.bench                      # core: decode b1/b8, prefill 1024, RSS
  python -m launch.bench --suites=core,latent,train --runs=3

Each framework runs in its own subprocess so peak RSS is its own (VmHWM, see
bench.stats). Weights are the embedded SmolLM2-135M-Instruct converted once to an
HF directory that both load. Every suite runs `--runs` times (fresh processes,
ours and the reference one after the other in each run); tables print the
median [min, max] over runs, ratios taken within each run. Within a run a
figure is the best of `--repeats` timed calls after a warm-up. Roofline and
matmul-peak percentages (core and train suites) divide by the better of two
hardware probes taken right before and after our workers
(bench.stats.between_probes). Written to --out (JSON) with every run's raw
figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from launch import cli

# The suites' own flags (--train_variants, --notrain_memory, ...) are accepted here too.
from bench import bench_latent, bench_methods, bench_train  # noqa: F401
from bench.stats import between_probes, fmt, peak_rss_mb, ratios

flags.DEFINE_string("suites", "core", "Comma list: core, latent, train, methods.")
flags.DEFINE_string("worker", "", "Internal: one process's measurements (jax|torch|hardware).")
flags.DEFINE_string("hf_dir", "", "Converted HF directory (made in a temp dir when empty).")
flags.DEFINE_string("out", "", "Write results JSON here.")
flags.DEFINE_integer("prompt_len", 200, "Decode benchmark prompt length.")
flags.DEFINE_integer("new_tokens", 128, "Decode benchmark new tokens.")
flags.DEFINE_integer("prefill_len", 1024, "Prefill benchmark prompt length.")
flags.DEFINE_integer("repeats", 3, "Timed repeats within a run (best is reported).")
flags.DEFINE_integer("runs", 3, "Runs of each suite (median [min, max] is reported).")
FLAGS = flags.FLAGS

TEXT = ("The history of science is the study of the development of science and scientific "
        "knowledge, including both the natural and social sciences. Science is a body of "
        "empirical, theoretical, and practical knowledge about the natural world. ")


def _prompt_ids(tokenizer_encode, n: int) -> list[int]:
  ids: list[int] = []
  while len(ids) < n:
    ids += tokenizer_encode(TEXT)
  return ids[:n]


def _best(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def hardware_worker(hf_dir: str) -> dict:
  """Read bandwidth (jitted reduction over 1 GiB) and f32 matmul peak of this machine.

  A process of its own so its 1 GiB buffer does not count in the model's peak RSS.
  """
  del hf_dir
  import jax
  import jax.numpy as jnp

  big = jnp.ones((2**28,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(big).block_until_ready()
  res = {"read_gbps": big.nbytes / _best(lambda: total(big).block_until_ready(), 5) / 1e9}
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  res["matmul_gflops"] = 2 * 2048**3 / _best(lambda: mm(a).block_until_ready(), 5) / 1e9
  return res


def jax_worker(hf_dir: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffmas_jax import model as model_lib
  from diffmas_jax import sampling
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import load_model
  from diffmas_jax.params import count_params

  m = load_model(hf_dir)
  cfg = m.cfg
  # Bytes a decode step reads: every weight once (a tied head reads the embedding), counted
  # before per_layer, whose packed head is a second copy of a tied embedding.
  params, weight_bytes = count_params(m.weights), sum(x.nbytes for x in jax.tree.leaves(m.weights))
  weights = model_lib.per_layer(m.weights)  # inference keeps only per-layer buffers
  m.weights = None
  res: dict = {"params": params, "weight_bytes": weight_bytes,
               "nonembed_params": params - weights.embed.size,
               "packed_matmul": model_lib.is_packed(weights),
               "layers": cfg.num_layers, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
               "head_dim": cfg.head_dim, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
               "cache_itemsize": jnp.dtype(cfg.dtype).itemsize}
  prompt = _prompt_ids(m.tokenizer.encode, FLAGS.prompt_len)
  n_new = FLAGS.new_tokens
  sc = sampling.SamplingConfig(max_new_tokens=n_new, stop_ids=(), pad_id=0)  # exactly n_new
  for batch in (1, 8):
    tokens = jnp.asarray(np.tile(prompt, (batch, 1)), jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    cap = FLAGS.prompt_len + n_new
    run = lambda: sampling.prefill_and_decode(weights, cfg, tokens, valid, jax.random.key(0), sc,
                                              cap).tokens.block_until_ready()
    t = time.perf_counter()
    run()
    res[f"compile_s_b{batch}"] = time.perf_counter() - t
    # Separate prefill so decode tokens/s excludes it.
    pre = jax.jit(lambda w, c, t, v: model_lib.forward(w, cfg, c, tokens=t, valid=v, logits="last",
                                                       fresh_cache=True).logits)
    cache = KVCache.init(cfg, batch, cap)
    pre(weights, cache, tokens, valid).block_until_ready()
    t_pre = _best(lambda: pre(weights, cache, tokens, valid).block_until_ready(), FLAGS.repeats)
    t_all = _best(run, FLAGS.repeats)
    res[f"decode_tok_s_b{batch}"] = batch * n_new / max(t_all - t_pre, 1e-9)
    res[f"decode_ms_per_step_b{batch}"] = 1000 * (t_all - t_pre) / n_new

  long = jnp.asarray([_prompt_ids(m.tokenizer.encode, FLAGS.prefill_len)], jnp.int32)
  pre = jax.jit(lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t, logits="last",
                                                  fresh_cache=True).logits)
  cache = KVCache.init(cfg, 1, long.shape[1])  # outside jit: no constant folding
  t = time.perf_counter()
  pre(weights, cache, long).block_until_ready()
  res["compile_s_prefill"] = time.perf_counter() - t
  res["prefill_tok_s"] = FLAGS.prefill_len / _best(
      lambda: pre(weights, cache, long).block_until_ready(), FLAGS.repeats)
  res["peak_rss_mb"] = peak_rss_mb()
  return res


def decode_roofline_tok_s(r: dict, batch: int, bandwidth: float) -> float:
  """Tokens/s if a decode step only read the weights and the filled cache once.

  Per step: every weight byte, plus K and V of the filled slots (prompt + on
  average half the new tokens) for every layer and row, at the measured read
  bandwidth (bytes/s).
  """
  slots = FLAGS.prompt_len + FLAGS.new_tokens / 2
  cache = 2 * r["layers"] * batch * r["kv_heads"] * slots * r["head_dim"] * r["cache_itemsize"]
  return batch * bandwidth / (r["weight_bytes"] + cache)


def prefill_flops(r: dict, t: int) -> float:
  """Model FLOPs of a t-token prefill: 2 N per token, causal attention (QK and PV
  over half the pairs), the LM head for the last token."""
  attn = 2 * 2 * r["layers"] * r["heads"] * r["head_dim"] * t * t / 2
  return 2 * r["nonembed_params"] * t + attn + 2 * r["hidden"] * r["vocab"]


def torch_worker(hf_dir: str) -> dict:
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  prompt = _prompt_ids(lambda s: tok.encode(s, add_special_tokens=False), FLAGS.prompt_len)
  n_new = FLAGS.new_tokens
  res: dict = {}
  with torch.inference_mode():
    for batch in (1, 8):
      ids = torch.tensor([prompt] * batch)
      gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                   min_new_tokens=n_new, do_sample=False, pad_token_id=0)
      gen()  # warm-up
      t_all = _best(gen, FLAGS.repeats)
      t_pre = _best(lambda: model(ids, logits_to_keep=1), FLAGS.repeats)
      res[f"decode_tok_s_b{batch}"] = batch * n_new / max(t_all - t_pre, 1e-9)
      res[f"decode_ms_per_step_b{batch}"] = 1000 * (t_all - t_pre) / n_new
    long = torch.tensor([_prompt_ids(lambda s: tok.encode(s, add_special_tokens=False),
                                     FLAGS.prefill_len)])
    model(long, logits_to_keep=1)
    res["prefill_tok_s"] = FLAGS.prefill_len / _best(lambda: model(long, logits_to_keep=1),
                                                     FLAGS.repeats)
  res["peak_rss_mb"] = peak_rss_mb()
  return res


def _run_worker(kind: str, hf_dir: str) -> dict:
  cmd = [sys.executable, "-m", "launch.bench", f"--worker={kind}", f"--hf_dir={hf_dir}",
         f"--prompt_len={FLAGS.prompt_len}", f"--new_tokens={FLAGS.new_tokens}",
         f"--prefill_len={FLAGS.prefill_len}", f"--repeats={FLAGS.repeats}"]
  if FLAGS.compile_cache is not None:
    cmd.append(f"--compile_cache={FLAGS.compile_cache}")
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def core_suite(hf_dir: str) -> dict:
  runs = []
  for i in range(FLAGS.runs):
    ours, hw = between_probes(lambda: _run_worker("hardware", hf_dir),
                              lambda: _run_worker("jax", hf_dir))
    runs.append({"ours": {**ours, **hw}, "transformers": _run_worker("torch", hf_dir),
                 "load": os.getloadavg()[0]})
    print(f"core run {i + 1}/{FLAGS.runs} done (load {runs[-1]['load']:.1f})", file=sys.stderr)
  col = lambda who, key: [r[who][key] for r in runs]
  rows = [("decode tok/s, batch 1", "decode_tok_s_b1", True),
          ("decode tok/s, batch 8", "decode_tok_s_b8", True),
          ("prefill tok/s, 1024 prompt", "prefill_tok_s", True),
          ("peak RSS MB (own process)", "peak_rss_mb", False)]
  loads = [r["load"] for r in runs]
  print(f"\n## core: embedded SmolLM2-135M-Instruct, f32, CPU; median [min, max] of "
        f"{len(runs)} runs (1-min load average {fmt(loads)})")
  print("| metric | diffmas-jax | transformers | ratio (per run) |\n|---|---|---|---|")
  for name, key, higher in rows:
    ours, ref = col("ours", key), col("transformers", key)
    # Speed: ours / theirs (higher is better); memory: ours / theirs (lower is better).
    print(f"| {name} | {fmt(ours)} | {fmt(ref)} | {fmt(ratios(ours, ref), 2, 'x')} |")
  bw = [r["ours"]["read_gbps"] * 1e9 for r in runs]
  print("\n| efficiency | diffmas-jax | transformers |\n|---|---|---|")
  fractions = {}
  for batch in (1, 8):
    roof = [decode_roofline_tok_s(r["ours"], batch, b) for r, b in zip(runs, bw)]
    for who in ("ours", "transformers"):
      fractions[(who, batch)] = [100 * r[who][f"decode_tok_s_b{batch}"] / x
                                 for r, x in zip(runs, roof)]
    print(f"| decode batch {batch}: % of bandwidth roofline ({fmt(roof)} tok/s) | "
          f"{fmt(fractions[('ours', batch)], 0, '%')} | {fmt(fractions[('transformers', batch)], 0, '%')} |")
  flops = prefill_flops(runs[0]["ours"], FLAGS.prefill_len)
  peak = [r["ours"]["matmul_gflops"] * 1e9 for r in runs]
  for who in ("ours", "transformers"):
    fractions[(who, "prefill")] = [100 * flops * r[who]["prefill_tok_s"] / FLAGS.prefill_len / p
                                   for r, p in zip(runs, peak)]
  print(f"| prefill {FLAGS.prefill_len}: % of f32 matmul peak ({fmt([p / 1e9 for p in peak], 0)} "
        f"GFLOP/s; {flops / 1e9:.0f} GFLOP) | {fmt(fractions[('ours', 'prefill')], 0, '%')} | "
        f"{fmt(fractions[('transformers', 'prefill')], 0, '%')} |")
  each = [f"{p['read_gbps']:.0f}" for r in runs for p in r["ours"]["probes"]]
  print(f"\nmeasured read bandwidth {fmt([b / 1e9 for b in bw])} GB/s (the better of the probes "
        f"before and after our worker; each: {' '.join(each)}); weights "
        f"{runs[0]['ours']['weight_bytes'] / 1e6:.0f} MB; roofline counts the weights and the "
        f"filled KV cache once per step")
  print(f"first-call compile + run s: decode b1 {fmt(col('ours', 'compile_s_b1'))}, b8 "
        f"{fmt(col('ours', 'compile_s_b8'))}, prefill {fmt(col('ours', 'compile_s_prefill'))}")
  packed = {r["ours"].get("packed_matmul") for r in runs}
  print("weight products: " + ("the packed CPU kernel" if packed == {True} else
        "XLA's" if packed == {False} else "mixed across runs") + " ($DIFFMAS_CPU_KERNELS)")
  return {"runs": runs, "roofline_percent": {f"{w}/{b}": v for (w, b), v in fractions.items()}}


def main(argv):
  del argv
  if FLAGS.worker:
    fn = {"jax": jax_worker, "torch": torch_worker, "hardware": hardware_worker}[FLAGS.worker]
    print(json.dumps(fn(FLAGS.hf_dir)))
    return
  _check_inputs()
  results = {}
  from bench import model_dir
  with model_dir(FLAGS.hf_dir) as hf_dir:
    for suite in FLAGS.suites.split(","):
      if suite == "core":
        results["core"] = core_suite(hf_dir)
      else:  # latent / train / methods suites live in bench/ beside their own code
        module = {"latent": bench_latent, "train": bench_train, "methods": bench_methods}[suite]
        results[suite] = module.run(hf_dir, runs=FLAGS.runs)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


SUITES = ("core", "latent", "train", "methods")


def _check_inputs() -> None:
  """Suites, the model directory, the output path and the reference stack, all at once."""
  import importlib.util

  from diffmas_jax.loading import check_source
  unknown = [s for s in FLAGS.suites.split(",") if s not in SUITES]
  cli.check_all(
      lambda: cli.check_value(not unknown, f"--suites: unknown suite(s) {unknown}; available: "
                              f"{','.join(SUITES)}"),
      lambda: check_source(FLAGS.hf_dir) if FLAGS.hf_dir else None,
      lambda: cli.check_writable_dir(os.path.dirname(os.path.abspath(FLAGS.out)), "--out")
      if FLAGS.out else None,
      lambda: cli.check_value(FLAGS.repeats >= 1 and min(FLAGS.prompt_len, FLAGS.new_tokens,
                                                         FLAGS.prefill_len) >= 1,
                              "--repeats, --prompt_len, --new_tokens and --prefill_len must be >= 1"),
      lambda: cli.check_value(all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
                              "the benchmark compares against PyTorch + transformers, which are not "
                              "installed: pip install -r requirements-test.txt"))


if __name__ == "__main__":
  cli.run(main)
