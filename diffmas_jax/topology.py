"""How upstream agents are wired into the solver's trace: topologies and trace-keep options.

sequential (default): planner -> critic -> refiner, each stage prefilled on top
  of everything before it (one shared, growing trace).
hierarchical: independent specialists. Each builds its segment from an EMPTY
  trace (vmapped, so they truly cannot see each other, unlike the public
  LatentMAS code where "hierarchical" is still chained); the segments are then
  appended in agent order for the solver. `position_layout` says how their RoPE
  positions are laid out:
    "continue"     segment j's positions follow segments 0..j-1, as if the
                   agents had run one after the other (the solver sees one
                   monotone sequence);
    "shared_start" every segment starts right after the existing cache
                   (parallel branches with overlapping positions).

Trace-keep options (which upstream slots stay visible; LatentMAS's switches):
  "all"          every slot (default);
  "own_segment"  each stage, and the solver, sees only the previous agent's
                 segment (information passes hop by hop; "sequential_info_only");
  "latent_only"  upstream prompts are hidden, only latent-thought slots remain.
Hidden slots get pos = -1 (`KVCache.keep`), so every mask downstream drops them.

How the options act (`trace_cut`, the two readings of LatentMAS's switches):
  "hide" (default) hides the slots above and keeps every position: latent_only
                 keeps the latent slots of every agent so far.
  "cut"          the public LatentMAS code: after each agent the cache is cut to
                 its last m slots (latent_only: that agent's latent thoughts
                 only) or to that agent's whole segment (own_segment), and the
                 next tokens' positions restart right after the kept slots
                 (their keys keep the rotation of their old positions, as in a
                 truncated transformers cache).

Agents with equal latent steps run as one `lax.scan` (sequential) or one
`vmap` (hierarchical); agents whose m differ form consecutive groups, each a
single scan/vmap, so per-role m costs one extra traced group, not one per agent.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import agents
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights

TOPOLOGIES = ("sequential", "hierarchical")
TRACE_KEEP = ("all", "own_segment", "latent_only")
POSITION_LAYOUTS = ("continue", "shared_start")
TRACE_CUTS = ("hide", "cut")


@dataclasses.dataclass(frozen=True)
class TraceSpec:
  """Static description of an upstream trace (hashable: a jit static argument).

  Attributes:
    steps: latent steps m per upstream agent, in agent order (0 is allowed: the
      agent's prompt is still prefilled into the trace).
    topology: "sequential" or "hierarchical".
    trace_keep: "all", "own_segment" or "latent_only".
    position_layout: hierarchical only, "continue" or "shared_start".
    trace_cut: how trace_keep acts: "hide" slots, or "cut" them and restart positions.
  """

  steps: tuple[int, ...]
  topology: str = "sequential"
  trace_keep: str = "all"
  position_layout: str = "continue"
  trace_cut: str = "hide"

  def __post_init__(self):
    for field, value, allowed in (("topology", self.topology, TOPOLOGIES),
                                  ("trace_keep", self.trace_keep, TRACE_KEEP),
                                  ("position_layout", self.position_layout, POSITION_LAYOUTS),
                                  ("trace_cut", self.trace_cut, TRACE_CUTS)):
      if value not in allowed:
        raise ValueError(f"{field}={value!r}; expected one of {allowed} "
                         f"(--config.agents.{field})")
    if not self.steps:
      raise ValueError("a trace needs at least one upstream agent (--config.agents.roles)")
    if any(m < 0 for m in self.steps):
      raise ValueError(f"latent steps must be >= 0, got {self.steps}")
    if self.topology == "hierarchical" and self.trace_keep == "own_segment":
      raise ValueError("trace_keep='own_segment' with a hierarchical topology would hand the "
                       "solver only the last specialist's segment; use 'all' or 'latent_only'")
    if self.topology == "hierarchical" and self.trace_cut == "cut" and self.trace_keep != "all":
      raise ValueError("trace_cut='cut' cuts a chained trace after each agent; hierarchical "
                       "specialists are independent: use trace_cut='hide'")

  @property
  def num_agents(self) -> int:
    return len(self.steps)

  def length(self, prompt_len: int) -> int:
    """Slots the trace occupies for prompts padded to `prompt_len` (padding included)."""
    return sum(prompt_len + m for m in self.steps)

  def groups(self) -> list[tuple[int, int, int]]:
    """Consecutive agents with equal m: [(first, stop, m)], each one scan or vmap."""
    out, first = [], 0
    for m, run in itertools.groupby(self.steps):
      n = len(list(run))
      out.append((first, first + n, m))
      first += n
    return out

  def slot_layout(self, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per trace slot: the agent that wrote it [N] int32, and whether it is latent [N] bool."""
    agent = np.concatenate([np.full(prompt_len + m, j, np.int32) for j, m in enumerate(self.steps)])
    latent = np.concatenate([np.arange(prompt_len + m) >= prompt_len for m in self.steps])
    return agent, latent


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AgentLoRA:
  """Adapters per role, for when the agents do not all share one LoRA.

  upstream: None (no adapter upstream, e.g. DiffMAS `final_only`) or a LoRA
    whose leaves carry a leading [A] axis, one adapter per upstream agent.
  solver: the solver's LoRA, or None.
  A plain `LoRA` instead of an AgentLoRA means one adapter shared by every agent.
  """

  upstream: LoRA | None
  solver: LoRA | None


def split_lora(lora: LoRA | AgentLoRA | None) -> tuple[LoRA | None, bool, LoRA | None]:
  """(upstream adapter, whether it is stacked per agent, solver adapter)."""
  if isinstance(lora, AgentLoRA):
    return lora.upstream, lora.upstream is not None, lora.solver
  return lora, False, lora


def keep_mask(cache: KVCache, start: jax.Array | int, spec: TraceSpec, prompt_len: int,
              num_done: jax.Array | int) -> jax.Array:
  """[B, S] slots left visible once `num_done` upstream agents have written the trace.

  Args:
    cache: the cache holding the trace from slot `start` on.
    start: slot where the trace begins (anything before it stays visible).
    spec: the trace's layout and trace-keep option.
    prompt_len: width T the upstream prompts are padded to.
    num_done: how many agents have finished (traced in the sequential scan).
  """
  agent_of, latent = (jnp.asarray(x) for x in spec.slot_layout(prompt_len))
  rel = jnp.arange(cache.capacity) - start
  inside = (rel >= 0) & (rel < agent_of.shape[0])
  idx = jnp.clip(rel, 0, agent_of.shape[0] - 1)
  agent, is_latent = jnp.where(inside, agent_of[idx], -1), inside & latent[idx]
  upstream = (agent >= 0) & (agent < num_done)
  if spec.trace_keep == "all":
    keep = jnp.ones_like(upstream)
  elif spec.trace_keep == "own_segment":
    keep = ~upstream | (agent == num_done - 1)
  elif spec.trace_cut == "cut":  # latent_only, LatentMAS: the last agent's m latent slots
    keep = ~upstream | (is_latent & (agent == num_done - 1))
  else:  # latent_only
    keep = ~upstream | is_latent
  return jnp.broadcast_to(keep, cache.pos.shape)


def apply_keep(cache: KVCache, start: jax.Array | int, spec: TraceSpec, prompt_len: int,
               num_done: jax.Array | int) -> KVCache:
  """Hides the slots `keep_mask` drops; with trace_cut="cut" the kept slots are
  renumbered 0, 1, ... per row, so the next token's position restarts after them."""
  cache = cache.keep(keep_mask(cache, start, spec, prompt_len, num_done))
  if spec.trace_cut == "cut":
    filled = cache.pos >= 0
    cache = dataclasses.replace(
        cache, pos=jnp.where(filled, jnp.cumsum(filled, axis=1, dtype=jnp.int32) - 1, -1))
  return cache


def build(weights: Weights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
          valid: jax.Array, realigner: agents.Realigner, spec: TraceSpec,
          lora: LoRA | AgentLoRA | None = None, remat: bool = False
          ) -> tuple[KVCache, jax.Array]:
  """Appends the upstream agents' trace to `cache`, as the solver will see it.

  Args:
    tokens, valid: [A, B, T] left-padded role prompts, one per upstream agent.
    spec: topology, latent steps per agent, trace-keep option, position layout.
    lora: None, one shared LoRA, or an AgentLoRA (only its upstream part is used here).
    remat: rematerialise each agent stage in the backward pass (training).
  Returns:
    The cache with `spec.length(T)` more slots (trace-keep mask applied) and
    each agent's final hidden state [A, B, D].
  """
  if tokens.shape[0] != spec.num_agents:
    raise ValueError(f"{tokens.shape[0]} agent prompts for {spec.num_agents} agents "
                     f"(steps={spec.steps})")
  up_lora, per_agent, _ = split_lora(lora)
  start, prompt_len = cache.end, tokens.shape[-1]
  group_lora = lambda i, j: jax.tree.map(lambda x: x[i:j], up_lora) if per_agent else up_lora
  hs = []
  if spec.topology == "sequential":
    for first, stop, m in spec.groups():
      hide = None
      if spec.trace_keep != "all":
        hide = lambda c, j, first=first: apply_keep(c, start, spec, prompt_len, j + first)
      cache, h = agents.build_trace(weights, cfg, cache, tokens[first:stop], valid[first:stop],
                                    realigner, m, group_lora(first, stop), per_agent, remat,
                                    before_stage=hide)
      hs.append(h)
  else:
    # Each segment's first position: "continue" skips the positions of earlier segments.
    seg_len = jnp.sum(valid, axis=-1) + jnp.asarray(spec.steps)[:, None]  # [A, B]
    before = jnp.cumsum(seg_len, axis=0) - seg_len
    if spec.position_layout == "shared_start":
      before = jnp.zeros_like(before)
    starts = cache.next_pos[None] + before  # [A, B]
    for first, stop, m in spec.groups():
      cache, h = _independent(weights, cfg, cache, tokens[first:stop], valid[first:stop],
                              starts[first:stop], realigner, m, group_lora(first, stop),
                              per_agent, remat)
      hs.append(h)
  if spec.trace_keep != "all":
    cache = apply_keep(cache, start, spec, prompt_len, spec.num_agents)
  return cache, jnp.concatenate(hs, axis=0)


def _independent(weights, cfg, cache, tokens, valid, starts, realigner, steps, lora, per_agent,
                 remat):
  """Vmapped agents, each from an empty trace; segments appended at `cache.end` in order."""
  a, b, t = tokens.shape
  n = t + steps
  empty = KVCache.init(cfg, b, n, cache.k.dtype)

  def one(tok, val, start, lo):
    return agents.agent_stage(weights, cfg, empty, tok, val, realigner, steps, lo, start_pos=start)

  if remat:
    one = jax.checkpoint(one)
  seg, hs = jax.vmap(one, in_axes=(0, 0, 0, 0 if per_agent else None))(tokens, valid, starts, lora)
  # [A, L, B, K, n, Dh] -> [L, B, K, A * n, Dh]: agent-major along the slot axis.
  merge = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], a * n, x.shape[-1])
  pos = jnp.moveaxis(seg.pos, 0, 1).reshape(b, a * n)
  write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, cache.end, axis=3)
  return KVCache(k=write(cache.k, merge(seg.k)), v=write(cache.v, merge(seg.v)),
                 pos=jax.lax.dynamic_update_slice_in_dim(cache.pos, pos, cache.end, axis=1),
                 end=cache.end + a * n), hs
