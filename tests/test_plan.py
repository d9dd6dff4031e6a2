"""Compile-time plan, parallelism modes and the vocab-sharded loss on 8 fake CPU devices."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffmas_jax import data, plan, sharding as sh, train
from diffmas_jax.config import tiny_config
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import trace_capacity
from tests.test_train import CFG, REALIGNER, WEIGHTS, LORA_CFG, _batch, _train_cfg

TINY = tiny_config("qwen3", vocab_size=128)


def _workload(m: int, batch: int = 4) -> plan.Workload:
  return plan.Workload(steps=(m, m), prompt_tokens=16, target_tokens=8, batch_size=batch,
                       grad_accum=2, eval_batch=4, eval_new_tokens=4)


@pytest.fixture(scope="module")
def tensor_plans():
  """The train step compiled with tensor parallelism for m = 1 and m = 3 latent steps."""
  mesh = dict(data=4, fsdp=1, tensor=2)
  return {m: plan.plan_mesh(TINY, _workload(m), mesh, "tensor", with_eval=(m == 1),
                           local_devices=4) for m in (1, 3)}


def test_plan_reports_memory_collectives_and_verdict(tensor_plans):
  p = tensor_plans[1]
  assert p.error is None and p.batch == 4 and p.grad_accum == 2
  for s in (p.train, p.eval):
    assert s.argument_bytes > 0 and s.temp_bytes > 0 and s.flops > 0 and s.compile_s > 0
    assert s.peak_bytes == s.argument_bytes + s.output_bytes - s.alias_bytes + s.temp_bytes
  # Data parallel over 4: the LoRA gradients are all-reduced; tensor over 2: activations.
  assert p.train.collective_bytes.get("all-reduce", 0) > 0
  assert p.train.fits(16) and not p.train.fits(p.train.peak_bytes / plan.GiB / 2)
  text = plan.report(p)
  assert "fits: v5e 16 GiB yes" in text and "collectives" in text


def test_tensor_parallel_latent_steps_gather_no_weights(tensor_plans):
  """Resident weights: more latent steps add activation all-reduces, no all-gathers."""
  one, four = tensor_plans[1].train, tensor_plans[3].train
  assert one.collective_bytes.get("all-gather", 0) == four.collective_bytes.get("all-gather", 0)
  assert four.collective_count["all-reduce"] > one.collective_count["all-reduce"]


def test_matmul_flops_count_every_loop_trip(tensor_plans):
  one, four = tensor_plans[1].train, tensor_plans[3].train
  assert four.flops > one.flops  # 4 more latent steps, each through every layer
  assert one.xla_flops > 0  # cost_analysis (loop bodies once), reported alongside


def test_collective_parser_multiplies_loop_trips():
  hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %d = f32[4,8]{1,0} dot(f32[4,16]{1,0} %a, f32[16,8]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[4,8]{1,0} all-gather(f32[4,2]{1,0} %x), dimensions={1}
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while((s32[], f32[4,8]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %rs = f32[2,8]{1,0} reduce-scatter(f32[4,8]{1,0} %y), dimensions={0}, to_apply=%add
}
"""
  nbytes, counts, unknown = plan.collective_stats(hlo)
  assert nbytes == {"dot_flops": 5 * 2 * 4 * 8 * 16, "all-gather": 5 * 128, "reduce-scatter": 128}
  assert counts["all-gather"] == 5 and unknown == 0


def test_plan_splits_the_batch_with_the_trainers_rule(tensor_plans):
  want = data.plan_batches(4, 2, 4)  # the trainer's rule, one implementation
  assert (tensor_plans[1].batch, tensor_plans[1].grad_accum) == (want.per_call, want.grad_accum)
  # 3 x 2 = 6 examples cannot be split into calls of a multiple of 4: reported, not compiled.
  bad = plan.plan_mesh(TINY, _workload(1, batch=3),
                       dict(data=4, fsdp=1, tensor=2), "tensor")
  assert bad.train is None and "cannot be split over the 4 batch shards" in bad.error


def test_eval_is_planned_on_one_hosts_block(tensor_plans):
  # 8 devices as 2 hosts of 4: evaluation runs each host's batches on its own block.
  assert tensor_plans[1].mesh == {"data": 4, "fsdp": 1, "tensor": 2}
  assert tensor_plans[1].eval_mesh == {"data": 2, "fsdp": 1, "tensor": 2}
  assert "eval on one host's block data=2xfsdp=1xtensor=2" in plan.report(tensor_plans[1])
  bad = plan.plan_mesh(TINY, _workload(1), dict(data=2, fsdp=2, tensor=2), "fsdp",
                       local_devices=2)
  assert bad.train is None and "do not fit one host of 2" in bad.error


def test_vocab_sharded_loss_equals_unsharded_loss_without_gathering():
  r = np.random.RandomState(0)
  logits = jnp.asarray(r.randn(2, 5, 128).astype(np.float32) * 3)
  targets = jnp.asarray(r.randint(0, 128, (2, 5)))
  mask = jnp.asarray(r.rand(2, 5) > 0.3)
  ref_ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  ce, hit = train.sharded_cross_entropy(logits, targets)
  np.testing.assert_allclose(ce, ref_ce, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(hit, jnp.argmax(logits, -1) == targets)

  mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
  vocab = NamedSharding(mesh, sh.logical_to_spec(("batch", "length", "vocab")))
  assert vocab.spec == P("data", None, ("tensor", "fsdp"))
  loss_fn = jax.jit(lambda lg, t, m: jax.value_and_grad(
      lambda x: train.loss_and_metrics(x, t, m)[0])(lg), in_shardings=(vocab, None, None))
  (loss, grad), ref = loss_fn(jax.device_put(logits, vocab), targets, mask), None
  ref_loss, ref_grad = jax.value_and_grad(
      lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * mask)
      / mask.sum())(logits)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-7)
  hlo = loss_fn.lower(jax.device_put(logits, vocab), targets, mask).compile().as_text()
  nbytes, _, _ = plan.collective_stats(hlo)
  assert "all-gather" not in nbytes and nbytes["all-reduce"] > 0  # [B, U] partials only


def _step(mesh, mode="shared", batch_size=8):
  enc, spec = _batch(num_agents=1, steps=2, n=8)  # one stage: a small program compiles fast
  tc = _train_cfg(grad_accum=1)
  opt, sched = train.make_optimizer(tc, 1)
  params = train.init_params(CFG, LORA_CFG, mode, spec.num_agents, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.01, params)  # B != 0: every adapter gets gradient
  state = train.init_state(params, opt, 0)
  batch = enc.take(np.arange(batch_size))
  capacity = trace_capacity(batch, spec)
  if mesh is None:
    step = train.make_train_step(opt, sched, train.StepConfig(CFG, spec, mode, remat=False))
    out = step(state, WEIGHTS, KVCache.init(CFG, batch_size, capacity), batch.as_jax(), REALIGNER)
    return jax.device_get(out)
  rep = NamedSharding(mesh, P())
  w_sh = sh.weight_shardings(CFG, mesh)
  cache_sh = sh.cache_shardings(KVCache.init(CFG, batch_size, 1), mesh)
  b_sh = sh.batch_shardings(mesh, batch)
  step = train.make_train_step(opt, sched, train.StepConfig(CFG, spec, mode, remat=False,
                                                                  mesh=mesh), dict(
      state=jax.tree.map(lambda _: rep, state), weights=w_sh, cache=cache_sh, batch=b_sh,
      realigner=rep, replicated=rep))
  cache = jax.jit(lambda: KVCache.init(CFG, batch_size, capacity), out_shardings=cache_sh)()
  out = step(jax.device_put(state, rep), sh.shard(WEIGHTS, w_sh), cache, jax.device_put(batch, b_sh),
             jax.device_put(REALIGNER, rep))
  return jax.device_get(out)


@pytest.fixture(scope="module")
def single_device_step():
  return _step(None)


@pytest.mark.parametrize("mode", ["data", "tensor", "fsdp"])
def test_parallelism_modes_equal_single_device(single_device_step, mode):
  sizes = sh.choose_mesh(CFG, 8, mode, local_devices=8)
  assert sizes == {"data": dict(data=8, fsdp=1, tensor=1), "tensor": dict(data=4, fsdp=1, tensor=2),
                   "fsdp": dict(data=1, fsdp=4, tensor=2)}[mode]
  state, metrics = _step(sh.make_mesh(**sizes))
  ref_state, ref_metrics = single_device_step
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-5, rtol=0)
  chex.assert_trees_all_equal_shapes_and_dtypes(state.params, ref_state.params)


def test_auto_mesh_follows_memory():
  cfg = dataclasses.replace(TINY)  # 2 kv heads: tensor parallelism up to 2
  w = sh.weight_bytes(cfg)
  assert sh.choose_mesh(cfg, 8, "auto", None, 8) == dict(data=8, fsdp=1, tensor=1)  # CPU
  assert sh.choose_mesh(cfg, 8, "auto", 4 * w, 8) == dict(data=8, fsdp=1, tensor=1)
  assert sh.choose_mesh(cfg, 8, "auto", int(1.5 * w), 8) == dict(data=4, fsdp=1, tensor=2)
  assert sh.choose_mesh(cfg, 8, "auto", int(0.6 * w), 8) == dict(data=2, fsdp=2, tensor=2)
  with pytest.raises(sh.ShardingError, match="do not fit"):
    sh.choose_mesh(cfg, 8, "auto", w // 16, 8)


def test_mesh_config_modes():
  import ml_collections as mlc
  cfg = lambda **kw: mlc.ConfigDict(dict(dict(parallelism="auto", data=-1, fsdp=1, tensor=1), **kw))
  assert sh.resolve_mesh_sizes(cfg(tensor=2), TINY) == dict(data=-1, fsdp=1, tensor=2)
  assert sh.resolve_mesh_sizes(cfg(parallelism="tensor"), TINY, 8) == dict(data=4, fsdp=1,
                                                                          tensor=2)
  with pytest.raises(sh.ShardingError, match="parallelism=manual"):
    sh.resolve_mesh_sizes(cfg(parallelism="fsdp", fsdp=4), TINY)
  with pytest.raises(sh.ShardingError, match="choose one of"):
    sh.resolve_mesh_sizes(cfg(parallelism="pipeline"), TINY)


def test_maxtext_style_rules_table_drops_in():
  """Priority pairs with fallbacks, as MaxText writes them; collisions without one raise."""
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", None), ("mlp", "tensor"),
           ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"), ("layers", None),
           ("head_dim", None), ("length", None)]
  assert sh.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sh.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
  with pytest.raises(sh.ShardingError, match="rule collision: logical axes 'mlp' and 'heads'"):
    sh.logical_to_spec(("heads", "mlp"), rules)
  mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
  w = sh.weight_shardings(TINY, mesh, rules)
  assert w.layers.gate.spec == P(None, "fsdp", "tensor") and w.lm_head.spec == P("fsdp", "tensor")


def test_workload_resolves_the_automatic_eval_batch():
  """eval.batch_size = 0 (the default) is planned as evaluation picks it: from the cache
  budget for the config's prompt width, never 0 (a 0-row batch crashed the plan)."""
  from configs import gpqa
  from diffmas_jax import eval_batch
  from diffmas_jax.config import PRESETS

  cfg = gpqa.get_config(None)
  assert cfg.eval.batch_size == 0
  qwen8b = PRESETS["qwen3-8b"]
  w = plan.Workload.from_config(cfg, qwen8b)
  assert w.eval_batch == eval_batch.budget_batch_size(qwen8b, int(cfg.train.max_prompt_tokens),
                                                      cfg.eval, cfg.agents) >= 1
  with cfg.unlocked():
    cfg.eval.cache_budget_mb = 1e9  # a huge budget stops at the cap
  assert plan.Workload.from_config(cfg, qwen8b).eval_batch == eval_batch.MAX_AUTO_BATCH
  assert plan.Workload.from_config(cfg).eval_batch == 8  # no model shapes: the old default
