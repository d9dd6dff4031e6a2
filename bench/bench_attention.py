"""Multi-token attention in query chunks vs one block (in-process A/B, forward + backward).

  python -m bench.bench_attention                      # the train step's solver pass
  python -m bench.bench_attention --queries=1024 --context=0 --chunks=0,128,256

`layers.causal_attention` runs T new tokens' queries in chunks of `layers.QUERY_CHUNK`
(128): each chunk attends to the read-only context and to the new keys up to its own
end. The default shape is one layer of `bench.bench_train`'s solver pass: 634 queries
(solver prompt + 512 targets) over a 399-slot trace (3 agents x (123 + 10)) and
themselves, SmolLM2's 9 query / 3 key-value heads of 64. Every chunk size (0 = one
block, the code before chunking) runs the same jitted `jax.vjp` (forward + backward
w.r.t. q, k, v), interleaved round by round; prints ms per call as median [min, max],
each round's ratio one-block / chunked, and the largest output difference.
"""

from __future__ import annotations

import time

from absl import flags

from bench.stats import fmt, ratios
from launch import cli

flags.DEFINE_integer("queries", 634, "New tokens T (queries).")
flags.DEFINE_integer("context", 399, "Read-only context slots attended before them.")
flags.DEFINE_list("chunks", ["0", "64", "128", "256"], "Queries per block; 0 = one block.")
flags.DEFINE_integer("rounds", 10, "Interleaved rounds.")
FLAGS = flags.FLAGS

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def main(argv):
  del argv
  cli.check_all(
      lambda: cli.check_value(FLAGS.queries >= 1 and FLAGS.context >= 0 and FLAGS.rounds >= 1,
                              f"--queries={FLAGS.queries} --context={FLAGS.context} "
                              f"--rounds={FLAGS.rounds}: need queries >= 1, context >= 0, "
                              "rounds >= 1"),
      lambda: cli.check_value(all(c.isdigit() for c in FLAGS.chunks),
                              f"--chunks={','.join(FLAGS.chunks)}: give integers >= 0 "
                              "(0 = one block)"))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from diffmas_jax import layers as L

  t, c = FLAGS.queries, FLAGS.context
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, d_out = arr(1, t, HEADS, HEAD_DIM), arr(1, t, HEADS, HEAD_DIM)
  k, v, ck, cv = (arr(1, KV_HEADS, n, HEAD_DIM) for n in (t, t, c, c))
  pos = jnp.arange(c, c + t)[None]
  mask, ctx_mask = L.attention_mask(pos, pos), L.attention_mask(pos, jnp.arange(c)[None])
  context = [(ck, cv, ctx_mask)] if c else []

  def compiled(chunk):
    def fwd_bwd(q, k, v):
      attend = lambda q, k, v: L.causal_attention(q, k, v, mask, context, chunk=chunk or t)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(d_out)
    return jax.jit(fwd_bwd).lower(q, k, v).compile()

  chunks = [int(x) for x in FLAGS.chunks]
  fns = {chunk: compiled(chunk) for chunk in chunks}
  outs = {chunk: np.asarray(f(q, k, v)[0]) for chunk, f in fns.items()}
  times = {chunk: [] for chunk in chunks}
  for _ in range(FLAGS.rounds):
    for chunk, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times[chunk].append(1e3 * (time.perf_counter() - start))
  base = times[chunks[0]]
  print(f"\n## attention forward + backward, {t} queries over {c} context slots + themselves, "
        f"{HEADS}/{KV_HEADS} heads of {HEAD_DIM}, {FLAGS.rounds} interleaved rounds")
  print(f"| queries per block | ms per call | {chunks[0] or 'one block'} / this, per round | "
        "max |out - first| |\n|---|---|---|---|")
  for chunk in chunks:
    diff = float(np.max(np.abs(outs[chunk] - outs[chunks[0]])))
    print(f"| {chunk or 'one block'} | {fmt(times[chunk], 2)} | "
          f"{fmt(ratios(base, times[chunk]), 2, 'x')} | {diff:.1e} |")


if __name__ == "__main__":
  cli.run(main)
