"""Evaluate communication methods side by side on one task.

  python -m launch.eval --config=configs/eval_gsm8k.py --config.eval.limit=50 --workdir=runs/gsm8k50
  python -m launch.eval --config=configs/eval_arc.py:quick
  python -m launch.eval --config=configs/eval_task.py:task=medqa \\
      --config.eval.methods='("single","latent_mas")' --config.agents.latent_steps=0
  python -m launch.eval --config=configs/eval_arc.py --config.eval.methods='("c2c",)' \\
      --c2c_fuser=runs/train_math_c2c/c2c_fuser.safetensors

Writes <workdir>/results.jsonl (one line per sample; rerunning skips finished
samples), summary.md, summary.json, accuracy.png and run_config.json.
"""

from absl import flags

from launch import cli
from launch import runtime  # defines --multihost, --coordinator_address, ...

cli.define_run_flags("Config file (configs/eval_*.py).", "runs/eval_<task>")
flags.DEFINE_string("c2c_fuser", "", "A trained C2C fuser (<train workdir>/c2c_fuser.safetensors) "
                    "for the method 'c2c'.")
FLAGS = flags.FLAGS


def load_eval_model(cfg):
  """The model for evaluation on the mesh of `cfg.mesh` (as launch.train builds it).

  Every weight is loaded straight into its sharding (each process reads only the
  slices its devices hold), then kept as this process's block of the mesh in
  per-layer buffers: evaluation splits each batch over those devices.
  """
  from diffmas_jax import eval_mesh
  from diffmas_jax.model import per_layer
  from diffmas_jax.plan import model_shapes
  from launch.runtime import mesh_from_config

  mesh = mesh_from_config(cfg.mesh, model_shapes(cfg.model.source, cfg.model.dtype))
  local = eval_mesh.local_mesh(mesh)  # a mesh no process can evaluate on fails before loading
  model = cli.load_reported(cfg.model.source, dtype=cfg.model.dtype, mesh=mesh)
  # Inference only: keep just the per-layer buffers (evaluate would otherwise hold both).
  model.weights = per_layer(eval_mesh.on_mesh(model.weights, local))
  return model


def main(argv):
  del argv
  import jax

  from diffmas_jax import paths

  cfg = FLAGS.config
  # Everything checkable without weights, before any long work; every failure reported.
  workdir, (_, records) = cli.start_run(
      f"eval_{cfg.eval.task}", lambda: cli.check_eval_config(cfg.eval, cfg.agents),
      lambda: cli.load_records(cfg.eval), multihost=True)
  from diffmas_jax.evaluation import evaluate
  model = load_eval_model(cfg)
  trained = None
  if FLAGS.c2c_fuser:
    from diffmas_jax import c2c
    trained = c2c.load_fuser(FLAGS.c2c_fuser, model.cfg)
  out = evaluate(model, records, list(cfg.eval.methods), cfg.eval, cfg.agents, workdir,
                 lora=trained)
  if jax.process_index() == 0:
    print(paths.as_path(out["summary_md"]).read_text())
    print(f"per-sample results: {workdir}/results.jsonl; chart: {out['summary_png']}")


if __name__ == "__main__":
  cli.run(main)
