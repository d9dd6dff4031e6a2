"""Hand-written backward passes (attention, LoRA low-rank product) against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax import layers as L
from diffmas_jax import model as model_lib


def _reference_attention(q, blocks):
  """Textbook GQA attention over the concatenated blocks, differentiated by JAX."""
  k = jnp.concatenate([b[0] for b in blocks], axis=2)
  v = jnp.concatenate([b[1] for b in blocks], axis=2)
  mask = jnp.concatenate([b[2] for b in blocks], axis=2)
  groups = q.shape[2] // k.shape[1]
  k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
  s = jnp.einsum("bthe,bhse->bhts", q / np.sqrt(q.shape[-1]), k)
  p = jax.nn.softmax(jnp.where(mask[:, None], s, L.MASK_VALUE), axis=-1)
  return jnp.einsum("bhts,bhse->bthe", p, v)


@pytest.mark.parametrize("t", [1, 5])
def test_attention_values_and_gradients_match_autodiff(t):
  b, heads, kv_heads, s, e = 2, 6, 2, 7, 8
  keys = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(keys[0], (b, t, heads, e))
  kc, vc = (jax.random.normal(k, (b, kv_heads, s, e)) for k in keys[1:3])
  kn, vn = (jax.random.normal(k, (b, kv_heads, t, e)) for k in keys[3:5])
  cache_mask = jax.random.bernoulli(keys[5], 0.7, (b, t, s))
  self_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  # A query that sees nothing (padding): uniform average, no gradient to q or k.
  cache_mask, self_mask = cache_mask.at[0, -1].set(False), self_mask.at[0, -1].set(False)
  w = jax.random.normal(keys[6], (b, t, heads, e))

  def loss(fn, q, kc, vc, kn, vn):
    return jnp.sum(w * fn(q, [(kc, vc, cache_mask), (kn, vn, self_mask)]))

  args = (q, kc, vc, kn, vn)
  np.testing.assert_allclose(L.attention(q, [(kc, vc, cache_mask), (kn, vn, self_mask)]),
                             _reference_attention(q, [(kc, vc, cache_mask), (kn, vn, self_mask)]),
                             atol=1e-5)
  ours = jax.grad(lambda *a: loss(L.attention, *a), argnums=range(5))(*args)
  ref = jax.grad(lambda *a: loss(_reference_attention, *a), argnums=range(5))(*args)
  for name, a, r in zip(("q", "k_cache", "v_cache", "k_new", "v_new"), ours, ref):
    np.testing.assert_allclose(a, r, atol=1e-5, err_msg=name)
  assert np.abs(np.asarray(ours[0])).max() > 1e-3  # gradients are not trivially zero


def test_low_rank_gradients_match_autodiff():
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (9, 6))
  a = jax.random.normal(keys[1], (6, 3))
  b = jax.random.normal(keys[2], (3, 5))
  g = jax.random.normal(keys[3], (9, 5))
  plain = lambda x, a, b: 2.0 * (x @ a) @ b
  np.testing.assert_allclose(model_lib._low_rank(x, a, b, 2.0), plain(x, a, b), atol=1e-5)
  ours = jax.vjp(lambda *z: model_lib._low_rank(*z, 2.0), x, a, b)[1](g)
  ref = jax.vjp(plain, x, a, b)[1](g)
  for name, o, r in zip("xab", ours, ref):
    np.testing.assert_allclose(o, r, atol=1e-4, err_msg=name)
