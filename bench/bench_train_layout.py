"""Train step on per-layer vs stacked weights: an in-process A/B of `bench.bench_train`'s step.

  python -m bench.bench_train_layout                 # 6 interleaved rounds, layer remat attn
  python -m bench.bench_train_layout --rounds=4 --train_remat=none

The same jitted DiffMAS step (4 agents, m = 10, 512 target tokens, LoRA, AdamW,
batch 1) on the stacked `[L, ...]` weights and on per-layer buffers
(`model.per_layer`, what `trainer.train_layout` gives the step), one step of each
per round, alternating, so the host's drift hits both alike; prints each layout's
median [min, max] seconds, the per-round speed-up (stacked / per-layer) as median
[min, max], the first-call (compile + run) times and the losses, which must agree.
"""

from __future__ import annotations

import time

from absl import flags

from bench import bench_train
from bench.stats import fmt, ratios
from launch import cli

flags.DEFINE_integer("rounds", 6, "Interleaved rounds (one step per layout each).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from bench import model_dir
  from diffmas_jax import model as model_lib
  from diffmas_jax.loading import check_source

  cli.check_all(lambda: FLAGS.train_hf_dir and check_source(FLAGS.train_hf_dir),
                lambda: cli.check_value(FLAGS.rounds >= 1, f"--rounds={FLAGS.rounds}: run at "
                                        "least 1 round"))
  runs = {}
  with model_dir(FLAGS.train_hf_dir) as hf_dir:
    for layout in ("stacked", "per_layer"):
      m, step, state, make_cache, batch, realigner, _ = bench_train._setup_jax(
          hf_dir, bench_train.ROLES)
      if layout == "stacked":
        m.weights = model_lib.stacked(m.weights)
      t = time.perf_counter()
      state, metrics = step(state, m.weights, make_cache(), batch, realigner)
      first = time.perf_counter() - t
      runs[layout] = dict(m=m, step=step, state=state, make_cache=make_cache, batch=batch,
                          realigner=realigner, first=first, seconds=[], losses=[])
      print(f"{layout}: first call {first:.1f} s, loss {float(metrics['loss']):.6f}", flush=True)
  for i in range(FLAGS.rounds):
    for layout, r in runs.items():
      t = time.perf_counter()
      r["state"], metrics = r["step"](r["state"], r["m"].weights, r["make_cache"](), r["batch"],
                                      r["realigner"])
      jax.block_until_ready(metrics)
      r["seconds"].append(time.perf_counter() - t)
      r["losses"].append(float(metrics["loss"]))
    print(f"round {i + 1}/{FLAGS.rounds}: stacked {runs['stacked']['seconds'][-1]:.2f} s, "
          f"per-layer {runs['per_layer']['seconds'][-1]:.2f} s", flush=True)
  speedup = ratios(runs["stacked"]["seconds"], runs["per_layer"]["seconds"])
  print(f"\n## train step, layer remat {FLAGS.train_remat}: stacked vs per-layer weights, "
        f"{FLAGS.rounds} interleaved rounds (median [min, max])")
  print("| layout | s/step | first call s | loss after the rounds |\n|---|---|---|---|")
  for layout, r in runs.items():
    print(f"| {layout} | {fmt(r['seconds'], 2)} | {r['first']:.1f} | {r['losses'][-1]:.6f} |")
  print(f"speed-up per round (stacked / per-layer): {fmt(speedup, 2, 'x')}")


if __name__ == "__main__":
  cli.run(main)
