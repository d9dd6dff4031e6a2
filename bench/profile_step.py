"""Where a decode step's time goes: XLA:CPU's own per-operation trace (jax.profiler).

  python -m bench.profile_step              # batch 1, 200-token cache, embedded model
  python -m bench.profile_step --batch=8 --top=30

Runs one jitted single-token `forward` (the decode / latent-step shape) on the
per-layer inference layout, traces `--steps` calls and prints each XLA
operation's time per step (summed over the layer loop), its calls per step and
the read bandwidth a weight-sized matmul reached. Names are the compiled HLO's
(`cond.*`: one per-layer matrix product; `dot.*`: the LM head;
`*_fusion`: elementwise work and copies), so a copy that should not be there
shows up by name.
"""

from __future__ import annotations

from absl import flags

from bench import xla_trace
from launch import cli

flags.DEFINE_integer("batch", 1, "Rows decoded per step.")
flags.DEFINE_integer("context", 200, "Filled cache slots before the step.")
flags.DEFINE_integer("steps", 20, "Traced steps.")
flags.DEFINE_integer("top", 20, "Operations printed.")
flags.DEFINE_enum("cache", "transposed_keys", ["transposed_keys", "by_layer", "stacked"],
                  "KV cache layout: per-layer buffers with keys stored [B, K, Dh, S] (what "
                  "decode loops use), per-layer buffers, or stacked.")
flags.DEFINE_string("model", "embedded:smollm2-135m-instruct", "Model source.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from diffmas_jax import kv_cache, model as model_lib
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import check_source

  cli.check_all(lambda: check_source(FLAGS.model))
  m = cli.load_reported(FLAGS.model, inference=True)
  cfg, weights = m.cfg, m.weights
  b = FLAGS.batch
  cache = KVCache.init(cfg, b, FLAGS.context + 128)
  prefill = jax.jit(lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t, fresh_cache=True,
                                                      logits="none").cache)
  cache = prefill(weights, cache, jnp.ones((b, FLAGS.context), jnp.int32))
  if FLAGS.cache != "stacked":
    cache = kv_cache.by_layer(cache, transpose_keys=FLAGS.cache == "transposed_keys")
  token = jnp.ones((b, 1), jnp.int32)
  step = jax.jit(lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t, logits="last").logits)
  for _ in range(3):
    step(weights, cache, token).block_until_ready()
  hlo = step.lower(weights, cache, token).compile().as_text()
  wall, rows, trace_dir = xla_trace.op_rows(lambda: step(weights, cache, token), hlo,
                                            FLAGS.steps)
  print(f"batch {b}, {FLAGS.context}-slot context: {wall * 1e3:.2f} ms per step (traced)")
  print(xla_trace.format_rows(rows, FLAGS.top, trace_dir))


if __name__ == "__main__":
  cli.run(main)
