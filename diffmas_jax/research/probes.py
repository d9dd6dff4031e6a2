"""Gradient probes through the trace (SPEC section 2, Proposition 3.1).

Which upstream blocks does the solver's loss actually reach, and how strongly,
as the number of agents grows? Every block an upstream agent writes gets an
additive "tap" (zeros leave the trace unchanged): its latent input embeddings
[m, B, D] and the K/V it stores, [L, B, K, T + m, Dh] each, added at the moment
they are written, so a tap's gradient is the total derivative of the loss with
respect to that block (through every later agent and the solver). Gradients
with respect to the taps and to one adapter copy per agent give

  kv_norm[j, l]     ||dL/dK_j|| and ||dL/dV_j|| combined, per layer l
  embed_norm[j]     ||dL/de_j|| over agent j's latent input embeddings
  adapter_norm[j]   ||dL/dLoRA_j|| (shared mode: agent j's share of the shared
                    adapter's gradient; the shares sum to the shared gradient)

and a forward-mode (JVP) sensitivity: ||d logits|| of the solver's target
logits per unit-norm random perturbation of each block.

Every function is pure in (params, weights, batch): no global state, usable
from a notebook (see docs/research.md). Sequential topology only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import agents, model as model_lib, topology
from diffmas_jax import train as train_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Taps:
  """Additive perturbations, stacked over the A upstream agents.

  k, v: [A, L, B, K, T + m, Dh] added to the K/V each agent stores (prompt slots,
    then latent slots); embeds: [A, m, B, D] f32 added to its latent input embeddings.
  """

  k: Any
  v: Any
  embeds: Any


def _steps(spec: topology.TraceSpec) -> int:
  if spec.topology != "sequential" or len(set(spec.steps)) != 1:
    raise ValueError(f"probes need a sequential trace with one m for every agent, got "
                     f"topology={spec.topology!r}, steps={spec.steps}")
  return spec.steps[0]


def zero_taps(cfg: ModelConfig, batch: PipelineBatch, spec: topology.TraceSpec,
              dtype=jnp.float32) -> Taps:
  a, b, t = batch.agent_tokens.shape
  m = _steps(spec)
  kv = jnp.zeros((a, cfg.num_layers, b, cfg.num_kv_heads, t + m, cfg.head_dim), dtype)
  return Taps(k=kv, v=kv, embeds=jnp.zeros((a, m, b, cfg.hidden_size), jnp.float32))


def _add_tap(cache: KVCache, at: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
  """Adds [L, B, K, n, Dh] taps to the n slots starting at `at`."""
  n = k.shape[3]
  add = lambda buf, tap: jax.lax.dynamic_update_slice_in_dim(
      buf, jax.lax.dynamic_slice_in_dim(buf, at, n, axis=3) + tap.astype(buf.dtype), at, axis=3)
  return dataclasses.replace(cache, k=add(cache.k, k), v=add(cache.v, v))


def tapped_trace(taps: Taps, up_lora: LoRA | None, weights: Weights, cfg: ModelConfig,
                 cache: KVCache, batch: PipelineBatch, realigner: agents.Realigner,
                 spec: topology.TraceSpec, cut_agents: tuple[int, ...] = ()) -> KVCache:
  """The sequential trace of `topology.build` (same stages, same latent-step
  working cache), with each block's taps added as it is written.

  up_lora: None, or a LoRA whose leaves carry a leading [A] axis (one copy per agent).
  cut_agents: agents whose finished block is put under stop_gradient (nothing
    downstream passes gradient back through it): a reachability check.
  Agents run as one `lax.scan`, so compile time does not grow with A.
  """
  m, t = _steps(spec), batch.agent_tokens.shape[-1]
  start = cache.end
  cut = jnp.asarray([j in cut_agents for j in range(spec.num_agents)])

  def stage(cache, xs):
    j, tok, val, lo, tk, tv, te, cut_j = xs
    if spec.trace_keep != "all":
      cache = cache.keep(topology.keep_mask(cache, start, spec, t, j))
    at = cache.end
    out = model_lib.forward(weights, cfg, cache, tokens=tok, valid=val, lora=lo, logits="none")
    cache = _add_tap(out.cache, at, tk[:, :, :, :t], tv[:, :, :, :t])
    if m:
      take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, cache.end, m, axis=axis)
      work = KVCache(k=take(cache.k, 3), v=take(cache.v, 3), pos=take(cache.pos, 1),
                     end=jnp.zeros((), jnp.int32))

      def step(carry, xs):
        work, h = carry
        i, te_i = xs
        e = agents.realign(h, realigner) + te_i
        o = model_lib.forward(weights, cfg, work, embeds=e[:, None], lora=lo, logits="none",
                              context=cache)
        slot = lambda x: jax.lax.dynamic_slice_in_dim(x, t + i, 1, axis=3)
        return (_add_tap(o.cache, i, slot(tk), slot(tv)), o.hidden[:, -1]), None

      (work, _), _ = jax.lax.scan(step, (work, out.hidden[:, -1]), (jnp.arange(m), te))
      put = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new, cache.end, axis)
      cache = KVCache(k=put(cache.k, work.k, 3), v=put(cache.v, work.v, 3),
                      pos=put(cache.pos, work.pos, 1), end=cache.end + m)
    if cut_agents:
      begin, n = cache.end - (t + m), t + m
      seg = lambda buf: jax.lax.dynamic_slice_in_dim(buf, begin, n, axis=3)
      stop = lambda buf: jax.lax.dynamic_update_slice_in_dim(
          buf, jnp.where(cut_j, jax.lax.stop_gradient(seg(buf)), seg(buf)), begin, axis=3)
      cache = dataclasses.replace(cache, k=stop(cache.k), v=stop(cache.v))
    return cache, None

  xs = (jnp.arange(spec.num_agents), batch.agent_tokens, batch.agent_valid, up_lora, taps.k,
        taps.v, taps.embeds, cut)
  cache, _ = jax.lax.scan(stage, cache, xs)
  if spec.trace_keep != "all":
    cache = cache.keep(topology.keep_mask(cache, start, spec, t, spec.num_agents))
  return cache


def target_logits(taps: Taps, up_lora: LoRA | None, solver_lora: LoRA | None, weights: Weights,
                  cfg: ModelConfig, cache: KVCache, batch: PipelineBatch,
                  realigner: agents.Realigner, spec: topology.TraceSpec,
                  stop_trace: bool = False, cut_agents: tuple[int, ...] = ()) -> jax.Array:
  """[B, U, V] solver target logits on top of the tapped trace (as `train.loss_fn`)."""
  cache = tapped_trace(taps, up_lora, weights, cfg, cache, batch, realigner, spec, cut_agents)
  if stop_trace:
    cache = jax.lax.stop_gradient(cache)
  tokens = jnp.concatenate([batch.solver_tokens, batch.target_tokens[:, :-1]], axis=1)
  valid = jnp.concatenate([batch.solver_valid, batch.target_valid[:, :-1]], axis=1)
  out = model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=solver_lora,
                          logits="none", append=False)
  return model_lib.lm_head(weights, out.hidden[:, batch.solver_tokens.shape[1] - 1:])


def agent_adapters(params: Any, grad_mode: str, num_agents: int
                   ) -> tuple[LoRA | None, LoRA | None]:
  """(per-agent upstream copies [A, ...] or None, solver adapter) for a gradient mode.

  params None: no adapters (latent_mas). shared: the one adapter copied per
  agent, so each copy's gradient is that agent's share of the shared gradient.
  """
  if params is None:
    return None, None
  adapters = train_lib.adapters_for(params, grad_mode)
  up, stacked, solver = topology.split_lora(adapters)
  if up is not None and not stacked:
    up = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (num_agents,) + x.shape), up)
  return up, solver


def probe_loss(taps: Taps, up_lora, solver_lora, weights, cfg, cache, batch, realigner, spec,
               stop_trace: bool = False, cut_agents: tuple[int, ...] = ()) -> jax.Array:
  """The solver's mean target cross-entropy (= train.loss_fn's loss at zero taps)."""
  logits = target_logits(taps, up_lora, solver_lora, weights, cfg, cache, batch, realigner, spec,
                         stop_trace, cut_agents)
  return train_lib.loss_and_metrics(logits, batch.target_tokens, batch.target_valid)[0]


def _norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _per_agent_norm(stacked) -> jax.Array:
  """[A] norms of a tree whose leaves have a leading agent axis."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(stacked)]
  return jnp.sqrt(sum(sq))


def block_gradients(params: Any, weights: Weights, cfg: ModelConfig, cache: KVCache,
                    batch: PipelineBatch, realigner: agents.Realigner,
                    spec: topology.TraceSpec, grad_mode: str = "shared",
                    cut_agents: tuple[int, ...] = ()) -> dict:
  """Gradient norms of the solver loss per upstream block and per agent adapter.

  Args:
    params: train.Params for `grad_mode` (train.init_params for a fresh run), or
      None for no adapters at all (latent_mas).
    cache: empty, `trace_capacity(batch, spec)` slots.
  Returns:
    loss []; kv_norm [A, L]; k_norm, v_norm [A]; embed_norm [A] (0 where m = 0);
    adapter_norm [A] (zeros without upstream adapters); solver_adapter_norm [].
    Also the raw gradients: taps (Taps), up (per-agent adapter copies), solver.
  """
  up, solver = agent_adapters(params, grad_mode, spec.num_agents)
  taps = zero_taps(cfg, batch, spec, cache.k.dtype)
  stop = grad_mode == "final_only"
  loss, (g_taps, g_up, g_solver) = jax.value_and_grad(probe_loss, argnums=(0, 1, 2))(
      taps, up, solver, weights, cfg, cache, batch, realigner, spec, stop, cut_agents)
  sq = lambda x, axes: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
  layer_sq = lambda x: sq(x, (2, 3, 4, 5))  # [A, L]
  kv = jnp.sqrt(layer_sq(g_taps.k) + layer_sq(g_taps.v))
  a = spec.num_agents
  return dict(loss=loss, kv_norm=kv, k_norm=jnp.sqrt(layer_sq(g_taps.k).sum(1)),
              v_norm=jnp.sqrt(layer_sq(g_taps.v).sum(1)),
              embed_norm=jnp.sqrt(sq(g_taps.embeds, (1, 2, 3))),
              adapter_norm=jnp.zeros(a) if g_up is None else _per_agent_norm(g_up),
              solver_adapter_norm=jnp.zeros(()) if g_solver is None else _norm(g_solver),
              grads=dict(taps=g_taps, up=g_up, solver=g_solver))


def block_sensitivity(params: Any, weights: Weights, cfg: ModelConfig, cache: KVCache,
                      batch: PipelineBatch, realigner: agents.Realigner,
                      spec: topology.TraceSpec, grad_mode: str, key: jax.Array) -> dict:
  """JVP: ||d target logits|| (valid target rows) per unit-norm random perturbation of a block.

  Returns kv_jvp [A] (the agent's K and V together) and embed_jvp [A] (0 where m = 0).
  One forward/backward pass, then one linear evaluation per block (`direction(...)`).
  """
  up, solver = agent_adapters(params, grad_mode, spec.num_agents)
  taps = zero_taps(cfg, batch, spec, cache.k.dtype)
  stop = grad_mode == "final_only"
  mask = batch.target_valid[:, :, None].astype(jnp.float32)

  def logits_of(t):
    return mask * target_logits(t, up, solver, weights, cfg, cache, batch, realigner, spec, stop)

  # Attention and LoRA have custom VJPs, which forward mode cannot enter; the JVP
  # is taken as the VJP of the (linear) VJP: c -> J^T c has transpose d -> J d.
  logits, f_vjp = jax.vjp(logits_of, taps)
  _, transpose = jax.vjp(lambda c: f_vjp(c)[0], jnp.zeros_like(logits))
  lin = lambda d: transpose(d)[0]
  a = spec.num_agents
  kv_out, emb_out = [], []
  for j in range(a):
    kv_out.append(_norm(lin(direction(taps, j, "kv", key))))
    emb_out.append(_norm(lin(direction(taps, j, "embed", key))) if spec.steps[j] > 0
                   else jnp.zeros(()))
  return dict(kv_jvp=jnp.stack(kv_out), embed_jvp=jnp.stack(emb_out))


def direction(taps: Taps, j: int, block: str, key: jax.Array) -> Taps:
  """A unit-norm random perturbation of agent j's "kv" block (K and V) or "embed" block."""
  zeros = jax.tree.map(jnp.zeros_like, taps)
  kj = jax.random.fold_in(key, j)
  if block == "kv":
    dk = jax.random.normal(jax.random.fold_in(kj, 0), taps.k.shape[1:], jnp.float32)
    dv = jax.random.normal(jax.random.fold_in(kj, 1), taps.v.shape[1:], jnp.float32)
    scale = 1.0 / jnp.sqrt(jnp.sum(dk ** 2) + jnp.sum(dv ** 2))
    return dataclasses.replace(zeros, k=zeros.k.at[j].set((dk * scale).astype(taps.k.dtype)),
                               v=zeros.v.at[j].set((dv * scale).astype(taps.v.dtype)))
  de = jax.random.normal(jax.random.fold_in(kj, 2), taps.embeds.shape[1:], jnp.float32)
  return dataclasses.replace(zeros, embeds=zeros.embeds.at[j].set(de / jnp.linalg.norm(de)))


def decay_ratio(norms) -> float:
  """Per-hop ratio (farthest / nearest) ** (1 / hops) of norms ordered first agent .. last.

  1 = no decay with depth; < 1 = the signal shrinks by that factor per agent
  farther from the solver; nan with fewer than two agents or a zero norm.
  """
  norms = np.asarray(norms, np.float64)
  if norms.size < 2 or norms[-1] <= 0 or norms[0] <= 0:
    return float("nan")
  return float((norms[0] / norms[-1]) ** (1.0 / (norms.size - 1)))
