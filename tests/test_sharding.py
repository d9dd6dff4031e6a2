"""Sharded execution on 8 fake CPU devices equals single-device execution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, to_ours
from diffmas_jax import model as model_lib
from diffmas_jax import sharding as sh
from diffmas_jax.kv_cache import KVCache


def test_eight_fake_devices_available():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_forward_equals_unsharded(mesh_shape):
  cfg, weights = to_ours(make_hf_model("qwen3", seed=2))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 10)))
  cache = KVCache.init(cfg, 4, 16)
  step = lambda w, c, t: model_lib.forward(w, cfg, c, tokens=t)
  ref = jax.jit(step)(weights, cache, tokens)

  mesh = sh.make_mesh(**mesh_shape)
  w_sh = sh.weight_shardings(cfg, mesh)
  c_sh = sh.cache_shardings(cache, mesh)
  t_sh = sh.named_sharding(mesh, ("batch", "length"), tokens.shape)
  weights_d, cache_d = sh.shard(weights, w_sh), sh.shard(cache, c_sh)
  # Leaves really are split across devices.
  assert len(weights_d.layers.q.sharding.device_set) == 8
  assert weights_d.layers.q.addressable_shards[0].data.shape[2] == cfg.num_heads // mesh_shape["tensor"]
  out = jax.jit(step, in_shardings=(w_sh, c_sh, t_sh), out_shardings=None)(
      weights_d, cache_d, jax.device_put(tokens, t_sh))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out.cache.k), np.asarray(ref.cache.k), atol=1e-5, rtol=0)


def test_impossible_mesh_raises():
  with pytest.raises(sh.ShardingError, match="needs 16 devices but 8"):
    sh.make_mesh(data=4, fsdp=2, tensor=2)
  with pytest.raises(sh.ShardingError, match="not divisible"):
    sh.make_mesh(data=-1, tensor=3)


def test_rule_collision_raises():
  rules = dict(embed="fsdp", heads="fsdp", head_dim=None)  # embed and heads both on fsdp
  with pytest.raises(sh.ShardingError, match="rule collision"):
    sh.logical_to_spec(("embed", "heads", "head_dim"), rules)


def test_indivisible_dimension_raises():
  mesh = sh.make_mesh(data=1, fsdp=1, tensor=8)
  cfg, _ = to_ours(make_hf_model("qwen3", seed=2))  # 4 heads cannot split 8 ways
  with pytest.raises(sh.ShardingError, match="heads=4 cannot be split"):
    sh.weight_shardings(cfg, mesh)


def test_unknown_logical_axis_raises():
  with pytest.raises(sh.ShardingError, match="no sharding rule"):
    sh.logical_to_spec(("embed", "experts"))
