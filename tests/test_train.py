"""DiffMAS training: gradients through the trace, gradient modes, optimisation, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from diffmas_jax import agents, data, lora as lora_lib, topology, train
from diffmas_jax.config import tiny_config
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import trace_capacity
from diffmas_jax.params import init_weights
from diffmas_jax.prompts import AgentRole
from diffmas_jax.tasks.training_data import TrainExample
from tests.test_methods import FakeTokenizer

CFG = tiny_config("qwen3", vocab_size=128)
WEIGHTS = init_weights(CFG, jax.random.key(0), std=0.3)
REALIGNER = agents.make_realigner(WEIGHTS)
LORA_CFG = lora_lib.LoraConfig(rank=4, alpha=8.0)


def _examples(n=4, seed=0):
  r = np.random.default_rng(seed)
  return [TrainExample(question=" ".join(f"w{i}" for i in r.integers(3, 128, 5 + k)),
                       target=" ".join(f"w{i}" for i in r.integers(3, 128, 6)),
                       family="math", id=str(k)) for k in range(n)]


def _batch(num_agents=2, steps=2, n=4, **kw):
  roles = [AgentRole(name, latent_steps=steps) for name in ("planner", "critic")[:num_agents]]
  enc = data.encode_examples(FakeTokenizer(), _examples(n), roles, max_prompt_tokens=96,
                             max_target_tokens=8, **kw)
  spec = topology.TraceSpec((steps,) * num_agents)
  return enc, spec


def _random_lora(key, stacked=None):
  """All targets, A and B non-zero so every path carries gradient."""
  lo = lora_lib.init_lora(CFG, LORA_CFG, key) if stacked is None else \
      lora_lib.init_stacked(CFG, LORA_CFG, key, stacked)
  kb = jax.random.fold_in(key, 1)
  b = {n: 0.3 * jax.random.normal(jax.random.fold_in(kb, i), x.shape)
       for i, (n, x) in enumerate(sorted(lo.b.items()))}
  return dataclasses.replace(lo, b=b)


def _loss(params, batch, spec, mode, remat=False):
  cache = KVCache.init(CFG, batch.solver_tokens.shape[0], trace_capacity(batch, spec))
  return train.loss_fn(params, WEIGHTS, CFG, cache, batch.as_jax(), REALIGNER, spec, mode,
                       remat)[0]


def test_shared_gradient_matches_finite_differences():
  """jax.grad through 2 agents x m=2 latent steps (+ remat) vs central differences."""
  enc, spec = _batch(num_agents=2, steps=2, n=2)
  batch = enc.take(np.arange(2))
  params = _random_lora(jax.random.key(3))
  loss = jax.jit(functools.partial(_loss, batch=batch, spec=spec, mode="shared", remat=True))
  grad = jax.grad(loss)(params)
  flat_g, unravel = jax.flatten_util.ravel_pytree(grad)
  flat_p, _ = jax.flatten_util.ravel_pytree(params)
  gnorm = float(jnp.linalg.norm(flat_g))
  assert gnorm > 1e-3
  rand = jax.random.normal(jax.random.key(9), flat_g.shape)
  for direction in (flat_g / gnorm, rand / jnp.linalg.norm(rand)):
    eps = 2e-3  # truncation O(eps^2) vs f32 round-off O(1e-7 / eps)
    plus, minus = loss(unravel(flat_p + eps * direction)), loss(unravel(flat_p - eps * direction))
    numeric = float(plus - minus) / (2 * eps)
    analytic = float(flat_g @ direction)
    assert abs(numeric - analytic) <= 1e-3 * gnorm, (numeric, analytic)


@functools.partial(jax.jit, static_argnums=(1,))
def _grads(params, mode):
  enc, spec = _batch(num_agents=2, steps=2, n=2)
  return jax.grad(_loss)(params, enc.take(np.arange(2)), spec, mode)


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def test_final_only_gives_exactly_zero_upstream_gradient():
  params = topology.AgentLoRA(upstream=_random_lora(jax.random.key(1), stacked=2),
                              solver=_random_lora(jax.random.key(2)))
  g = _grads(params, "final_only")
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g.upstream))
  assert _norm(g.solver) > 1e-3


def test_shared_and_per_agent_reach_the_planner():
  per_agent = topology.AgentLoRA(upstream=_random_lora(jax.random.key(1), stacked=2),
                                 solver=_random_lora(jax.random.key(2)))
  g = _grads(per_agent, "per_agent")
  planner = jax.tree.map(lambda x: x[0], g.upstream)
  critic = jax.tree.map(lambda x: x[1], g.upstream)
  assert _norm(planner) > 1e-4 and _norm(critic) > 1e-4
  # shared: the adapter's gradient = solver path + trace path; the trace path is
  # what final_only (same adapter, trace under stop_gradient) leaves out.
  shared = _random_lora(jax.random.key(2))
  g_shared = _grads(shared, "shared")
  g_final = _grads(topology.AgentLoRA(upstream=None, solver=shared), "final_only").solver
  upstream_part = jax.tree.map(lambda a, b: a - b, g_shared, g_final)
  assert _norm(upstream_part) > 1e-4


def _train_cfg(**kw):
  base = dict(lr=1e-2, warmup_ratio=0.0, final_lr_ratio=1.0, max_grad_norm=1.0, b1=0.9,
              b2=0.999, weight_decay=0.0, grad_accum=1)
  return mlc.ConfigDict({**base, **kw})


def _run_steps(mode, enc, spec, steps, tc, mesh=None, batch_size=4):
  opt, sched = train.make_optimizer(tc, max(1, steps // tc.grad_accum))
  params = train.init_params(CFG, LORA_CFG, mode, spec.num_agents, jax.random.key(0))
  state = train.init_state(params, opt, 0)
  sc = train.StepConfig(CFG, spec, mode, remat=True)
  batch = enc.take(np.arange(batch_size) % len(enc))
  capacity = trace_capacity(batch, spec)
  if mesh is None:
    step = train.make_train_step(opt, sched, sc)
    weights, realigner, jb = WEIGHTS, REALIGNER, batch.as_jax()
    make_cache = lambda: KVCache.init(CFG, batch_size, capacity)
  else:
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffmas_jax import sharding, trainer
    rep = NamedSharding(mesh, P())
    w_sh = sharding.weight_shardings(CFG, mesh)
    # The trainer's layout: per-layer buffers unless a weight is split over devices.
    weights, w_sh = trainer.train_layout(sharding.shard(WEIGHTS, w_sh), w_sh, rep)
    cache_sh = sharding.cache_shardings(KVCache.init(CFG, batch_size, 1), mesh)
    b_sh = sharding.batch_shardings(mesh, batch)
    state = jax.device_put(state, rep)
    step = train.make_train_step(opt, sched, sc, dict(
        state=jax.tree.map(lambda _: rep, state), weights=w_sh, cache=cache_sh, batch=b_sh,
        realigner=rep, replicated=rep))
    realigner = jax.device_put(REALIGNER, rep)
    jb = jax.device_put(batch, b_sh)
    make_cache = jax.jit(lambda: KVCache.init(CFG, batch_size, capacity), out_shardings=cache_sh)
  losses = []
  for _ in range(steps):
    state, m = step(state, weights, make_cache(), jb, realigner)
    losses.append(float(m["loss"]))
  return state, losses


def test_tiny_model_overfits_four_examples():
  enc, spec = _batch(num_agents=2, steps=2, n=4)
  _, losses = _run_steps("shared", enc, spec, 60, _train_cfg(lr=3e-2))
  assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_sharded_step_equals_single_device():
  from diffmas_jax.sharding import make_mesh
  enc, spec = _batch(num_agents=2, steps=1, n=4)
  tc = _train_cfg(grad_accum=2)
  single, l1 = _run_steps("per_agent", enc, spec, 2, tc)
  sharded, l2 = _run_steps("per_agent", enc, spec, 2, tc, mesh=make_mesh(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(single.params.solver.b))


def test_data_parallel_step_on_per_layer_weights_equals_single_device():
  """Replicated weights (data parallel only): the trainer steps on per-layer buffers
  (trainer.train_layout) and reaches the stacked single-device step's adapters; split
  weights (tensor parallel) keep the stacked layout."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from diffmas_jax import sharding, trainer
  from diffmas_jax.sharding import make_mesh
  tp = make_mesh(data=4, tensor=2)
  kept, _ = trainer.train_layout(sharding.shard(WEIGHTS, sharding.weight_shardings(CFG, tp)),
                                 sharding.weight_shardings(CFG, tp), NamedSharding(tp, P()))
  assert not isinstance(kept.layers, tuple)
  dp = make_mesh(data=4, devices=jax.devices()[:4])
  per, sh = trainer.train_layout(sharding.shard(WEIGHTS, sharding.weight_shardings(CFG, dp)),
                                 sharding.weight_shardings(CFG, dp), NamedSharding(dp, P()))
  assert isinstance(per.layers, tuple) and all(s.is_fully_replicated for s in jax.tree.leaves(sh))
  enc, spec = _batch(num_agents=2, steps=2, n=4)
  tc = _train_cfg(grad_accum=1)
  single, l1 = _run_steps("shared", enc, spec, 2, tc)
  parallel, l2 = _run_steps("shared", enc, spec, 2, tc, mesh=dp)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(parallel.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_gradient_accumulation_applies_every_k_micro_steps():
  enc, spec = _batch(num_agents=1, steps=1, n=4)
  state, _ = _run_steps("shared", enc, spec, 3, _train_cfg(grad_accum=2))
  # 3 micro-steps with accumulation 2: exactly one update applied, one pending.
  assert int(state.opt_state.gradient_step) == 1 and int(state.opt_state.mini_step) == 1


def test_bad_inputs_have_clear_errors():
  with pytest.raises(ValueError, match="grad_mode='sideways' does not exist"):
    train.check_grad_mode("sideways")
  roles = [AgentRole("planner", latent_steps=1)]
  tok = FakeTokenizer()
  with pytest.raises(data.TrainDataError, match="empty"):
    data.encode_examples(tok, [], roles, max_prompt_tokens=96, max_target_tokens=8)
  long = [TrainExample(question="w5 w6", target=" ".join(["w7"] * 20), family="math", id="x")]
  with pytest.raises(data.TrainDataError, match="max_target_tokens"):
    data.encode_examples(tok, long, roles, max_prompt_tokens=96, max_target_tokens=8,
                         on_overlong="error")
  enc = data.encode_examples(tok, long, roles, max_prompt_tokens=96, max_target_tokens=8)
  assert enc.truncated_targets == 1 and enc.target_valid.sum() == 8
  with pytest.raises(data.TrainDataError, match="max_prompt_tokens"):
    data.encode_examples(tok, long, roles, max_prompt_tokens=4, max_target_tokens=32)
  with pytest.raises(ValueError, match="matches no projection"):
    lora_lib.resolve_targets("q,attention")
  assert lora_lib.resolve_targets("q_proj|v_proj") == ("q", "v")


def test_data_order_is_a_pure_function_of_the_micro_step():
  seen = np.concatenate([data.micro_batch_indices(10, 4, i, seed=3) for i in range(5)])
  # Epoch 0 is a permutation of all 10 examples; position 10 starts epoch 1.
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  np.testing.assert_array_equal(data.micro_batch_indices(10, 4, 3, seed=3), seen[12:16])
  assert data.num_micro_steps(210, 1.0, 1, 64) == 256  # rounded up to whole updates


def test_lora_merge_and_zero_init():
  from diffmas_jax import model
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)))
  base = model.forward_no_cache(WEIGHTS, CFG, tokens)
  fresh = lora_lib.init_lora(CFG, LORA_CFG, jax.random.key(0))
  np.testing.assert_allclose(model.forward_no_cache(WEIGHTS, CFG, tokens, lora=fresh), base,
                             atol=1e-5)
  lo = _random_lora(jax.random.key(4))
  unmerged = model.forward_no_cache(WEIGHTS, CFG, tokens, lora=lo)
  merged = model.forward_no_cache(lora_lib.merge(WEIGHTS, lo), CFG, tokens)
  np.testing.assert_allclose(merged, unmerged, atol=1e-4)
  assert float(jnp.abs(unmerged - base).max()) > 1e-2


def test_lora_dropout_is_active_only_with_a_key():
  from diffmas_jax import model
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 7)))
  lo = _random_lora(jax.random.key(4))
  plain = model.forward_no_cache(WEIGHTS, CFG, tokens, lora=lo)
  d1 = model.forward_no_cache(WEIGHTS, CFG, tokens,
                              lora=lora_lib.with_dropout(lo, 0.5, jax.random.key(1)))
  d2 = model.forward_no_cache(WEIGHTS, CFG, tokens,
                              lora=lora_lib.with_dropout(lo, 0.5, jax.random.key(2)))
  assert float(jnp.abs(d1 - plain).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3
