"""Will a run fit, and on which mesh? AOT-compiles the step for N fake devices.

  python -m launch.plan --config=configs/gpqa.py --devices=8              # the config's mesh
  python -m launch.plan --config=configs/gpqa.py --devices=64 --search     # try candidate meshes
  python -m launch.plan --config=configs/gpqa.py --model=qwen3-32b --config.mesh.tensor=8

Builds the training micro-step and the evaluation pipeline from shapes only
(a preset name or a config.json; no weights are read), compiles them for a mesh
of N CPU devices and prints per device: argument / temporary / output bytes,
FLOPs, collective bytes per call, compile time and which chips it fits. With
--search it compiles every candidate mesh and names the one that fits --chip
with the least communication. XLA:CPU computes bf16 in f32, so temporaries are
overstated (arguments are exact). A TPU topology description needs libtpu,
which this CPU-only install lacks: the plan uses fake CPU devices.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/gpqa.py, ...).",
                                lock_config=True)
flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices to plan for.")
flags.DEFINE_string("model", "", "Model shapes: a preset (qwen3-8b, qwen3-32b, ...), a "
                    "config.json or an HF directory. Default: from --config.model.source.")
flags.DEFINE_bool("search", False, "Compile every candidate mesh and suggest one.")
flags.DEFINE_string("chip", "v5p", "Chip the suggestion must fit (v5e, v4, v5p, H100, H200).")
flags.DEFINE_integer("local_devices", 8, "Devices per host: tensor parallelism stays inside one.")
flags.DEFINE_bool("eval", True, "Also compile the evaluation pipeline.")
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


class PlanError(ValueError):
  """Bad planner input (unknown preset or chip, JAX already initialised)."""


def _use_fake_devices(n: int) -> None:
  """N CPU devices; must run before JAX creates its backends."""
  import chex
  import jax
  try:
    chex.set_n_cpu_devices(n)  # XLA_FLAGS=--xla_force_host_platform_device_count=n
  except RuntimeError as e:
    raise PlanError(f"JAX started before the planner could set the device count: {e}") from e
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def main(argv):
  del argv
  from diffmas_jax.plan import CHIPS
  if FLAGS.chip not in CHIPS:
    raise PlanError(f"--chip={FLAGS.chip!r}; known chips: {', '.join(CHIPS)}")
  _use_fake_devices(FLAGS.devices)
  import jax

  from diffmas_jax import plan, sharding
  from diffmas_jax.config import PRESETS

  cfg = FLAGS.config
  source = FLAGS.model or cfg.model.source
  mcfg = plan.model_shapes(source, cfg.model.dtype, cfg.model.remat)
  if mcfg is None:
    raise PlanError(f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                    "config.json / HF directory; pass --model=qwen3-8b or --model=/path/config.json")
  w = plan.Workload.from_config(cfg, mcfg)
  print(f"JAX {jax.__version__}, {jax.device_count()} fake {jax.default_backend()} devices; "
        f"model {FLAGS.model or cfg.model.source} ({mcfg.num_layers} layers, d={mcfg.hidden_size}, "
        f"{mcfg.dtype}, remat {mcfg.remat}); agents m={w.steps}, prompts {w.prompt_tokens}, "
        f"targets {w.target_tokens}, micro-batch {w.batch_size} x accumulation {w.grad_accum}, "
        f"eval batch {w.eval_batch}")
  parallelism = "search" if FLAGS.search else cfg.mesh.get("parallelism", "manual")
  if FLAGS.search:
    meshes = plan.candidate_meshes(FLAGS.devices, mcfg, FLAGS.local_devices)
  else:
    # auto decides with the --chip's memory, as it would on that chip.
    meshes = [sharding.resolve_mesh_sizes(cfg.mesh, mcfg, FLAGS.devices,
                                          device_bytes=int(CHIPS[FLAGS.chip] * plan.GiB))]
  plans = []
  for sizes in meshes:
    p = plan.plan_mesh(mcfg, w, sizes, parallelism, with_eval=FLAGS.eval,
                       local_devices=FLAGS.local_devices)
    print(plan.report(p), flush=True)
    plans.append(p)
  choice = plan.best(plans, CHIPS[FLAGS.chip])
  if choice is None:
    print(f"no planned mesh fits {FLAGS.chip} ({CHIPS[FLAGS.chip]:g} GiB per device)")
  else:
    flags_text = " ".join(["--config.mesh.parallelism=manual"] + [
        f"--config.mesh.{k}={v}" for k, v in choice.mesh.items()])
    print(f"suggested for {FLAGS.chip}: {flags_text} (collectives "
          f"{plan.gib(choice.train.total_collective_bytes)} GiB per micro-step, peak "
          f"{plan.gib(choice.train.peak_bytes)} GiB per device)")
  if FLAGS.json:
    import dataclasses
    with open(FLAGS.json, "w") as f:
      json.dump([dataclasses.asdict(p) for p in plans], f, indent=1)


def _main_with_clear_errors(argv):
  from diffmas_jax.sharding import ShardingError
  try:
    main(argv)
  except (PlanError, ShardingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main_with_clear_errors)
