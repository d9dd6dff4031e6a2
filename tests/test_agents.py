"""Agent stage operator: realignment, latent steps, left padding, scanned stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax import agents
from diffmas_jax import model as model_lib
from diffmas_jax.config import tiny_config
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.params import init_weights

CFG = tiny_config("qwen3")
T, M = 6, 3
# Jitted once per shape: eager scans would recompile on every call.
stage = jax.jit(agents.agent_stage, static_argnums=(1, 6))
forward = jax.jit(model_lib.forward, static_argnums=(1,), static_argnames=("logits",))
latent_steps = jax.jit(agents.latent_steps, static_argnums=(1, 5))


@pytest.fixture(scope="module")
def weights():
  # std 0.3: logits and hidden states far from ties, so comparisons are sharp.
  return init_weights(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def realigner(weights):
  return agents.make_realigner(weights)


def _prompts(n, b=1, t=T, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, CFG.vocab_size, (n, b, t)))


def test_realigner_is_the_f32_ridge_solve(weights, realigner):
  w_in = np.asarray(weights.embed, np.float64)
  w_out = np.asarray(weights.lm_head, np.float64).T  # [V, D]
  d = w_in.shape[1]
  expected = np.linalg.solve(w_out.T @ w_out + 1e-5 * np.eye(d), w_out.T @ w_in)
  np.testing.assert_allclose(np.asarray(realigner.w_a), expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(float(realigner.target_norm),
                             np.linalg.norm(w_in, axis=1).mean(), rtol=1e-5)


def test_realign_with_tied_embeddings_is_a_rescaled_identity():
  tied = init_weights(tiny_config("qwen3", tie_word_embeddings=True), jax.random.key(1), std=0.3)
  r = agents.make_realigner(tied)
  np.testing.assert_allclose(np.asarray(r.w_a), np.eye(CFG.hidden_size), atol=1e-3)


def test_realign_off_keeps_the_norm_rescale(weights):
  r = agents.make_realigner(weights, enabled=False)
  np.testing.assert_array_equal(np.asarray(r.w_a), np.eye(CFG.hidden_size))
  h = jnp.asarray(np.random.RandomState(0).randn(3, CFG.hidden_size) * 50, jnp.float32)
  e = agents.realign(h, r)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), float(r.target_norm),
                             rtol=1e-5)
  # Direction unchanged: only the norm moves.
  cos = np.sum(np.asarray(e) * np.asarray(h), -1) / (np.linalg.norm(e, axis=-1) *
                                                       np.linalg.norm(h, axis=-1))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_latent_steps_equal_one_forward_over_the_realigned_inputs(weights, realigner):
  """Appending m latent steps == one fresh forward over [prompt embeds; e_1..e_m]."""
  tokens = _prompts(1)[0]
  cache = KVCache.init(CFG, 1, T + M)
  out = forward(weights, CFG, cache, tokens=tokens, logits="none")
  cache, h, embeds = out.cache, out.hidden[:, -1], []
  for _ in range(M):  # one step at a time, recording each realigned input
    embeds.append(agents.realign(h, realigner))
    cache, h = latent_steps(weights, CFG, cache, h, realigner, 1)
  staged, h_staged = stage(weights, CFG, KVCache.init(CFG, 1, T + M), tokens,
                                        jnp.ones_like(tokens, bool), realigner, M)
  np.testing.assert_allclose(np.asarray(staged.k), np.asarray(cache.k), atol=1e-4)
  np.testing.assert_allclose(np.asarray(h_staged), np.asarray(h), atol=1e-4)
  x = jnp.concatenate([weights.embed[tokens], jnp.stack(embeds, axis=1)], axis=1)
  one = forward(weights, CFG, KVCache.init(CFG, 1, T + M), embeds=x, logits="none")
  np.testing.assert_allclose(np.asarray(one.cache.k), np.asarray(staged.k), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(staged.pos), np.arange(T + M)[None])


def test_zero_latent_steps_keep_the_prompt(weights, realigner):
  tokens = _prompts(1)[0]
  cache, h = stage(weights, CFG, KVCache.init(CFG, 1, T), tokens,
                                jnp.ones_like(tokens, bool), realigner, 0)
  ref = forward(weights, CFG, KVCache.init(CFG, 1, T), tokens=tokens, logits="none")
  assert int(cache.end) == T and int(jnp.sum(cache.pos >= 0)) == T
  np.testing.assert_allclose(np.asarray(h), np.asarray(ref.hidden[:, -1]), atol=1e-6)


def test_left_padded_rows_roll_out_from_their_own_last_token(weights, realigner):
  lengths = (T, 3)
  full = _prompts(1, b=2)[0]
  valid = jnp.asarray(np.arange(T)[None] >= T - np.asarray(lengths)[:, None])
  tokens = jnp.where(valid, full, 0)
  batched, h = stage(weights, CFG, KVCache.init(CFG, 2, T + M), tokens, valid,
                                  realigner, M)
  for r, n in enumerate(lengths):
    alone, h_alone = stage(weights, CFG, KVCache.init(CFG, 1, n + M),
                                        full[r:r + 1, T - n:], jnp.ones((1, n), bool), realigner, M)
    keep = np.asarray(batched.pos[r]) >= 0
    assert keep.sum() == n + M
    np.testing.assert_allclose(np.asarray(batched.k[:, r][:, :, keep]), np.asarray(alone.k[:, 0]),
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(batched.pos[r])[keep], np.asarray(alone.pos[0]))
    np.testing.assert_allclose(np.asarray(h[r]), np.asarray(h_alone[0]), atol=1e-4)


def test_scanned_stages_equal_chained_stages_and_hook_sees_agent_index(weights, realigner):
  a = 3
  tokens = _prompts(a, b=2)
  valid = jnp.ones_like(tokens, bool)
  cap = a * (T + M)
  seen = []

  def hook(cache, j):
    seen.append(j)  # traced once: the scan body is traced a single time
    return cache

  scanned, hs = agents.build_trace(weights, CFG, KVCache.init(CFG, 2, cap), tokens, valid,
                                   realigner, M, before_stage=hook)
  assert len(seen) == 1
  cache = KVCache.init(CFG, 2, cap)
  for j in range(a):
    cache, h = stage(weights, CFG, cache, tokens[j], valid[j], realigner, M)
    np.testing.assert_allclose(np.asarray(hs[j]), np.asarray(h), atol=1e-4)
  np.testing.assert_allclose(np.asarray(scanned.k), np.asarray(cache.k), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(scanned.pos), np.asarray(cache.pos))


def test_more_agents_do_not_grow_the_program(weights, realigner):
  """lax.scan over agents: the traced program is the same size for 1 or 5 agents."""

  def size(a):
    tokens = _prompts(a)
    fn = lambda c: agents.build_trace(weights, CFG, c, tokens, jnp.ones_like(tokens, bool),
                                      realigner, M)
    return len(jax.make_jaxpr(fn)(KVCache.init(CFG, 1, a * (T + M))).eqns)

  assert size(1) == size(5)
