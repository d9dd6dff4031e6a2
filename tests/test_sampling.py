"""The jitted decode loop: greedy exactness, batching, stop tokens, sampling filters, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, to_ours
from diffmas_jax import model as model_lib
from diffmas_jax import sampling


@pytest.fixture(scope="module")
def tiny():
  return to_ours(make_hf_model("llama", seed=7))


def greedy_reference(weights, cfg, prompt, n):
  """Token-by-token argmax with full re-computation (no cache)."""
  seq = list(prompt)
  for _ in range(n):
    logits = model_lib.forward_no_cache(weights, cfg, jnp.asarray([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_greedy_equals_uncached_argmax(tiny):
  cfg, weights = tiny
  prompt = [5, 17, 99, 3, 42]
  sc = sampling.SamplingConfig(max_new_tokens=8)
  [out] = sampling.generate(weights, cfg, [prompt], sc, bucket=8)
  assert out == greedy_reference(weights, cfg, prompt, 8)


def test_left_padded_batch_equals_rows_alone(tiny):
  cfg, weights = tiny
  prompts = [[5, 17, 99, 3, 42], [7], [1, 2, 3]]
  sc = sampling.SamplingConfig(max_new_tokens=6)
  batched = sampling.generate(weights, cfg, prompts, sc, bucket=4)
  alone = [sampling.generate(weights, cfg, [p], sc, bucket=4)[0] for p in prompts]
  assert batched == alone


def test_stop_token_ends_row_and_is_stripped(tiny):
  cfg, weights = tiny
  prompt = [5, 17, 99, 3, 42]
  free = greedy_reference(weights, cfg, prompt, 6)
  stop = free[2]
  sc = sampling.SamplingConfig(max_new_tokens=6, stop_ids=(stop,), pad_id=0)
  [out] = sampling.generate(weights, cfg, [prompt], sc, bucket=8)
  assert out == free[:free.index(stop)]
  tokens, valid = sampling.left_pad([prompt], 0, 8)
  gen = sampling.prefill_and_decode(weights, cfg, jnp.asarray(tokens), jnp.asarray(valid),
                                    jax.random.key(0), sc, 16)
  n = int(gen.lengths[0])
  assert int(gen.tokens[0, n - 1]) == stop and np.all(np.asarray(gen.tokens[0, n:]) == 0)
  assert np.all(np.asarray(gen.logprobs[0, :n]) <= 0) and np.all(np.asarray(gen.logprobs[0, n:]) == 0)


def test_greedy_token_is_argmax_with_its_tie_rule(rng):
  """sampling.greedy_token (max, then the smallest index holding it) equals jnp.argmax,
  ties (first index wins) and all -inf rows included."""
  logits = rng.standard_normal((6, 257)).astype(np.float32)
  logits[1, [3, 200]] = 9.0  # tie: the first index wins
  logits[2, :] = 0.5  # all equal
  logits[3, :] = -np.inf
  logits[4, -1] = 50.0  # the last index
  got = jax.jit(sampling.greedy_token)(jnp.asarray(logits))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))
  assert got[1] == 3 and got[2] == 0 and got[4] == 256


def test_log_prob_and_entropy_against_float64(rng):
  """The decode loop's log p(token) and entropy (one exp per logit, log Z - sum(p z))
  against log-softmax in float64, from a flat row to one whose logits span 200 nats."""
  logits = rng.standard_normal((4, 3000)).astype(np.float32)
  logits[1] *= 40.0
  logits[2] = 0.0
  logits[3, 7] = 200.0
  tok = jnp.asarray([5, int(np.argmax(logits[1])), 0, 7])
  lp, ent = jax.jit(sampling._log_prob_and_entropy)(jnp.asarray(logits), tok)
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(lp), logp[np.arange(4), np.asarray(tok)], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), -(np.exp(logp) * logp).sum(-1), rtol=1e-4,
                             atol=1e-5)
  assert abs(float(ent[2]) - np.log(3000)) < 1e-4 and abs(float(ent[3])) < 1e-5


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = lambda sc: np.asarray(jax.vmap(lambda k: sampling.sample_token(logits, k, sc))(keys))[:, 0]
  assert set(draw(sampling.SamplingConfig(temperature=1.0, top_k=1))) == {0}
  assert set(draw(sampling.SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(sampling.SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 covers it
  assert set(draw(sampling.SamplingConfig(temperature=1.0, top_p=0.4))) == {0}
  freq = np.bincount(draw(sampling.SamplingConfig(temperature=1.0)), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  cold = np.bincount(draw(sampling.SamplingConfig(temperature=0.3)), minlength=4) / len(keys)
  assert cold[0] > 0.8  # low temperature sharpens


def test_seed_determinism(tiny):
  cfg, weights = tiny
  sc = sampling.SamplingConfig(max_new_tokens=12, temperature=1.5)
  a = sampling.generate(weights, cfg, [[1, 2, 3]], sc, seed=1)
  b = sampling.generate(weights, cfg, [[1, 2, 3]], sc, seed=1)
  c = sampling.generate(weights, cfg, [[1, 2, 3]], sc, seed=2)
  assert a == b and a != c


def test_empty_prompt_rejected():
  with pytest.raises(ValueError, match="non-empty"):
    sampling.left_pad([[1], []], 0)
