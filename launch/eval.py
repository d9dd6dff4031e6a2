"""Evaluate communication methods side by side on one task.

  python -m launch.eval --config=configs/eval_gsm8k.py --config.eval.limit=50 --workdir=runs/gsm8k50
  python -m launch.eval --config=configs/eval_arc.py:quick
  python -m launch.eval --config=configs/eval_task.py:task=medqa \\
      --config.eval.methods='("single","latent_mas")' --config.agents.latent_steps=0

Writes <workdir>/results.jsonl (one line per sample; rerunning skips finished
samples), summary.md, summary.json, accuracy.png and run_config.json.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import runtime  # defines --multihost, --coordinator_address, ...

config_flags.DEFINE_config_file("config", None, "Config file (configs/eval_*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", "", "Run directory (default runs/eval_<task>).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from diffmas_jax.evaluation import evaluate
  from diffmas_jax.loading import load_model
  from diffmas_jax.tasks import load_task
  import jax

  from diffmas_jax import paths
  from launch.runtime import init_runtime, make_workdir

  cfg = FLAGS.config
  init_runtime(FLAGS.multihost)
  workdir = make_workdir(FLAGS.workdir or cfg.workdir, f"eval_{cfg.eval.task}")
  # Data first: a missing dataset should fail before the model loads.
  records = load_task(cfg.eval.task, split=cfg.eval.split or None,
                      path=cfg.eval.data_path or None, limit=cfg.eval.limit or None,
                      seed=cfg.eval.seed)
  model = load_model(cfg.model.source, dtype=cfg.model.dtype)
  out = evaluate(model, records, list(cfg.eval.methods), cfg.eval, cfg.agents, workdir)
  if jax.process_index() == 0:
    print(paths.as_path(out["summary_md"]).read_text())
    print(f"per-sample results: {workdir}/results.jsonl; chart: {out['summary_png']}")


if __name__ == "__main__":
  app.run(main)
