"""Per-layer weight buffers (model.per_layer): the unrolled layer loop equals the layer scan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, to_ours
from diffmas_jax import agents, kv_cache, lora as lora_lib, sampling
from diffmas_jax import model as model_lib
from diffmas_jax.kv_cache import KVCache


@pytest.fixture(scope="module")
def qwen3():
  return to_ours(make_hf_model("qwen3", seed=4))


def _close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_layout_round_trip(qwen3):
  cfg, weights = qwen3
  per = model_lib.per_layer(weights, packed=False)
  assert isinstance(per.layers, tuple) and len(per.layers) == cfg.num_layers
  d, h, dh = weights.layers.q.shape[1:]
  kv = cfg.num_kv_heads
  # q|k|v fused per kv head: [D, K, G + 2, Dh]; gate|up: [D, 2F].
  assert per.layers[1].q.shape == (d, kv, h // kv + 2, dh)
  assert per.layers[1].k is None and per.layers[1].v is None and per.layers[1].up is None
  np.testing.assert_array_equal(per.layers[1].q[:, 1, -2], weights.layers.k[1][:, 1])
  np.testing.assert_array_equal(per.layers[1].q[:, 1, 0], weights.layers.q[1][:, h // kv])
  assert per.layers[1].gate.shape == (d, 2 * cfg.intermediate_size)
  assert model_lib.per_layer(per) is per  # idempotent
  back = model_lib.stacked(per)
  _close(back, weights, atol=0)
  assert model_lib.stacked(weights) is weights


def test_prefill_decode_and_padding_match_scan(family_model, rng):
  """Left-padded prefill then single-token steps: logits, hidden states and caches."""
  _, _, cfg, weights = family_model
  per = model_lib.per_layer(weights)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 7)))
  valid = jnp.asarray(np.array([[False, False] + [True] * 5, [True] * 7]))
  steps = [jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 1))) for _ in range(3)]
  step = jax.jit(lambda w, c, t, v: model_lib.forward(w, cfg, c, tokens=t, valid=v))
  outs = {}
  for name, w in (("scan", weights), ("unrolled", per)):
    cache, got = KVCache.init(cfg, 2, 10), []
    out = step(w, cache, tokens, valid)
    got.append(out)
    for tok in steps:
      out = step(w, out.cache, tok, jnp.ones((2, 1), bool))
      got.append(out)
    outs[name] = got
  _close(outs["unrolled"], outs["scan"])


def test_context_lora_dropout_and_gradients_match_scan(qwen3, rng):
  """The training-side features: a read-only context, LoRA with dropout keys, remat,
  and gradients w.r.t. the adapter."""
  cfg, weights = qwen3
  cfg = cfg.replace(remat="attn")
  per = model_lib.per_layer(weights)
  lo = lora_lib.init_lora(cfg, lora_lib.LoraConfig(rank=2), jax.random.key(1))
  lo = dataclasses.replace(lo, b=jax.tree.map(lambda b: b + 0.1, lo.b))
  lo = lora_lib.with_dropout(lo, 0.3, jax.random.key(2))
  prefix = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 5)))
  context = model_lib.forward(weights, cfg, KVCache.init(cfg, 2, 5), tokens=prefix).cache
  embeds = jnp.asarray(rng.randn(2, 3, cfg.hidden_size), jnp.float32)

  def loss(ab, w):
    out = model_lib.forward(w, cfg, KVCache.init(cfg, 2, 3), embeds=embeds, context=context,
                            lora=dataclasses.replace(lo, a=ab[0], b=ab[1]))
    return jnp.mean(out.logits ** 2) + jnp.mean(out.cache.k ** 2), out

  (l_scan, o_scan), g_scan = jax.value_and_grad(loss, has_aux=True)((lo.a, lo.b), weights)
  (l_unr, o_unr), g_unr = jax.value_and_grad(loss, has_aux=True)((lo.a, lo.b), per)
  _close(o_unr, o_scan, atol=1e-5)
  np.testing.assert_allclose(float(l_unr), float(l_scan), rtol=1e-6)
  _close(g_unr, g_scan, atol=1e-5)


def test_decode_and_latent_steps_equal_stacked(qwen3):
  """Jitted entry points give the same tokens and trace with either layout."""
  cfg, weights = qwen3
  per = model_lib.per_layer(weights)
  sc = sampling.SamplingConfig(max_new_tokens=6)
  prompts = [[5, 17, 99, 3], [7, 8]]
  assert sampling.generate(per, cfg, prompts, sc) == sampling.generate(weights, cfg, prompts, sc)
  realigner = agents.make_realigner(weights)
  tokens = jnp.asarray(np.arange(12).reshape(2, 1, 6) % cfg.vocab_size)
  valid = jnp.ones_like(tokens, bool)
  run = jax.jit(lambda w: agents.build_trace(w, cfg, KVCache.init(cfg, 1, 30), tokens, valid,
                                             realigner, steps=3))
  _close(run(per), run(weights), atol=1e-5)


def test_decode_cache_layouts_agree(qwen3, rng):
  """sampling.decode on the stacked cache, per-layer buffers and per-layer buffers with
  transposed keys (the default): same tokens, log-probs and returned (stacked) cache."""
  cfg, weights = qwen3
  per = model_lib.per_layer(weights)
  prompt = jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 6)))
  out = model_lib.forward(per, cfg, KVCache.init(cfg, 3, 16), tokens=prompt, logits="last")
  sc = sampling.SamplingConfig(max_new_tokens=8)
  run = jax.jit(lambda c, l, by_layer, transpose_keys: sampling.decode(
      per, cfg, c, l, jax.random.key(0), sc, by_layer=by_layer, transpose_keys=transpose_keys),
      static_argnums=(2, 3))
  ref = run(out.cache, out.logits[:, 0], False, False)
  for layout in ((True, False), (True, True)):
    got = run(out.cache, out.logits[:, 0], *layout)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    assert not got.cache.keys_transposed and not isinstance(got.cache.k, tuple)
    _close(got.logprobs, ref.logprobs, atol=1e-5)
    _close(got.cache, ref.cache, atol=1e-5)


@pytest.mark.parametrize("transpose_keys", [False, True])
def test_per_layer_cache_steps_equal_stacked(qwen3, rng, transpose_keys):
  """Decode loops hold K/V as per-layer buffers (kv_cache.by_layer): single-token steps
  read each layer's buffer inside a switch branch instead of slicing the stacked cache,
  several tokens at once still work, and what is written equals the stacked cache's.
  `transpose_keys` stores the keys [B, K, Dh, S]; writes land transposed."""
  cfg, weights = qwen3
  per = model_lib.per_layer(weights)
  prompt = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 5)))
  stacked = model_lib.forward(per, cfg, KVCache.init(cfg, 2, 12), tokens=prompt).cache
  split = kv_cache.by_layer(stacked, transpose_keys)
  key_shape = stacked.k.shape[1:]
  if transpose_keys:
    key_shape = (*key_shape[:2], key_shape[3], key_shape[2])
  assert len(split.k) == cfg.num_layers and split.k[0].shape == key_shape
  assert split.v[0].shape == stacked.v.shape[1:] and split.keys_transposed == transpose_keys
  _close(kv_cache.stacked(split), stacked, atol=0)
  assert kv_cache.by_layer(split, transpose_keys) is split
  assert kv_cache.stacked(stacked) is stacked
  # Asking for the other key layout converts instead of returning the cache as it is.
  other = kv_cache.by_layer(split, not transpose_keys)
  assert other.keys_transposed != transpose_keys
  _close(kv_cache.stacked(other), stacked, atol=0)
  step = jax.jit(lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t))
  for w in (per, weights):
    ref, got = stacked, split
    for tokens in (prompt[:, :1], prompt[:, 1:2], prompt[:, :3]):
      a, b = step(w, ref, tokens), step(w, got, tokens)
      assert isinstance(b.cache.k, tuple) and b.cache.keys_transposed == transpose_keys
      _close(b.logits, a.logits)
      _close(kv_cache.stacked(b.cache), a.cache)
      ref, got = a.cache, b.cache
  hlo = lambda c: jax.jit(lambda c: model_lib.forward(per, cfg, c, tokens=prompt[:, :1])
                          ).lower(c).as_text()
  # Two more switches (scores, values) read the layer's buffers; the stacked cache's
  # per-layer slices (dynamic_slice of [L, B, K, S, Dh] in the scan) are gone.
  assert hlo(split).count("stablehlo.case") == hlo(stacked).count("stablehlo.case") + 2
  stack_type = f"tensor<{cfg.num_layers}x2x{cfg.num_kv_heads}x12x{cfg.head_dim}xf32>"
  slices = lambda text: sum(stack_type in line for line in text.splitlines()
                            if "dynamic_slice" in line)
  assert slices(hlo(stacked)) >= 1 and slices(hlo(split)) == 0


@pytest.mark.parametrize("packed", [False, True])
def test_layer_body_is_compiled_once(qwen3, packed):
  """Per-layer buffers run one layer scan (not an unrolled loop): one switch per projection
  picks the layer's own buffer, and the stacked scan's weight slicing is gone."""
  cfg, weights = qwen3
  cache = KVCache.init(cfg, 1, 4)
  tok = jnp.zeros((1, 1), jnp.int32)
  hlo = lambda w: jax.jit(lambda w: model_lib.forward(w, cfg, cache, tokens=tok)).lower(w).as_text()
  scan, per = hlo(weights), hlo(model_lib.per_layer(weights, packed=packed))
  assert per.count("stablehlo.while") == scan.count("stablehlo.while") == 1
  # One switch per matrix (q|k|v and gate|up fused: 4 instead of 7) and one product per
  # layer per matrix, each in its own branch (no unrolled layer loop): XLA dots, or the
  # packed kernel's custom calls in place of every projection's dot and the head's.
  assert per.count("stablehlo.case") == 4
  dots = lambda text: text.count("stablehlo.dot_general")
  kernel_calls = per.count("stablehlo.custom_call @diffmas_packed_matmul")
  products = 4 * cfg.num_layers
  assert kernel_calls == (products + 1 if packed else 0)
  assert dots(per) - dots(scan) == products - kernel_calls - len(model_lib.PROJ_EQ)


def test_latent_step_gradients_keep_weights_where_they_lie(qwen3):
  """Reverse mode through latent steps on per-layer weights: the same LoRA gradients as the
  stacked layout, and no stacked [L, ...] copy of any weight (a plain switch would make
  each step's weight a residual that JAX stacks over the layer scan); the per-layer
  buffers themselves are frozen."""
  cfg, weights = qwen3
  cfg = cfg.replace(remat="attn")
  per = model_lib.per_layer(weights)
  lo = lora_lib.init_lora(cfg, lora_lib.LoraConfig(rank=2), jax.random.key(1))
  lo = dataclasses.replace(lo, b=jax.tree.map(lambda b: b + 0.1, lo.b))
  realigner = agents.make_realigner(weights)
  tokens = jnp.asarray(np.arange(12).reshape(2, 1, 6) % cfg.vocab_size)
  valid = jnp.ones_like(tokens, bool)

  def loss(lora, w):
    cache, h = agents.build_trace(w, cfg, KVCache.init(cfg, 1, 30), tokens, valid, realigner,
                                  steps=3, lora=lora)
    return jnp.mean(h ** 2) + jnp.mean(cache.k ** 2)

  grad = jax.jit(jax.value_and_grad(loss))
  (l_per, g_per), (l_st, g_st) = grad(lo, per), grad(lo, weights)
  np.testing.assert_allclose(float(l_per), float(l_st), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g_per), jax.tree.leaves(g_st)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5 * np.abs(y).max())
  hlo = grad.lower(lo, per).as_text()
  d, f = cfg.hidden_size, cfg.intermediate_size
  for shape in ((d, 2 * f), (f, d)):  # gate|up, down
    stacked_type = f"tensor<{cfg.num_layers}x{shape[0]}x{shape[1]}xf32>"
    assert stacked_type not in hlo, stacked_type
  with pytest.raises(TypeError, match="frozen"):
    jax.grad(lambda w: loss(lo, w))(per)
