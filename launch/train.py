"""Train DiffMAS adapters through the latent trace, then compare methods side by side.

  python -m launch.train --config=configs/quickstart.py             # offline, ~15 min on 2 CPUs
  python -m launch.train --config=configs/gpqa.py --config.model.source=/models/Qwen3-8B \\
      --config.eval.data_path=/data/gpqa_diamond.csv --workdir=runs/gpqa
  python -m launch.train --config=configs/gpqa.py:quickstart --config.train.grad_mode=per_agent

The workdir receives metrics.jsonl, loss.png, checkpoints/, adapter/ (PEFT),
results.jsonl, summary.md / summary.json / accuracy.png and run_config.json.
Rerunning the same command resumes: training continues from the last finished
checkpoint and evaluation skips finished samples.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch import runtime  # defines --multihost, --coordinator_address, ...

config_flags.DEFINE_config_file("config", None, "Config file (configs/gpqa.py, ...).",
                                lock_config=True)
flags.DEFINE_string("workdir", "", "Run directory (default runs/train_<data>_<grad_mode>).")
flags.DEFINE_bool("skip_eval", False, "Train and export only.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from diffmas_jax import train as train_lib
  from diffmas_jax.evaluation import evaluate
  from diffmas_jax.loading import load_model
  from diffmas_jax.tasks import load_task
  from diffmas_jax.trainer import run_training, training_examples
  from diffmas_jax import paths
  from launch.runtime import init_runtime, make_workdir, mesh_from_config

  logging.set_verbosity(logging.WARNING)
  cfg = FLAGS.config
  train_lib.check_grad_mode(cfg.train.grad_mode)
  init_runtime(FLAGS.multihost)
  mesh = mesh_from_config(cfg.mesh)
  workdir = make_workdir(FLAGS.workdir or cfg.workdir,
                         f"train_{cfg.train.data}_{cfg.train.grad_mode}")
  # Everything that can be missing is checked before any long work starts.
  methods = [] if FLAGS.skip_eval else list(cfg.eval.methods)
  excluded = training_examples(cfg.train)[1]
  records = []
  if methods:
    records = load_task(cfg.eval.task, split=cfg.eval.split or None,
                        path=cfg.eval.data_path or None, limit=cfg.eval.limit or None,
                        seed=cfg.eval.seed, exclude_ids=excluded)
  model = load_model(cfg.model.source, dtype=cfg.model.dtype, remat=cfg.model.remat)

  result = run_training(cfg, model, workdir, mesh)
  adapters = train_lib.adapters_for(result.params, cfg.train.grad_mode)
  if jax.process_index() == 0:
    from diffmas_jax import peft_io
    with paths.local_dir_for(f"{workdir}/adapter") as adapter_dir:
      peft_io.save_trained_adapters(adapter_dir, model.cfg, adapters,
                                    [r.strip() for r in _roles(cfg)], alpha=cfg.lora.alpha,
                                    dropout=cfg.lora.dropout, base_model=cfg.model.source)
    print(f"adapters: {workdir}/adapter (PEFT); metrics: {result.metrics_path}; "
          f"loss curve: {result.loss_png}")
  if not methods:
    return
  out = evaluate(model, records, methods, cfg.eval, cfg.agents, workdir, lora=adapters)
  if jax.process_index() == 0:
    print(paths.as_path(out["summary_md"]).read_text())
    print(f"per-sample results: {workdir}/results.jsonl; chart: {out['summary_png']}")


def _roles(cfg):
  roles = cfg.agents.roles
  return roles.split(",") if isinstance(roles, str) else list(roles)


def _main_with_clear_errors(argv):
  """Known user errors end with their message (exit 2), not a traceback."""
  import sys

  from diffmas_jax.checkpoint import CheckpointMismatchError
  from diffmas_jax.data import TrainDataError
  from diffmas_jax.loading import ModelNotFoundError
  from diffmas_jax.tasks.records import TaskDataMissingError, TaskFormatError
  from diffmas_jax.trainer import NonFiniteLossError
  try:
    main(argv)
  except (CheckpointMismatchError, TrainDataError, ModelNotFoundError, TaskDataMissingError,
          TaskFormatError, NonFiniteLossError, runtime.MultihostConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main_with_clear_errors)
