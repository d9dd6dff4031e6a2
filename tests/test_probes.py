"""Gradient probes through the trace: taps equal the trace, gradients are right, reachability."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax import topology, train
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import trace_capacity
from diffmas_jax.research import probes
from tests.test_train import CFG, LORA_CFG, REALIGNER, WEIGHTS, _batch, _random_lora


def _setup(num_agents=2, steps=2, keep="all"):
  enc, spec = _batch(num_agents=num_agents, steps=steps, n=2)
  spec = dataclasses.replace(spec, trace_keep=keep)
  batch = enc.take(np.arange(2)).as_jax()
  return batch, spec


def _cache(batch, spec):
  return KVCache.init(CFG, batch.solver_tokens.shape[0], trace_capacity(batch, spec))


def _params(mode, num_agents=2):
  if mode == "shared":
    return _random_lora(jax.random.key(2))
  up = _random_lora(jax.random.key(1), stacked=num_agents) if mode == "per_agent" else None
  return topology.AgentLoRA(upstream=up, solver=_random_lora(jax.random.key(2)))


@functools.partial(jax.jit, static_argnames=("spec", "mode", "cut"))
def _grads(params, batch, spec, mode, cut=()):
  return probes.block_gradients(params, WEIGHTS, CFG, _cache(batch, spec), batch, REALIGNER, spec,
                                mode, cut)


@functools.partial(jax.jit, static_argnames=("spec", "mode"))
def _train_grads(params, batch, spec, mode):
  loss = lambda p: train.loss_fn(p, WEIGHTS, CFG, _cache(batch, spec), batch, REALIGNER, spec,
                                 mode, False)[0]
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("mode,keep", [("shared", "all"), ("per_agent", "own_segment"),
                                       ("final_only", "latent_only")])
def test_probe_equals_the_train_step(mode, keep):
  """Zero taps reproduce the train loss; adapter gradients are the train step's own."""
  batch, spec = _setup(keep=keep)
  params = _params(mode)
  loss, expected = _train_grads(params, batch, spec, mode)
  out = _grads(params, batch, spec, mode)
  np.testing.assert_allclose(float(out["loss"]), float(loss), rtol=1e-5)
  g = out["grads"]
  close = lambda a, b: [np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  if mode == "shared":  # the per-agent copies plus the solver's sum to the shared gradient
    close(jax.tree.map(lambda up, s: up.sum(0) + s, g["up"], g["solver"]), expected)
    assert np.all(np.asarray(out["adapter_norm"]) > 1e-5)
  elif mode == "per_agent":
    close((g["up"], g["solver"]), (expected.upstream, expected.solver))
    assert np.asarray(out["adapter_norm"]).shape == (2,)
    assert np.all(np.asarray(out["adapter_norm"]) > 1e-5)
  else:  # final_only: the upstream blocks get exactly zero, the solver its gradient
    close(g["solver"], expected.solver)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g["taps"]))
    assert np.all(np.asarray(out["adapter_norm"]) == 0)
    assert float(out["solver_adapter_norm"]) > 1e-4


def test_tap_gradients_match_finite_differences():
  """2 agents, m = 2: dL/d(K/V block) and dL/d(latent embeddings) vs central differences
  along each block's own gradient direction (where the projection equals its norm)."""
  batch, spec = _setup()
  params = _params("shared")
  up, solver = probes.agent_adapters(params, "shared", 2)
  cache = _cache(batch, spec)
  loss = jax.jit(lambda t: probes.probe_loss(t, up, solver, WEIGHTS, CFG, cache, batch, REALIGNER,
                                             spec))
  g = _grads(params, batch, spec, "shared")["grads"]["taps"]
  zeros = jax.tree.map(jnp.zeros_like, g)
  for j in range(2):
    for field in ("k", "v", "embeds"):
      block = getattr(g, field)[j]
      norm = float(jnp.linalg.norm(block))
      assert norm > 1e-4, (j, field, norm)  # a real signal, not 0 == 0
      d = dataclasses.replace(zeros, **{field: getattr(zeros, field).at[j].set(block / norm)})
      eps = 2e-2
      numeric = float(loss(jax.tree.map(lambda x: eps * x, d)) -
                      loss(jax.tree.map(lambda x: -eps * x, d))) / (2 * eps)
      np.testing.assert_allclose(numeric, norm, rtol=3e-2, err_msg=f"agent {j} {field}")


def test_own_segment_planner_is_reached_only_through_the_critic():
  # own_segment: cutting the critic's block (agent 1) zeroes the planner's (agent 0).
  batch, spec = _setup(keep="own_segment")
  per_agent = _params("per_agent")
  full = _grads(per_agent, batch, spec, "per_agent")
  cut = _grads(per_agent, batch, spec, "per_agent", cut=(1,))
  assert float(full["k_norm"][0]) > 1e-6 and float(full["embed_norm"][0]) > 1e-6
  planner = (cut["grads"]["taps"].k[0], cut["grads"]["taps"].v[0], cut["grads"]["taps"].embeds[0])
  assert all(bool(jnp.all(x == 0)) for x in planner)
  assert float(cut["adapter_norm"][0]) == 0.0
  # The appended trace: the solver also reads the planner's block directly, so cutting the
  # critic removes only the indirect path (planner -> critic -> solver); most signal stays.
  shared = _params("shared")
  batch, spec = _setup(keep="all")
  full = _grads(shared, batch, spec, "shared")
  cut = _grads(shared, batch, spec, "shared", cut=(1,))
  assert float(cut["k_norm"][0]) > 1e-6
  ratio = np.asarray(cut["kv_norm"][0]) / np.asarray(full["kv_norm"][0])
  assert np.all(ratio > 0.5), ratio


def test_jvp_sensitivity_matches_finite_differences():
  batch, spec = _setup()
  params = _params("shared")
  key = jax.random.key(5)
  cache = _cache(batch, spec)
  sens = jax.jit(lambda p: probes.block_sensitivity(p, WEIGHTS, CFG, cache, batch, REALIGNER,
                                                    spec, "shared", key))(params)
  up, solver = probes.agent_adapters(params, "shared", 2)
  mask = batch.target_valid[:, :, None]
  logits = jax.jit(lambda t: mask * probes.target_logits(t, up, solver, WEIGHTS, CFG, cache, batch,
                                                         REALIGNER, spec))
  taps = probes.zero_taps(CFG, batch, spec)
  for j in range(2):
    for block, name in (("kv", "kv_jvp"), ("embed", "embed_jvp")):
      d = probes.direction(taps, j, block, key)
      eps = 5e-2
      fd = (logits(jax.tree.map(lambda x: eps * x, d)) -
            logits(jax.tree.map(lambda x: -eps * x, d))) / (2 * eps)
      np.testing.assert_allclose(float(jnp.linalg.norm(fd)), float(sens[name][j]), rtol=3e-2)
      assert float(sens[name][j]) > 1e-3


def test_decay_ratio():
  assert probes.decay_ratio([1.0, 1.0, 1.0]) == pytest.approx(1.0)
  assert probes.decay_ratio([0.25, 0.5, 1.0]) == pytest.approx(0.5)
  assert np.isnan(probes.decay_ratio([0.0, 1.0]))
