"""The m-sweep (latent steps per agent), and side-by-side tables of finished training runs.

  python -m launch.sweep --config=configs/gpqa.py:quickstart --values=0,4,10,40
  python -m launch.sweep --config=configs/gpqa.py:quickstart --values=0,4,10,40 \\
      --workdir=runs/msweep_small -- --config.train.num_examples=8 --config.eval.limit=10
  python -m launch.sweep --compare=runs/train_math_shared,runs/train_math_c2c --out=runs/ablations

Sweep: one `launch.train` run per m (config variant `m<N>`: DiffMAS trained and
evaluated with N latent steps per upstream agent) in <workdir>/m<N>, each in its
own process and each resumable; then <workdir>/msweep.md (one table) and
msweep.png (accuracy with 95% CI, answer perplexity and the final probe loss
against m). Arguments after `--` go to every launch.train run.
Compare: one table (ablations.md) of every method evaluated in each workdir,
with the training figures of the run that produced it.
"""

from __future__ import annotations

import subprocess
import sys

from absl import app, flags

from diffmas_jax.research import run_tables
from launch import cli

flags.DEFINE_string("config", "", "Task config with its variants, e.g. configs/gpqa.py:quickstart.")
flags.DEFINE_list("values", ["0", "4", "10", "40"], "Latent steps m to sweep.")
flags.DEFINE_string("workdir", "runs/msweep", "Sweep directory (one sub-directory per m).")
flags.DEFINE_list("compare", [], "Finished launch.train workdirs to tabulate side by side.")
flags.DEFINE_string("out", "runs/ablations", "Where --compare writes ablations.md.")
FLAGS = flags.FLAGS


def main(argv):
  passthrough = argv[1:]
  if FLAGS.compare:
    path = f"{FLAGS.out}/ablations.md"
    table = run_tables.compare_table(FLAGS.compare)
    run_tables.write_text(path, table)
    print(table)
    return
  if not FLAGS.config:
    raise app.UsageError("--config=configs/<task>.py[:variants] is required (or --compare)")
  values = [int(v) for v in FLAGS.values]
  joiner = "," if ":" in FLAGS.config else ":"
  for m in values:
    sub = f"{FLAGS.workdir}/m{m}"
    cmd = [sys.executable, "-m", "launch.train", f"--config={FLAGS.config}{joiner}m{m}",
           f"--workdir={sub}", *passthrough]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
      raise SystemExit(f"the m={m} run failed (exit {rc}); rerun this command to resume it")
  table, points = run_tables.sweep_table(FLAGS.workdir, sorted(values))
  run_tables.write_text(f"{FLAGS.workdir}/msweep.md",
                        f"# m-sweep: {FLAGS.config} {' '.join(passthrough)}\n\n{table}")
  if points:
    run_tables.sweep_plot(points, f"{FLAGS.workdir}/msweep.png")
  print(table)
  print(f"table: {FLAGS.workdir}/msweep.md; plot: {FLAGS.workdir}/msweep.png")


if __name__ == "__main__":
  cli.run(main)
