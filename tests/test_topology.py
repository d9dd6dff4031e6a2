"""Topologies (sequential, hierarchical), per-role latent steps, trace-keep options, adapters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax import agents, topology
from diffmas_jax.config import tiny_config
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.model import LoRA
from diffmas_jax.params import init_weights
from diffmas_jax.topology import AgentLoRA, TraceSpec

CFG = tiny_config("llama")
A, B, T = 3, 2, 6
stage = jax.jit(agents.agent_stage, static_argnums=(1, 6))


@functools.partial(jax.jit, static_argnames=("spec",))
def build(weights, cache, tokens, valid, realigner, lora, *, spec):
  return topology.build(weights, CFG, cache, tokens, valid, realigner, spec, lora)


@pytest.fixture(scope="module")
def setup():
  weights = init_weights(CFG, jax.random.key(0), std=0.3)
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, CFG.vocab_size, (A, B, T))
  lengths = rng.randint(2, T + 1, (A, B))
  lengths[0, 0] = T
  valid = np.arange(T)[None, None] >= T - lengths[..., None]
  tokens = jnp.asarray(np.where(valid, tokens, 0))
  return weights, agents.make_realigner(weights), tokens, jnp.asarray(valid)


def _lora(key, agents_axis=()):
  ka, kb = jax.random.split(key)
  shape_a, shape_b = (*agents_axis, CFG.num_layers, CFG.hidden_size, 2), (
      *agents_axis, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim)
  return LoRA(a={"v": jax.random.normal(ka, shape_a)}, b={"v": jax.random.normal(kb, shape_b)},
              scale=0.5)


def _visible(cache, r):
  """Row r's visible slots: (k [L, K, n, Dh], pos [n])."""
  keep = np.asarray(cache.pos[r]) >= 0
  return np.asarray(cache.k[:, r][:, :, keep]), np.asarray(cache.pos[r])[keep]


def test_spec_validation_and_layout():
  with pytest.raises(ValueError, match="topology"):
    TraceSpec((1,), topology="ring")
  with pytest.raises(ValueError, match="trace_keep"):
    TraceSpec((1,), trace_keep="some")
  with pytest.raises(ValueError, match="own_segment"):
    TraceSpec((1, 1), topology="hierarchical", trace_keep="own_segment")
  with pytest.raises(ValueError, match=">= 0"):
    TraceSpec((1, -1))
  spec = TraceSpec((2, 2, 0, 3))
  assert spec.groups() == [(0, 2, 2), (2, 3, 0), (3, 4, 3)]
  assert spec.length(5) == 4 * 5 + 7
  agent, latent = spec.slot_layout(2)
  assert agent.tolist() == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 5
  assert latent.tolist() == [0, 0, 1, 1] * 2 + [0, 0] + [0, 0, 1, 1, 1]


def test_sequential_with_per_role_steps_equals_chained_stages(setup):
  weights, realigner, tokens, valid = setup
  steps = (2, 2, 0)  # two groups: a scan over agents 0-1, then agent 2 with m = 0
  spec = TraceSpec(steps)
  cap = spec.length(T)
  got, hs = build(weights, KVCache.init(CFG, B, cap), tokens, valid, realigner, None, spec=spec)
  cache = KVCache.init(CFG, B, cap)
  for j, m in enumerate(steps):
    cache, h = stage(weights, CFG, cache, tokens[j], valid[j], realigner, m)
    np.testing.assert_allclose(np.asarray(hs[j]), np.asarray(h), atol=1e-4)
  np.testing.assert_allclose(np.asarray(got.k), np.asarray(cache.k), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(cache.pos))


@pytest.mark.parametrize("layout", ["continue", "shared_start"])
def test_hierarchical_agents_are_independent(setup, layout):
  weights, realigner, tokens, valid = setup
  m = 2
  spec = TraceSpec((m,) * A, topology="hierarchical", position_layout=layout)
  got, _ = build(weights, KVCache.init(CFG, B, spec.length(T)), tokens, valid, realigner, None,
                 spec=spec)
  offset = np.zeros(B, int)
  for j in range(A):
    alone, _ = stage(weights, CFG, KVCache.init(CFG, B, T + m), tokens[j], valid[j], realigner, m)
    seg = slice(j * (T + m), (j + 1) * (T + m))
    # Values do not depend on positions; keys (RoPE'd) match where positions do.
    np.testing.assert_allclose(np.asarray(got.v[:, :, :, seg]), np.asarray(alone.v), atol=1e-4)
    if layout == "shared_start":
      np.testing.assert_allclose(np.asarray(got.k[:, :, :, seg]), np.asarray(alone.k), atol=1e-4)
    pos, ref = np.asarray(got.pos[:, seg]), np.asarray(alone.pos)
    shift = offset[:, None] if layout == "continue" else 0
    np.testing.assert_array_equal(np.where(ref >= 0, ref + shift, -1), pos)
    offset += np.asarray(valid[j].sum(-1)) + m
  if layout == "continue":  # one monotone sequence of positions per row
    for r in range(B):
      p = _visible(got, r)[1]
      np.testing.assert_array_equal(p, np.arange(len(p)))
  # The chained topology differs: agent 1 sees agent 0.
  seq, _ = build(weights, KVCache.init(CFG, B, spec.length(T)), tokens, valid, realigner, None,
                 spec=TraceSpec((m,) * A))
  seg1 = slice(T + m, 2 * (T + m))
  assert np.abs(np.asarray(seq.k[:, :, :, seg1]) - np.asarray(got.k[:, :, :, seg1])).max() > 1e-3


def test_trace_keep_options(setup):
  weights, realigner, tokens, valid = setup
  m = 2
  cap = TraceSpec((m,) * A).length(T)
  run = lambda keep: build(weights, KVCache.init(CFG, B, cap), tokens, valid, realigner, None,
                           spec=TraceSpec((m,) * A, trace_keep=keep))[0]
  full, own, latent = run("all"), run("own_segment"), run("latent_only")
  prompt = np.asarray(valid.sum(-1))  # [A, B]
  np.testing.assert_array_equal(np.asarray(full.length), prompt.sum(0) + A * m)
  np.testing.assert_array_equal(np.asarray(own.length), prompt[-1] + m)
  np.testing.assert_array_equal(np.asarray(latent.length), np.full(B, A * m))
  # own_segment: the last agent worked on top of only the previous agent's segment.
  prev = KVCache.init(CFG, B, cap)
  for j in range(A - 1):
    prev, _ = stage(weights, CFG, prev, tokens[j], valid[j], realigner, m)
  hidden = np.arange(cap) < (A - 2) * (T + m)
  prev = prev.keep(jnp.broadcast_to(jnp.asarray(~hidden), prev.pos.shape))
  ref, _ = stage(weights, CFG, prev, tokens[-1], valid[-1], realigner, m)
  last = slice((A - 1) * (T + m), A * (T + m))
  np.testing.assert_allclose(np.asarray(own.k[:, :, :, last]), np.asarray(ref.k[:, :, :, last]),
                             atol=1e-4)
  # latent_only: agent 1 ran with agent 0's prompt slots hidden (its latent slots kept).
  c0, _ = stage(weights, CFG, KVCache.init(CFG, B, cap), tokens[0], valid[0], realigner, m)
  c0 = c0.keep(jnp.broadcast_to(jnp.asarray(np.arange(cap) >= T), c0.pos.shape))
  ref1, _ = stage(weights, CFG, c0, tokens[1], valid[1], realigner, m)
  seg1 = slice(T + m, 2 * (T + m))
  np.testing.assert_allclose(np.asarray(latent.k[:, :, :, seg1]),
                             np.asarray(ref1.k[:, :, :, seg1]), atol=1e-4)


@pytest.mark.parametrize("topo", ["sequential", "hierarchical"])
def test_per_agent_adapters(setup, topo):
  weights, realigner, tokens, valid = setup
  m = 1
  spec = TraceSpec((m,) * A, topology=topo)
  stacked = _lora(jax.random.key(1), (A,))
  got, _ = build(weights, KVCache.init(CFG, B, spec.length(T)), tokens, valid, realigner,
                 AgentLoRA(upstream=stacked, solver=None), spec=spec)
  chained = KVCache.init(CFG, B, spec.length(T))
  for j in range(A):
    lora_j = jax.tree.map(lambda x: x[j], stacked)
    seg = slice(j * (T + m), (j + 1) * (T + m))
    if topo == "sequential":  # agent j on top of agents 0..j-1, with its own adapter
      chained, _ = stage(weights, CFG, chained, tokens[j], valid[j], realigner, m, lora_j)
      ref = chained.k[:, :, :, seg]
    else:  # agent j alone; compare values (RoPE'd keys depend on the position layout)
      alone, _ = stage(weights, CFG, KVCache.init(CFG, B, T + m), tokens[j], valid[j], realigner,
                       m, lora_j)
      ref = alone.k if spec.position_layout == "shared_start" else None
      np.testing.assert_allclose(np.asarray(got.v[:, :, :, seg]), np.asarray(alone.v), atol=1e-4)
    if ref is not None:
      np.testing.assert_allclose(np.asarray(got.k[:, :, :, seg]), np.asarray(ref), atol=1e-4)


def test_split_lora():
  shared = _lora(jax.random.key(3))
  up, per_agent, solver = topology.split_lora(shared)
  assert up is shared and solver is shared and not per_agent
  assert topology.split_lora(None) == (None, False, None)
  per = AgentLoRA(upstream=_lora(jax.random.key(4), (A,)), solver=shared)
  up, per_agent, solver = topology.split_lora(per)
  assert per_agent and solver is shared and up is per.upstream
