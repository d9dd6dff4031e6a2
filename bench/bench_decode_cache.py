"""Decode loop on the stacked cache vs per-layer K/V buffers (in-process A/B/C).

  python -m bench.bench_decode_cache                    # batches 1, 8, 24
  python -m bench.bench_decode_cache --batches=8 --rounds=20

`sampling.decode` runs its loop on per-layer K/V buffers (`kv_cache.by_layer`):
with the stacked `[L, B, K, S, Dh]` cache every decode step slices (copies) each
layer's keys and values before attending to them. By default the per-layer keys
are also stored transposed, `[B, K, Dh, S]` (`transpose_keys`), so a step's scores
are a product wide along the slots. The three layouts decode the same
prompt-filled cache with the same per-layer weights, interleaved round by round in
one process (the host's drift hits all alike); each round's ratio is the other
layout's ms per token over this one's, printed as median [q25, q75] and [min, max].
"""

from __future__ import annotations

import time

from absl import flags

from launch import cli

flags.DEFINE_list("batches", ["1", "8", "24"], "Rows decoded per step.")
flags.DEFINE_integer("context", 200, "Filled cache slots before decoding.")
flags.DEFINE_integer("new_tokens", 32, "Greedy tokens per decode call (no stop token).")
flags.DEFINE_integer("rounds", 12, "Interleaved rounds per batch size.")
flags.DEFINE_string("model", "embedded:smollm2-135m-instruct", "Model source.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffmas_jax import model as model_lib, sampling
  from diffmas_jax.kv_cache import KVCache
  from diffmas_jax.loading import check_source

  batches = [int(b) for b in FLAGS.batches if b.isdigit() and int(b) > 0]
  cli.check_all(lambda: check_source(FLAGS.model), lambda: cli.check_value(
      len(batches) == len(FLAGS.batches) > 0,
      f"--batches={','.join(FLAGS.batches)}: expected positive integers, e.g. --batches=1,8,24"))
  m = cli.load_reported(FLAGS.model, inference=True)
  cfg, weights = m.cfg, m.weights
  n = FLAGS.new_tokens
  sc = sampling.SamplingConfig(max_new_tokens=n)
  prefill = jax.jit(lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t, fresh_cache=True,
                                                      logits="last"))
  layouts = {"stacked": (False, False), "by-layer": (True, False),
             "by-layer, keys transposed": (True, True)}
  pairs = [("stacked", "by-layer"), ("by-layer", "by-layer, keys transposed")]
  print("| batch | " + " | ".join(f"{name} ms/token" for name in layouts) + " | " +
        " | ".join(f"{new} vs {old}: median [q25, q75], [min, max]" for old, new in pairs) + " |")
  print("|---" * (1 + len(layouts) + len(pairs)) + "|")
  for b in batches:
    out = prefill(weights, KVCache.init(cfg, b, FLAGS.context + n),
                  jnp.ones((b, FLAGS.context), jnp.int32))
    variants = {
        name: jax.jit(lambda w, c, l, layout=layout: sampling.decode(
            w, cfg, c, l, jax.random.key(0), sc, by_layer=layout[0],
            transpose_keys=layout[1]).tokens)
        for name, layout in layouts.items()}
    tokens = {k: np.asarray(f(weights, out.cache, out.logits[:, 0])) for k, f in variants.items()}
    if any(not np.array_equal(tokens["stacked"], t) for t in tokens.values()):
      raise SystemExit("error: the cache layouts decoded different tokens")
    ms = {k: [] for k in variants}
    for _ in range(FLAGS.rounds):
      for k, f in variants.items():
        start = time.perf_counter()
        f(weights, out.cache, out.logits[:, 0]).block_until_ready()
        ms[k].append((time.perf_counter() - start) * 1e3 / n)
    cells = [f"{np.median(ms[k]):.1f}" for k in layouts]
    for old, new in pairs:
      ratio = np.asarray(ms[old]) / np.asarray(ms[new])
      q25, q75 = np.quantile(ratio, [0.25, 0.75])
      cells.append(f"{np.median(ratio):.2f}x [{q25:.2f}, {q75:.2f}], "
                   f"[{ratio.min():.2f}, {ratio.max():.2f}]")
    print(f"| {b} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
  cli.run(main)
