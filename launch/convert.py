"""Writes a model (by default the embedded SmolLM2-135M-Instruct) as an HF directory.

  python -m launch.convert --out=/tmp/smollm2_hf
  python -m launch.convert --source=/path/to/hf_dir --dtype=bfloat16 --out=/tmp/copy

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` and
with `--config.model.source=out` here.
"""

import os

from absl import flags

from launch import cli

flags.DEFINE_string("source", "embedded:smollm2-135m-instruct", "Model source (see loading.py).")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
flags.DEFINE_integer("max_shard_mb", 0, "Shard safetensors above this size (0 = one file).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from diffmas_jax.config import DTYPES
  from diffmas_jax.loading import check_source, export_hf_dir, load_model
  cli.check_all(
      lambda: check_source(FLAGS.source),
      lambda: cli.check_writable_dir(os.path.dirname(os.path.abspath(FLAGS.out)), "--out"),
      lambda: cli.check_value(os.path.isdir(FLAGS.out) or not os.path.lexists(FLAGS.out),
                              f"--out={FLAGS.out} exists and is not a directory; choose another "
                              "output path"),
      lambda: cli.check_value(FLAGS.dtype in DTYPES, f"--dtype={FLAGS.dtype}: choose one of "
                              f"{DTYPES}"),
      lambda: cli.check_value(FLAGS.max_shard_mb >= 0, f"--max_shard_mb={FLAGS.max_shard_mb}: "
                              "must be >= 0 (0 = one file)"))
  m = load_model(FLAGS.source, dtype=FLAGS.dtype)
  print(export_hf_dir(m, FLAGS.out, FLAGS.max_shard_mb * 2**20 or None))


if __name__ == "__main__":
  cli.run(main)
