"""Train DiffMAS adapters through the latent trace, then compare methods side by side.

  python -m launch.train --config=configs/quickstart.py             # offline, ~15 min on 2 CPUs
  python -m launch.train --config=configs/gpqa.py --config.model.source=/models/Qwen3-8B \\
      --config.eval.data_path=/data/gpqa_diamond.csv --workdir=runs/gpqa
  python -m launch.train --config=configs/gpqa.py:quickstart --config.train.grad_mode=per_agent
  python -m launch.train --config=configs/gpqa.py:quickstart,c2c   # ablations: configs/ablations.py

The workdir receives metrics.jsonl, loss.png, checkpoints/, adapter/ (PEFT; C2C:
c2c_fuser.safetensors),
results.jsonl, summary.md / summary.json / accuracy.png and run_config.json.
Rerunning the same command resumes: training continues from the last finished
checkpoint and evaluation skips finished samples.
"""

from absl import flags

from launch import cli
from launch import runtime  # defines --multihost, --coordinator_address, ...

cli.define_run_flags("Config file (configs/gpqa.py, ...).", "runs/train_<data>_<grad_mode>")
flags.DEFINE_bool("skip_eval", False, "Train and export only.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from diffmas_jax import train as train_lib
  from diffmas_jax.evaluation import evaluate
  from diffmas_jax.trainer import run_training, training_examples
  from diffmas_jax import paths

  cfg = FLAGS.config
  methods = [] if FLAGS.skip_eval else list(cfg.eval.methods)
  # Everything checkable without weights, before any long work; every failure reported.
  excluded = {}
  train_data = lambda: excluded.setdefault("ids", training_examples(cfg.train)[1])
  workdir, checked = cli.start_run(
      f"train_{cfg.train.data}_{cfg.train.grad_mode}",
      lambda: cli.as_input_error(train_lib.check_grad_mode, cfg.train.grad_mode),
      lambda: cli.check_eval_config(cfg.eval, cfg.agents), train_data,
      lambda: cli.load_records(cfg.eval, excluded.get("ids", ())) if methods else [],
      multihost=True)
  records = checked[-1]
  from diffmas_jax.plan import model_shapes
  mesh = runtime.mesh_from_config(cfg.mesh, model_shapes(cfg.model.source, cfg.model.dtype))
  # Straight into the training shardings: no unsharded copy on any host or device.
  model = cli.load_config_model(cfg.model, mesh)

  result = run_training(cfg, model, workdir, mesh)
  if cfg.train.method == "c2c":
    adapters = _export_c2c(cfg, model, result, workdir)
  else:
    adapters = train_lib.adapters_for(result.params, cfg.train.grad_mode)
  if jax.process_index() == 0 and cfg.train.method != "c2c":
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


def _export_c2c(cfg, model, result, workdir):
  """Writes the fuser as <workdir>/c2c_fuser.safetensors; evaluation reads that file back."""
  import jax

  from diffmas_jax import c2c
  path = c2c.save_fuser(f"{workdir}/c2c_fuser.safetensors", result.params,
                        c2c.FuserConfig.from_config(cfg.c2c, result.micro_steps),
                        base_model=cfg.model.source)
  if jax.process_index() == 0:
    print(f"C2C fuser: {path}; metrics: {result.metrics_path}; loss curve: {result.loss_png}")
  return c2c.load_fuser(path, model.cfg) if jax.process_count() == 1 else result.params


def _roles(cfg):
  roles = cfg.agents.roles
  return roles.split(",") if isinstance(roles, str) else list(roles)


if __name__ == "__main__":
  cli.run(main)
