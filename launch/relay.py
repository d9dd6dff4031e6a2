"""The relay (learning-to-communicate) experiment, one command, offline.

  python -m launch.relay --config=configs/relay.py [--workdir=runs/relay]

Writes <workdir>/results.jsonl (per item and condition), summary.md,
summary.json, relay.png and train_log.jsonl. Rerunning skips finished
conditions.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/relay.py[:test]", lock_config=True)
flags.DEFINE_string("workdir", "", "Run directory (default runs/relay).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import time

  from diffmas_jax.loading import load_model
  from diffmas_jax.research.relay_run import run_relay
  from launch.runtime import make_workdir

  logging.set_verbosity(logging.WARNING)
  cfg = FLAGS.config
  workdir = make_workdir(FLAGS.workdir or cfg.workdir, "relay")
  t0 = time.perf_counter()
  model = load_model(cfg.model.source, dtype=cfg.model.dtype, remat=cfg.model.remat)
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
  run_relay(cfg, model, workdir, log)
  with open(f"{workdir}/summary.md") as f:
    print(f.read())
  print(f"per-item results: {workdir}/results.jsonl; plot: {workdir}/relay.png")


if __name__ == "__main__":
  app.run(main)
