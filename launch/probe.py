"""Gradient probes through the trace vs agent depth: Proposition 3.1 measured.

  python -m launch.probe --config=configs/probe.py [--workdir=runs/probe]

Writes <workdir>/probes.jsonl (one row per model, trace_keep, K and agent, plus
summary rows with per-hop decay ratios) and probes.png (log-scale norms vs
depth, one line per mode), and prints the decay table.
"""

from absl import flags

from launch import cli

cli.define_run_flags("configs/probe.py[:tiny|test]", "runs/probe")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import dataclasses
  import time

  import jax

  from diffmas_jax import lora as lora_lib, multihost
  from diffmas_jax.config import tiny_config
  from diffmas_jax.params import init_weights
  from diffmas_jax.research import probe_run
  from diffmas_jax.tasks import training_data

  cfg, pc = FLAGS.config, FLAGS.config.probe
  workdir, _ = cli.start_run("probe")
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)
  examples = training_data.math_train(int(pc.num_examples), int(cfg.train.data_seed))
  model = cli.load_config_model(cfg.model)  # the tiny model reuses its tokenizer
  lora_cfg = lora_lib.LoraConfig.from_config(cfg.lora)
  rows = []
  for name in pc.models:
    if name == "embedded":
      weights, mcfg = model.weights, model.cfg
    elif name == "tiny":
      mcfg = tiny_config("llama", vocab_size=model.cfg.vocab_size, hidden_size=int(pc.tiny_hidden),
                         num_layers=int(pc.tiny_layers), num_heads=4, num_kv_heads=2,
                         head_dim=int(pc.tiny_hidden) // 4, intermediate_size=2 * int(pc.tiny_hidden),
                         max_position_embeddings=8192)
      weights = init_weights(mcfg, jax.random.key(pc.seed), std=float(pc.tiny_std))
    else:
      raise ValueError(f"probe.models entry {name!r}; expected 'embedded' or 'tiny'")
    rows += probe_run.sweep(weights, mcfg, model.tokenizer, examples, pc, lora_cfg, workdir, name,
                            log)
  if not multihost.is_main():
    return
  png = probe_run.plot(rows, f"{workdir}/probes.png",
                       f"solver-loss gradient through the trace, m = {pc.latent_steps}")
  print("\n" + probe_run.decay_table(rows))
  print(f"rows: {workdir}/probes.jsonl; plot: {png}")


if __name__ == "__main__":
  cli.run(main)
