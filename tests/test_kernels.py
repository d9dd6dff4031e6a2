"""The CPU kernels (diffmas_jax.kernels): the packed matmul's products, layout, gradients,
switches and build; the single-query attention against XLA's, alone and in the model."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, to_ours
from diffmas_jax import agents, kernels
from diffmas_jax import model as model_lib
from diffmas_jax.kernels import PackedMatrix
from diffmas_jax.kv_cache import KVCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_builds_on_this_machine():
  # The machines we support ship a C++ compiler; a failure here names what is missing.
  assert kernels.unavailable_reason() is None, kernels.unavailable_reason()
  assert kernels.enabled()


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 33])
@pytest.mark.parametrize("k, n", [(40, 64), (96, 320)])
def test_product_equals_xla(rows, k, n):
  rng = np.random.default_rng(rows * k)
  w = jnp.asarray(rng.standard_normal((k, n), np.float32))
  x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
  packed = kernels.pack(w, 1)
  assert isinstance(packed, PackedMatrix) and packed.panels.shape == (n // 32, k, 32)
  got = jax.jit(lambda x, p: p.matmul(x))(x, packed)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  g = jnp.asarray(rng.standard_normal((rows, n), np.float32))
  np.testing.assert_allclose(np.asarray(packed.transposed_matmul(g)),
                             np.asarray(g, np.float64) @ np.asarray(w, np.float64).T,
                             rtol=1e-5, atol=1e-4)


def test_pack_round_trips_and_leaves_unfit_matrices():
  w = jnp.arange(2 * 3 * 64, dtype=jnp.float32).reshape(2, 3, 64)  # [*in, *out], in = (2, 3)
  packed = kernels.pack(w, 2)
  assert packed.shape == w.shape and packed.n_in == 2 and packed.panels.shape == (2, 6, 32)
  np.testing.assert_array_equal(np.asarray(packed.unpack()), np.asarray(w))
  assert kernels.pack(w[..., :40], 2) is not None and not isinstance(
      kernels.pack(w[..., :40], 2), PackedMatrix)  # 40 columns: not whole panels
  bf16 = w.astype(jnp.bfloat16)
  assert kernels.pack(bf16, 2) is bf16
  traced = jax.jit(lambda w: jnp.float32(isinstance(kernels.pack(w, 2), PackedMatrix)))(w)
  assert float(traced) == 0.0  # inside jit: never packed (one copy per call)


def test_vmap_over_rows_matches():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((48, 64), np.float32))
  xs = jnp.asarray(rng.standard_normal((3, 2, 48), np.float32))
  packed = kernels.pack(w, 1)
  got = jax.vmap(packed.matmul)(xs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(xs @ w), rtol=1e-5, atol=1e-5)


def test_model_on_packed_weights_matches_and_differentiates(family_model):
  _, _, cfg, weights = family_model
  _check_packed_model(cfg, weights)


def test_tied_head_gets_a_packed_copy():
  _check_packed_model(*to_ours(make_hf_model("qwen3", seed=3, tie=True)))


def _check_packed_model(cfg, weights):
  """Logits, the input's gradient (every projection and the head run the kernel) and the
  round trip to the stacked layout, for a separate head and a tied one."""
  packed = model_lib.per_layer(weights, packed=True)
  plain = model_lib.per_layer(weights, packed=False)
  assert model_lib.is_packed(packed) and not model_lib.is_packed(plain)
  assert all(isinstance(lw.q, PackedMatrix) and isinstance(lw.down, PackedMatrix)
             for lw in packed.layers)
  assert isinstance(packed.lm_head, PackedMatrix)
  assert packed.lm_head.copy_of_embedding == (weights.lm_head is None)
  embeds = jax.random.normal(jax.random.key(0), (2, 3, cfg.hidden_size))

  def loss(embeds, w):
    out = model_lib.forward(w, cfg, KVCache.init(cfg, 2, 3), embeds=embeds)
    return jnp.mean(out.logits ** 2), out.logits

  (la, a), ga = jax.jit(jax.value_and_grad(loss, has_aux=True))(embeds, packed)
  (lb, b), gb = jax.jit(jax.value_and_grad(loss, has_aux=True))(embeds, plain)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-4, atol=1e-7)
  back = model_lib.stacked(packed)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(weights)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The latent realignment reads the head's rows from the packed copy too.
  for x, y in zip(jax.tree.leaves(agents.make_realigner(packed)),
                  jax.tree.leaves(agents.make_realigner(weights))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keys_transposed", [False, True])
@pytest.mark.parametrize("b, k, g, s, d", [(1, 3, 3, 300, 64), (3, 2, 4, 37, 128),
                                           (2, 1, 1, 5, 16)])
def test_partial_attention_equals_xla(keys_transposed, b, k, g, s, d):
  """Every layer of a stack; rows that see some slots (with an unseen tail and holes),
  a row that sees none (the uniform average) and, at S = 300, a chunk of 128 no row
  sees."""
  from diffmas_jax import layers
  rng = np.random.default_rng(s)
  q = jnp.asarray(0.3 * rng.standard_normal((b, k, g, d), np.float32))
  keys, values = (jnp.asarray(rng.standard_normal((2, b, k, s, d), np.float32)) for _ in "kv")
  mask = rng.random((b, s)) < 0.7
  mask[0, s // 2:] = False
  mask[-1] = False if b > 1 else mask[-1]
  if keys_transposed:
    keys = jnp.swapaxes(keys, -1, -2)
  for layer in range(2):
    got = kernels.partial_attention(q, keys, values, jnp.asarray(mask), jnp.int32(layer),
                                    keys_transposed)
    want = layers._block_stats_xla(q, keys, values, jnp.asarray(mask), layer, keys_transposed)
    for x, y in zip(got[1:], want[1:]):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[0] / got[2][..., None]),
                               np.asarray(want[0] / want[2][..., None]), rtol=1e-5, atol=1e-5)


def test_attention_kernel_in_the_latent_pipeline():
  """Packed weights run every single-token attention on the kernel: the latent steps
  (trace read in place from the stacked cache), decoding (per-layer buffers) and their
  gradients match XLA's attention on the same weights (head_dim 16, so it applies)."""
  from diffmas_jax import layers, sampling
  cfg, weights = to_ours(make_hf_model("qwen3", seed=5, hidden_size=64, head_dim=16))
  packed, plain = (model_lib.per_layer(weights, packed=p) for p in (True, False))
  realigner = agents.make_realigner(weights)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 2, 7)), jnp.int32)
  valid = jnp.asarray(np.arange(7)[None, None] >= np.array([[0], [3]])[None]).repeat(2, 0)
  calls = []
  real = kernels.partial_attention
  counting = lambda *a: calls.append(a[1].ndim) or real(*a)

  def run(w):
    cache, h = agents.build_trace(w, cfg, KVCache.init(cfg, 2, 40), tokens, valid, realigner, 3)
    last = model_lib.lm_head(w, h[-1][:, None])[:, 0]
    gen = sampling.decode(w, cfg, cache, last, jax.random.key(0),
                          sampling.SamplingConfig(max_new_tokens=6))
    return gen.tokens, gen.logprobs, gen.entropy, h

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(kernels, "partial_attention", counting)
    got = jax.jit(run)(packed)
  assert calls, "the kernel never ran"
  want = jax.jit(run)(plain)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  for x, y in zip(got[1:], want[1:]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)

  cache = agents.build_trace(plain, cfg, KVCache.init(cfg, 2, 40), tokens, valid, realigner,
                             3)[0]

  def step_loss(embeds, k, v, w):  # one latent step on a stacked cache, differentiated
    c = dataclasses.replace(cache, k=k, v=v)
    return jnp.sum(model_lib.forward(w, cfg, c, embeds=embeds, logits="none").hidden ** 2)

  embeds = jax.random.normal(jax.random.key(1), (2, 1, cfg.hidden_size))
  grads = [jax.jit(jax.grad(step_loss, argnums=(0, 1, 2)))(embeds, cache.k, cache.v, w)
           for w in (packed, plain)]
  for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  assert not layers._kernel_fits(jnp.zeros((1, 1, 1, 8)), [])  # head_dim 8: XLA's


def _python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)


def test_switch_and_a_missing_compiler(tmp_path):
  show = ("from diffmas_jax import kernels;"
          "print(kernels.mode(), kernels.enabled(), kernels.unavailable_reason())")
  off = _python(show, DIFFMAS_CPU_KERNELS="off")
  assert off.stdout.split()[:2] == ["off", "False"], off.stderr
  # No compiler: "auto" falls back to XLA's product with a warning; "on" refuses.
  missing = dict(CXX=str(tmp_path / "no-such-compiler"), DIFFMAS_KERNEL_CACHE=str(tmp_path))
  auto = _python(show, **missing)
  assert auto.stdout.startswith("auto False building packed_matmul.cc"), auto.stdout + auto.stderr
  assert "using XLA's product" in auto.stderr
  on = _python(show, DIFFMAS_CPU_KERNELS="on", **missing)
  assert on.returncode != 0 and "DIFFMAS_CPU_KERNELS=on but the packed CPU matmul is " \
      "unavailable" in on.stderr
  bad = _python(show, DIFFMAS_CPU_KERNELS="fast")
  assert bad.returncode != 0 and "expected auto, on or off" in bad.stderr


def test_build_lands_whole_in_its_cache(tmp_path):
  run = _python("from diffmas_jax import kernels; print(kernels.unavailable_reason())",
                DIFFMAS_KERNEL_CACHE=str(tmp_path))
  assert run.stdout.strip() == "None", run.stderr
  built = sorted(p.name for p in tmp_path.iterdir())
  assert len(built) == 1 and built[0].startswith("packed_matmul-") and built[0].endswith(".so")


def test_launchers_check_the_switch_first():
  run = subprocess.run([sys.executable, "-m", "launch.generate", "--source=./models/none"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "DIFFMAS_CPU_KERNELS": "fast"})
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip() == ("error: $DIFFMAS_CPU_KERNELS='fast': expected auto, on or off")
