"""DiffMAS training: LoRA adapters learned through the appended KV trace.

The frozen base weights are an argument of the jitted step (never closed over,
never differentiated, never donated); only the adapters and the optimizer
state are carried. Gradient modes (`train.grad_mode`, SPEC section 2):

  final_only  the trace is built without adapters and under stop_gradient; one
              adapter is active, and trained, in the solver only (Figure 1).
  shared      one adapter is active in every agent; the solver's loss reaches
              it through the solver, the appended trace, every latent step and
              every prompt prefill (section 3.3).
  per_agent   one adapter per upstream role plus the solver's, trained jointly
              end to end through the trace (beyond the paper).

Loss: teacher-forced cross-entropy on the solver's target tokens only (prompt,
trace and padding carry no loss), averaged over target tokens in the batch.
Gradient accumulation is optax.MultiSteps: each jitted call is one micro-batch,
every `grad_accum`-th call applies the averaged, clipped update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from diffmas_jax import agents, lora as lora_lib, model as model_lib, sharding, topology
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.model import LoRA
from diffmas_jax.params import Weights

GRAD_MODES = ("final_only", "shared", "per_agent")

Params = Any  # LoRA (shared) or topology.AgentLoRA (final_only, per_agent)


def check_grad_mode(mode: str) -> str:
  if mode not in GRAD_MODES:
    raise ValueError(f"train.grad_mode={mode!r} does not exist; choose one of {GRAD_MODES} "
                     "(--config.train.grad_mode=shared)")
  return mode


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything a step changes. `rng` is raw key data (uint32) so it checkpoints."""

  step: jax.Array  # micro-steps done (= micro-batches consumed)
  params: Params
  opt_state: Any
  rng: jax.Array


def init_params(cfg: ModelConfig, lora_cfg: lora_lib.LoraConfig, grad_mode: str,
                num_agents: int, key: jax.Array) -> Params:
  """Fresh adapters shaped for the gradient mode (B = 0: training starts at the base model)."""
  check_grad_mode(grad_mode)
  k_solver, k_up = jax.random.split(key)
  solver = lora_lib.init_lora(cfg, lora_cfg, k_solver)
  if grad_mode == "shared":
    return solver
  upstream = None
  if grad_mode == "per_agent":
    upstream = lora_lib.init_stacked(cfg, lora_cfg, k_up, num_agents)
  return topology.AgentLoRA(upstream=upstream, solver=solver)


def adapters_for(params: Params, grad_mode: str) -> LoRA | topology.AgentLoRA:
  """The adapters the forward pass uses: final_only keeps the upstream agents bare."""
  if grad_mode == "final_only":
    solver = params.solver if isinstance(params, topology.AgentLoRA) else params
    return topology.AgentLoRA(upstream=None, solver=solver)
  return params


def make_optimizer(train_cfg: Any, total_updates: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  """AdamW with linear warmup + cosine decay, global-norm clipping, accumulation."""
  warmup = int(round(train_cfg.warmup_ratio * total_updates))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_updates, warmup + 1), end_value=train_cfg.lr * train_cfg.final_lr_ratio)
  inner = optax.chain(
      optax.clip_by_global_norm(train_cfg.max_grad_norm),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8,
                  weight_decay=train_cfg.weight_decay))
  return optax.MultiSteps(inner, every_k_schedule=train_cfg.grad_accum), schedule


def solver_target_logits(params: Params, weights: Weights, cfg: ModelConfig, cache: KVCache,
                         batch: PipelineBatch, realigner: agents.Realigner,
                         spec: topology.TraceSpec, grad_mode: str, remat: bool = True,
                         dropout: float = 0.0, dropout_key: jax.Array | None = None,
                         mesh: jax.sharding.Mesh | None = None, rules: Any = None
                         ) -> jax.Array:
  """[B, U, V] f32 logits for the solver's target tokens, conditioned on the trace.

  With a `mesh`, the logits are constrained to the rules' ("batch", "length",
  "vocab") sharding: split over vocab like the LM head, which is thus never gathered.
  """
  adapters = adapters_for(params, grad_mode)
  up, stacked, solver = topology.split_lora(adapters)
  if dropout_key is not None and dropout > 0.0:
    k_up, k_solver = jax.random.split(dropout_key)
    up = lora_lib.with_dropout(up, dropout, k_up, stacked)
    solver = lora_lib.with_dropout(solver, dropout, k_solver)
  trace_lora = topology.AgentLoRA(upstream=up, solver=None) if stacked else up
  cache, _ = topology.build(weights, cfg, cache, batch.agent_tokens, batch.agent_valid,
                            realigner, spec, trace_lora, remat)
  if grad_mode == "final_only":
    cache = jax.lax.stop_gradient(cache)
  tokens = jnp.concatenate([batch.solver_tokens, batch.target_tokens[:, :-1]], axis=1)
  valid = jnp.concatenate([batch.solver_valid, batch.target_valid[:, :-1]], axis=1)
  # Scored, not stored: the cache needs only the trace's slots (`trace_capacity`),
  # and the solver attends to no empty ones.
  out = model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=solver,
                          logits="none", append=False)
  ts = batch.solver_tokens.shape[1]
  logits = model_lib.lm_head(weights, out.hidden[:, ts - 1:])
  if mesh is None:
    return logits
  return sharding.constrain(logits, mesh, "batch", "length", "vocab",
                            rules=sharding.DEFAULT_RULES if rules is None else rules)


def sharded_cross_entropy(logits: jax.Array, targets: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """Per-token CE and "target is the top logit" for [B, U, V] logits, [B, U] targets.

  Only elementwise ops and reductions over the vocab axis, so with vocab-sharded
  logits XLA reduces [B, U] partial maxima and sums across shards instead of
  gathering [B, U, V] (a gather by label index or an argmax would gather).
  Accuracy counts ties with the top logit as correct.
  """
  top = jnp.max(logits, axis=-1)  # [B, U]
  shift = jax.lax.stop_gradient(top)
  lse = jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1)) + shift
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # [B, U]
  return lse - target_logit, target_logit >= top


def loss_and_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean CE over target tokens; token accuracy and count as metrics."""
  ce, correct = sharded_cross_entropy(logits, targets)
  mask = mask.astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  loss = jnp.sum(ce * mask) / n
  acc = jnp.sum(correct * mask) / n
  return loss, {"loss": loss, "token_accuracy": acc, "target_tokens": mask.sum()}


def loss_fn(params: Params, weights: Weights, cfg: ModelConfig, cache: KVCache,
            batch: PipelineBatch, realigner: agents.Realigner, spec: topology.TraceSpec,
            grad_mode: str, remat: bool = True, dropout: float = 0.0,
            dropout_key: jax.Array | None = None, mesh: jax.sharding.Mesh | None = None,
            rules: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits = solver_target_logits(params, weights, cfg, cache, batch, realigner, spec, grad_mode,
                                remat, dropout, dropout_key, mesh, rules)
  return loss_and_metrics(logits, batch.target_tokens, batch.target_valid)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static parts of a train step (hashable)."""

  cfg: ModelConfig
  spec: topology.TraceSpec
  grad_mode: str
  remat: bool = True
  dropout: float = 0.0
  mesh: jax.sharding.Mesh | None = None  # set: logits and loss stay vocab-sharded
  rules: tuple | None = None  # sharding.rule_pairs(...); None = sharding.DEFAULT_RULES
  # Another objective (diffmas_jax/ablations.py: TextMAS+SFT, C2C), called as
  # (params, weights, cache, batch, realigner, key, step) -> (loss, metrics); None: DiffMAS.
  objective: Any = None


def train_step(state: TrainState, weights: Weights, cache: KVCache, batch: PipelineBatch,
               realigner: agents.Realigner, *, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, sc: StepConfig) -> tuple[TrainState, dict]:
  """One micro-step: gradients of one micro-batch fed to MultiSteps(AdamW).

  Jit it with `jax.jit(functools.partial(train_step, optimizer=..., schedule=..., sc=...),
  donate_argnums=(0,))` (see `make_train_step`), with the cache created outside jit.
  """
  _check_step_inputs(sc, weights, cache, batch)
  rng, drop_key = jax.random.split(jax.random.wrap_key_data(state.rng))
  if sc.objective is not None:
    grad_fn = jax.value_and_grad(sc.objective, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, weights, cache, batch, realigner, drop_key,
                                  state.step)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, weights, sc.cfg, cache, batch, realigner,
                                  sc.spec, sc.grad_mode, sc.remat, sc.dropout, drop_key, sc.mesh,
                                  sc.rules)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                 lr=schedule(opt_state.gradient_step),
                 applied=opt_state.mini_step == 0)  # True when this call applied an update
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                   rng=jax.random.key_data(rng))
  return new, metrics


def _check_step_inputs(sc: StepConfig, weights: Weights, cache: KVCache, batch: PipelineBatch):
  """Shape/dtype contract of a micro-step (trace time only)."""
  a, b, t = batch.agent_tokens.shape
  chex.assert_shape([batch.agent_tokens, batch.agent_valid], (sc.spec.num_agents, b, t))
  chex.assert_rank([batch.solver_tokens, batch.solver_valid, batch.target_tokens,
                    batch.target_valid], 2)
  chex.assert_equal_shape([batch.solver_tokens, batch.solver_valid])
  chex.assert_equal_shape([batch.target_tokens, batch.target_valid])
  chex.assert_axis_dimension(batch.target_tokens, 0, b)
  chex.assert_type([batch.agent_tokens, batch.solver_tokens, batch.target_tokens], int)
  chex.assert_type([batch.agent_valid, batch.solver_valid, batch.target_valid], bool)
  chex.assert_shape(cache.k, (sc.cfg.num_layers, b, sc.cfg.num_kv_heads, None, sc.cfg.head_dim))
  chex.assert_equal_shape([cache.k, cache.v])


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def make_train_step(optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    sc: StepConfig, shardings: dict | None = None):
  """The jitted micro-step. `shardings` (optional): in/out NamedShardings for
  state, weights, cache, batch and realigner (see `step_shardings`)."""

  def step(state, weights, cache, batch, realigner):
    return train_step(state, weights, cache, batch, realigner, optimizer=optimizer,
                      schedule=schedule, sc=sc)

  if shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  s = shardings
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(s["state"], s["weights"], s["cache"], s["batch"], s["realigner"]),
                 out_shardings=(s["state"], s["replicated"]))
