"""Forward-pass parity with transformers and KV-cache equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model, to_ours
from diffmas_jax import model as model_lib
from diffmas_jax.kv_cache import KVCache

TOL = 1e-4


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_full_forward_matches_transformers(family_model, rng):
  _, hf, cfg, weights = family_model
  tokens = rng.randint(0, cfg.vocab_size, (2, 13))
  ours = model_lib.forward_no_cache(weights, cfg, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(ours), hf_logits(hf, tokens), atol=TOL, rtol=0)


def test_prefill_then_decode_matches_transformers(family_model, rng):
  _, hf, cfg, weights = family_model
  tokens = rng.randint(0, cfg.vocab_size, (2, 12))
  ref = hf_logits(hf, tokens)
  step = jax.jit(lambda c, t: model_lib.forward(weights, cfg, c, tokens=t))
  cache = KVCache.init(cfg, 2, 16)
  out = step(cache, jnp.asarray(tokens[:, :7]))
  got = [np.asarray(out.logits)]
  cache = out.cache
  for i in range(7, 12):
    out = step(cache, jnp.asarray(tokens[:, i:i + 1]))
    cache = out.cache
    got.append(np.asarray(out.logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=TOL, rtol=0)
  assert int(cache.end) == 12
  np.testing.assert_array_equal(np.asarray(cache.pos[:, :12]), np.tile(np.arange(12), (2, 1)))


def test_tied_embeddings_match_transformers(rng):
  hf = make_hf_model("qwen3", tie=True, seed=3)
  cfg, weights = to_ours(hf)
  assert cfg.tie_word_embeddings and weights.lm_head is None
  tokens = rng.randint(0, cfg.vocab_size, (1, 9))
  np.testing.assert_allclose(np.asarray(model_lib.forward_no_cache(weights, cfg, jnp.asarray(tokens))),
                             hf_logits(hf, tokens), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def qwen3():
  return to_ours(make_hf_model("qwen3", seed=1))


def test_three_appended_segments_equal_one_forward(qwen3, rng):
  cfg, weights = qwen3
  segments = [rng.randint(0, cfg.vocab_size, (2, n)) for n in (5, 3, 6)]
  cache = KVCache.init(cfg, 2, 20)
  logits = []
  for seg in segments:
    out = model_lib.forward(weights, cfg, cache, tokens=jnp.asarray(seg))
    cache = out.cache
    logits.append(np.asarray(out.logits))
  full = model_lib.forward_no_cache(weights, cfg, jnp.asarray(np.concatenate(segments, axis=1)))
  np.testing.assert_allclose(np.concatenate(logits, axis=1), np.asarray(full), atol=TOL, rtol=0)


def test_embeds_equal_tokens(qwen3, rng):
  cfg, weights = qwen3
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 7)))
  cache = KVCache.init(cfg, 2, 7)
  by_tokens = model_lib.forward(weights, cfg, cache, tokens=tokens)
  by_embeds = model_lib.forward(weights, cfg, cache, embeds=weights.embed[tokens])
  np.testing.assert_array_equal(np.asarray(by_tokens.logits), np.asarray(by_embeds.logits))
  np.testing.assert_array_equal(np.asarray(by_tokens.cache.k), np.asarray(by_embeds.cache.k))


def test_left_padded_batch_equals_rows_alone(qwen3, rng):
  cfg, weights = qwen3
  rows = [rng.randint(1, cfg.vocab_size, n) for n in (9, 4, 6)]
  width = 9
  tokens = np.zeros((3, width), np.int32)
  valid = np.zeros((3, width), bool)
  for r, row in enumerate(rows):
    tokens[r, width - len(row):] = row
    valid[r, width - len(row):] = True
  cache = KVCache.init(cfg, 3, width + 3)
  out = model_lib.forward(weights, cfg, cache, tokens=jnp.asarray(tokens), valid=jnp.asarray(valid))
  # Continue with two decode steps so the padded cache is exercised as history too.
  nxt = rng.randint(0, cfg.vocab_size, (3, 2))
  out2 = model_lib.forward(weights, cfg, out.cache, tokens=jnp.asarray(nxt))
  for r, row in enumerate(rows):
    alone = model_lib.forward_no_cache(weights, cfg, jnp.asarray(np.concatenate([row, nxt[r]])[None]))
    alone = np.asarray(alone)[0]
    np.testing.assert_allclose(np.asarray(out.logits)[r, width - len(row):], alone[:len(row)],
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out2.logits)[r], alone[len(row):], atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.cache.next_pos), [9, 4, 6])


def test_truncated_cache_equals_running_on_kept_tokens(qwen3, rng):
  """Keep a subset of slots (in any order): same as a cache that only ever held them.

  Kept tokens sit at non-contiguous positions; the dropped slots were written
  after them, so the kept K/V never attended to anything dropped.
  """
  cfg, weights = qwen3
  kept_pos = np.array([[0, 1, 2, 6, 7, 9]])
  kept = rng.randint(0, cfg.vocab_size, (1, 6))
  junk = rng.randint(0, cfg.vocab_size, (1, 4))
  query = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 2)))
  qpos = jnp.asarray([[10, 11]])

  ref_cache = model_lib.forward(weights, cfg, KVCache.init(cfg, 1, 8), tokens=jnp.asarray(kept),
                                positions=jnp.asarray(kept_pos)).cache
  ref = model_lib.forward(weights, cfg, ref_cache, tokens=query, positions=qpos).logits

  cache = model_lib.forward(weights, cfg, KVCache.init(cfg, 1, 16), tokens=jnp.asarray(kept),
                            positions=jnp.asarray(kept_pos)).cache
  cache = model_lib.forward(weights, cfg, cache, tokens=jnp.asarray(junk)).cache
  assert int(cache.end) == 10
  shuffled = np.array([3, 0, 5, 1, 4, 2])  # slot order must not matter
  truncated = cache.gather(jnp.asarray(shuffled))
  assert int(truncated.end) == 6
  np.testing.assert_array_equal(np.asarray(truncated.pos)[0, :6], kept_pos[0, shuffled])
  got = model_lib.forward(weights, cfg, truncated, tokens=query, positions=qpos).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=TOL, rtol=0)

  # Masking the junk slots in place (no compaction) is the same computation.
  mask = np.zeros((1, 16), bool)
  mask[0, :6] = True
  got2 = model_lib.forward(weights, cfg, cache.keep(jnp.asarray(mask)), tokens=query,
                           positions=qpos).logits
  np.testing.assert_allclose(np.asarray(got2), np.asarray(ref), atol=TOL, rtol=0)
  # Control: with the junk kept, the answer differs (the test can fail).
  with_junk = model_lib.forward(weights, cfg, cache, tokens=query, positions=qpos).logits
  assert np.abs(np.asarray(with_junk) - np.asarray(ref)).max() > 1e-3


def test_scoring_without_append_equals_appending(qwen3, rng):
  cfg, weights = qwen3
  prefix, query = (jnp.asarray(rng.randint(0, cfg.vocab_size, (2, n))) for n in (5, 4))
  exact = model_lib.forward(weights, cfg, KVCache.init(cfg, 2, 5), tokens=prefix).cache
  roomy = model_lib.forward(weights, cfg, KVCache.init(cfg, 2, 9), tokens=prefix).cache
  scored = model_lib.forward(weights, cfg, exact, tokens=query, append=False)
  appended = model_lib.forward(weights, cfg, roomy, tokens=query)
  np.testing.assert_allclose(np.asarray(scored.logits), np.asarray(appended.logits), atol=1e-5)
  assert scored.cache is exact and int(scored.cache.end) == 5


def test_context_cache_equals_one_cache(qwen3, rng):
  """Steps written into a small cache with the trace as read-only context (latent
  steps do this) equal the same steps appended to one cache."""
  cfg, weights = qwen3
  prefix = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 6)))
  steps = [jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 1))) for _ in range(3)]
  big = model_lib.forward(weights, cfg, KVCache.init(cfg, 2, 9), tokens=prefix).cache
  context = model_lib.forward(weights, cfg, KVCache.init(cfg, 2, 6), tokens=prefix).cache
  work = KVCache.init(cfg, 2, 3)
  for tok in steps:
    one = model_lib.forward(weights, cfg, big, tokens=tok)
    two = model_lib.forward(weights, cfg, work, tokens=tok, context=context)
    np.testing.assert_allclose(np.asarray(two.logits), np.asarray(one.logits), atol=1e-5)
    big, work = one.cache, two.cache
  np.testing.assert_allclose(np.asarray(work.k), np.asarray(big.k[..., 6:, :]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(work.pos), np.asarray(big.pos[:, 6:]))


@pytest.mark.parametrize("remat", ["full", "dots", "attn", "attn_mlp"])
def test_remat_keeps_values_and_gradients(qwen3, rng, remat):
  cfg, weights = qwen3
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 6)))

  def loss(w, c):
    return jnp.mean(model_lib.forward_no_cache(w, c, tokens) ** 2)

  g_ref = jax.grad(loss)(weights, cfg)
  g_remat = jax.grad(loss)(weights, cfg.replace(remat=remat))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_remat_attn_keeps_softmax_statistics(qwen3, rng):
  """Layer remat `attn` saves the softmax row max and sum with the attention output:
  the backward pass rescores once (as without remat) instead of re-running the
  attention forward first."""
  cfg, weights = qwen3
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 6)))

  def exps(remat):
    loss = lambda w: jnp.mean(model_lib.forward_no_cache(w, cfg.replace(remat=remat), tokens))
    return jax.jit(jax.grad(loss)).lower(weights).as_text().count("stablehlo.exponential")

  # `full` re-runs the layer forward in the backward pass: its softmax and SiLU
  # exponentials; `attn` and `attn_mlp` only the SiLU's.
  assert exps("attn") == exps("attn_mlp") == exps("full") - 1


def test_cache_overflow_raises(qwen3):
  cfg, weights = qwen3
  with pytest.raises(ValueError, match="KV cache overflow"):
    model_lib.forward(weights, cfg, KVCache.init(cfg, 1, 4), tokens=jnp.zeros((1, 5), jnp.int32))


def test_bf16_params_run_close_to_f32(qwen3, rng):
  cfg, weights = qwen3
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 8)))
  w16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights)
  out16 = model_lib.forward_no_cache(w16, cfg.replace(dtype="bfloat16"), tokens)
  out32 = model_lib.forward_no_cache(weights, cfg, tokens)
  assert out16.dtype == jnp.float32  # logits always f32
  assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1


def test_chunked_causal_attention_equals_one_block(rng):
  """Query chunks over a read-only context and the new tokens equal one attention
  block, values and gradients (prefills and the train step's solver pass run so)."""
  from diffmas_jax import layers as L
  b, t, s, k_heads, g, e = 2, 11, 5, 2, 3, 8
  q = jnp.asarray(rng.randn(b, t, k_heads * g, e), jnp.float32)
  k, v, ck, cv = (jnp.asarray(rng.randn(b, k_heads, n, e), jnp.float32) for n in (t, t, s, s))
  idx = np.arange(t)[None]
  pos = jnp.asarray(np.where(idx >= [[0], [3]], s + idx - [[0], [3]], -1))  # row 1 left padded
  ctx_pos = jnp.asarray([[0, 1, 2, 3, -1], [0, 1, -1, 2, 3]])  # an empty context slot each
  mask, ctx_mask = L.attention_mask(pos, pos), L.attention_mask(pos, ctx_pos)
  real = np.asarray(pos) >= 0  # padding queries attend to nothing; their output is unused
  weight = jnp.asarray(rng.randn(b, t, k_heads * g, e) * real[..., None, None], jnp.float32)

  def full(q, k, v, ck, cv):
    return L.attention(q, [(ck, cv, ctx_mask), (k, v, mask)])

  def chunked(q, k, v, ck, cv):
    return L.causal_attention(q, k, v, mask, [(ck, cv, ctx_mask)], chunk=4)

  np.testing.assert_allclose(np.asarray(chunked(q, k, v, ck, cv))[real],
                             np.asarray(full(q, k, v, ck, cv))[real], atol=1e-6)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weight), argnums=range(5))(q, k, v, ck, cv)
           for f in (full, chunked)]
  for a, c in zip(*grads):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5)


def test_positions_out_of_order_are_refused(qwen3):
  cfg, weights = qwen3
  cache = KVCache.init(cfg, 1, 8)
  with pytest.raises(ValueError, match="positions of row 0 do not increase"):
    model_lib.forward(weights, cfg, cache, tokens=jnp.ones((1, 3), jnp.int32),
                      positions=jnp.asarray([[0, 2, 1]]))


def test_fresh_cache_prefill_equals_general_path(qwen3, rng):
  cfg, weights = qwen3
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 9)))
  cache = KVCache.init(cfg, 2, 12)
  general = model_lib.forward(weights, cfg, cache, tokens=tokens)
  fresh = model_lib.forward(weights, cfg, cache, tokens=tokens, fresh_cache=True)
  np.testing.assert_allclose(np.asarray(fresh.logits), np.asarray(general.logits), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fresh.cache.k), np.asarray(general.cache.k))
