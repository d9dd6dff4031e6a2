"""Where a DiffMAS train step's time goes (jax.profiler), on either weight layout.

  python -m bench.profile_train                     # per-layer buffers (what the trainer uses)
  python -m bench.profile_train --layout=stacked    # the stacked [L, ...] weights

The `bench.bench_train` step (4 agents, m = 10 latent steps each, 512 target
tokens, LoRA, AdamW, batch 1, layer remat `--train_remat`), traced `--steps`
times after a warm-up on the embedded model (`--train_hf_dir`: another HF
directory). Prints XLA:CPU's per-operation table (`bench.xla_trace.op_rows`)
and the time spent copying weight matrices out of a stack: `dynamic-slice`
fusions whose result is a layer's weight matrix, which the stacked layout runs
before every matrix product in the scanned latent steps, forward and backward.
"""

from __future__ import annotations

import math

from absl import flags

from bench import bench_train
from launch import cli

flags.DEFINE_enum("layout", "per_layer", ["per_layer", "stacked"],
                  "Weight layout of the step: per-layer buffers or the stacked [L, ...] arrays.")
flags.DEFINE_integer("steps", 2, "Traced train steps.")
flags.DEFINE_integer("top", 25, "Operations printed.")
FLAGS = flags.FLAGS


def matrix_shapes(weights) -> set[str]:
  """Every weight matrix as the 2-D "in,out" a product reads, stacked and fused layouts."""
  from diffmas_jax import model as model_lib
  out = set()
  for layout in (model_lib.stacked(weights), model_lib.per_layer(weights, packed=False)):
    first = layout.layers[0] if isinstance(layout.layers, tuple) else layout.layers
    for name, eq in model_lib.PROJ_EQ.items():
      w = getattr(first, name)
      if w is None:
        continue
      shape = w.shape if isinstance(layout.layers, tuple) else w.shape[1:]
      n_in = model_lib._num_contracted(eq)
      out.add(f"{math.prod(shape[:n_in])},{math.prod(shape[n_in:])}")
  return out


def main(argv):
  del argv
  import jax

  from bench import model_dir
  from bench.xla_trace import format_rows, op_rows
  from diffmas_jax.loading import check_source
  from diffmas_jax import model as model_lib

  cli.check_all(lambda: FLAGS.train_hf_dir and check_source(FLAGS.train_hf_dir),
                lambda: cli.check_value(FLAGS.steps >= 1, f"--steps={FLAGS.steps}: trace at "
                                        "least 1 step"))
  with model_dir(FLAGS.train_hf_dir) as hf_dir:
    m, step, state, make_cache, batch, realigner, positions = bench_train._setup_jax(
        hf_dir, bench_train.ROLES)
  if FLAGS.layout == "stacked":
    m.weights = model_lib.stacked(m.weights)
  cache = make_cache()
  hlo = step.lower(state, m.weights, cache, batch, realigner).compile().as_text()
  holder = {"state": state}

  def one_step():  # threads the (donated) state through the calls
    holder["state"], metrics = step(holder["state"], m.weights, cache, batch, realigner)
    return metrics

  jax.block_until_ready(one_step())  # compile, warm up
  seconds, rows, trace_dir = op_rows(one_step, hlo, FLAGS.steps)
  shapes = matrix_shapes(m.weights)
  dims = lambda shape: shape.split("{")[0].partition("[")[2].rstrip("]")  # f32[a,b]{..} -> a,b
  copies = [r for r in rows if "dynamic-slice" in r[0] and dims(r[1]) in shapes]
  print(f"{FLAGS.layout} weights, layer remat {FLAGS.train_remat}, {positions} positions: "
        f"{seconds:.2f} s per traced step; {len(copies)} weight-slice copy operations "
        f"({sum(r[3] for r in copies):.0f} runs, {sum(r[2] for r in copies):.0f} ms per step)")
  print(format_rows(rows, FLAGS.top, trace_dir))


if __name__ == "__main__":
  cli.run(main)
