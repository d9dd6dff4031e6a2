"""The relay (learning-to-communicate) experiment, one command, offline.

  python -m launch.relay --config=configs/relay.py [--workdir=runs/relay]

Writes <workdir>/results.jsonl (per item and condition), summary.md,
summary.json, relay.png and train_log.jsonl. Rerunning skips finished
conditions.
"""

from absl import flags

from launch import cli

cli.define_run_flags("configs/relay.py[:test]", "runs/relay")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import time

  from diffmas_jax import paths
  from diffmas_jax.research.relay_run import run_relay

  cfg = FLAGS.config
  workdir, _ = cli.start_run("relay")
  t0 = time.perf_counter()
  model = cli.load_config_model(cfg.model)
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
  run_relay(cfg, model, workdir, log)
  print(paths.as_path(f"{workdir}/summary.md").read_text())
  print(f"per-item results: {workdir}/results.jsonl; plot: {workdir}/relay.png")


if __name__ == "__main__":
  cli.run(main)
