"""Cache-to-Cache (C2C, Fu et al. 2025) as a baseline on one model: a trained KV-cache fuser.

Per layer l, for K (and, with its own parameters, for V):

  x      = rms_normalise(concat(K_sharer, K_receiver))        # [B, S, 2 K Dh]
  h      = gelu(x @ w_in + b_in)                              # [B, S, H]
  proj   = h @ w_proj + b_proj                                # [B, S, K Dh]  (zero-init)
  weight = sigmoid(h @ w_weight + b_weight)                   # [B, S, K]     per kv-head
  K'     = K_receiver + gate_l * weight * proj

gate_l is one learned logit per layer (and per K / V): a Gumbel-sigmoid with a
temperature annealed geometrically from `tau_start` to `tau_end` in training,
hard (logit > 0) at evaluation. The base model is frozen; only the fuser trains,
on the same data and solver loss as DiffMAS.

Position mapping (one model here, two in the public C2C). C2C fuses the caches two
models build for the SAME input tokens. Here the receiver is the solver alone:
its own prompt prefilled on an empty cache. The sharer is the same solver prompt
prefilled on top of the upstream agents' latent trace (built without adapters):
the same tokens, but their K/V carry what the trace holds. The two caches are
aligned token for token; the sharer's keys sit after the trace (positions offset
by the trace length per row), so they are rotated back by that offset (RoPE
rotations compose), which puts both in the receiver's positions exactly. The
prompt's last token is left out of the fused cache: the solver runs it on the
fused cache to predict its first answer token, as the receiver does in C2C.
Differences from the public C2C: sharer and receiver are one frozen model (the
fuser need not translate between representation spaces, only decide what of the
trace-conditioned cache to blend in); the sharer's input is the receiver's prompt
conditioned on a multi-agent latent trace rather than a different model's view of
the prompt; one fuser per layer pair l -> l (same depth, same head layout).
A closed gate gives exactly the solver without any trace.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import agents, layers, model as model_lib, multihost, paths, sampling, topology
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache, grow
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.params import Weights

Fuser = dict  # {"k": {name: array with a leading [L] axis}, "v": {...}}
_LEAVES = ("w_in", "b_in", "w_proj", "b_proj", "w_weight", "b_weight", "gate")


@dataclasses.dataclass(frozen=True)
class FuserConfig:
  """Static fuser settings (hashable). `anneal_steps`: micro-steps over which tau decays."""

  hidden: int = 256
  gate_init: float = 1.0
  tau_start: float = 1.0
  tau_end: float = 0.01
  anneal_steps: int = 1

  @classmethod
  def from_config(cls, c2c_cfg: Any, anneal_steps: int = 1) -> "FuserConfig":
    return cls(hidden=int(c2c_cfg.hidden), gate_init=float(c2c_cfg.gate_init),
               tau_start=float(c2c_cfg.tau_start), tau_end=float(c2c_cfg.tau_end),
               anneal_steps=max(1, int(anneal_steps)))

  def tau(self, step: jax.Array) -> jax.Array:
    frac = jnp.clip(step / max(self.anneal_steps - 1, 1), 0.0, 1.0)
    return self.tau_start * (self.tau_end / self.tau_start) ** frac


def init_fuser(cfg: ModelConfig, fc: FuserConfig, key: jax.Array) -> Fuser:
  """Fresh fuser: w_proj = 0, so training starts at the solver alone; gates at `gate_init`."""
  n_l, kd, h = cfg.num_layers, cfg.num_kv_heads * cfg.head_dim, fc.hidden

  def half(key):
    k_in, k_w = jax.random.split(key)
    return dict(
        w_in=jax.random.normal(k_in, (n_l, 2 * kd, h), jnp.float32) / np.sqrt(2 * kd),
        b_in=jnp.zeros((n_l, h), jnp.float32),
        w_proj=jnp.zeros((n_l, h, kd), jnp.float32),
        b_proj=jnp.zeros((n_l, kd), jnp.float32),
        w_weight=jax.random.normal(k_w, (n_l, h, cfg.num_kv_heads), jnp.float32) / np.sqrt(h),
        b_weight=jnp.zeros((n_l, cfg.num_kv_heads), jnp.float32),
        gate=jnp.full((n_l,), fc.gate_init, jnp.float32))

  k_k, k_v = jax.random.split(key)
  return {"k": half(k_k), "v": half(k_v)}


def gate_values(logits: jax.Array, key: jax.Array | None, tau: jax.Array | float) -> jax.Array:
  """[L] gate in [0, 1]: Gumbel-sigmoid at temperature tau (training) or hard (key None)."""
  if key is None:
    return (logits > 0).astype(jnp.float32)
  noise = jax.random.logistic(key, logits.shape)  # difference of two Gumbels
  return jax.nn.sigmoid((logits + noise) / tau)


def fuse_half(p: dict, sharer: jax.Array, receiver: jax.Array, gate: jax.Array) -> jax.Array:
  """Fuses one of K / V.

  Args:
    p: that half's fuser leaves (leading [L] axis).
    sharer, receiver: [L, B, K, S, Dh], position aligned.
    gate: [L] gate values.
  Returns:
    [L, B, K, S, Dh] receiver + gate * weight * projection.
  """
  n_l, b, nk, s, dh = receiver.shape
  flat = lambda x: jnp.moveaxis(x, 3, 2).reshape(n_l, b, s, nk * dh).astype(jnp.float32)
  x = jnp.concatenate([flat(sharer), flat(receiver)], axis=-1)  # [L, B, S, 2 K Dh]
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  # [L, B, S, H]
  h = jax.nn.gelu(jnp.einsum("lbsi,lih->lbsh", x, p["w_in"]) + p["b_in"][:, None, None])
  # [L, B, S, K Dh]
  proj = jnp.einsum("lbsh,lho->lbso", h, p["w_proj"]) + p["b_proj"][:, None, None]
  # [L, B, S, K]
  weight = jax.nn.sigmoid(jnp.einsum("lbsh,lhk->lbsk", h, p["w_weight"])
                          + p["b_weight"][:, None, None])
  delta = (weight[..., None] * proj.reshape(n_l, b, s, nk, dh)) * gate[:, None, None, None, None]
  return receiver + jnp.moveaxis(delta, 2, 3).astype(receiver.dtype)


def _unrotate(k: jax.Array, offset: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates keys [L, B, K, S, Dh] back by `offset` [B] positions (RoPE, half-split pairs)."""
  angles = -offset.astype(jnp.float32)[:, None] * jnp.asarray(layers.rope_inv_freq(cfg))
  cos, sin = (f(angles)[None, :, None, None, :] for f in (jnp.cos, jnp.sin))  # [1, B, 1, 1, Dh/2]
  k1, k2 = jnp.split(k.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(k.dtype)


def aligned_caches(weights: Weights, cfg: ModelConfig, cache: KVCache, batch: PipelineBatch,
                   realigner: agents.Realigner, spec: topology.TraceSpec
                   ) -> tuple[KVCache, jax.Array, jax.Array]:
  """The receiver's cache of the solver prompt (last token excluded) and the sharer's K, V.

  Args:
    cache: empty, at least `capacity(batch, spec)` slots.
  Returns:
    receiver KVCache (n = Ts - 1 slots), sharer k and v [L, B, K, n, Dh] in the
    receiver's positions. Nothing here depends on the fuser (no gradient flows).
  """
  trace, _ = topology.build(weights, cfg, cache, batch.agent_tokens, batch.agent_valid,
                            realigner, spec)
  prompt, valid = batch.solver_tokens[:, :-1], batch.solver_valid[:, :-1]
  n = prompt.shape[1]
  sharer = model_lib.forward(weights, cfg, trace, tokens=prompt, valid=valid, logits="none").cache
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, trace.end, n, axis=3)
  sharer_k = _unrotate(take(sharer.k), trace.next_pos, cfg)
  empty = KVCache.init(cfg, prompt.shape[0], n, cache.k.dtype)
  receiver = model_lib.forward(weights, cfg, empty, tokens=prompt, valid=valid, logits="none",
                               fresh_cache=True).cache
  return receiver, jax.lax.stop_gradient(sharer_k), jax.lax.stop_gradient(take(sharer.v))


def fused_cache(fuser: Fuser, weights: Weights, cfg: ModelConfig, cache: KVCache,
                batch: PipelineBatch, realigner: agents.Realigner, spec: topology.TraceSpec,
                key: jax.Array | None = None, tau: jax.Array | float = 1.0) -> KVCache:
  """The receiver's prompt cache with the sharer's fused in (key None: hard gates)."""
  receiver, sharer_k, sharer_v = aligned_caches(weights, cfg, cache, batch, realigner, spec)
  keys = (None, None) if key is None else tuple(jax.random.split(key))
  g_k = gate_values(fuser["k"]["gate"], keys[0], tau)
  g_v = gate_values(fuser["v"]["gate"], keys[1], tau)
  return dataclasses.replace(receiver, k=fuse_half(fuser["k"], sharer_k, receiver.k, g_k),
                             v=fuse_half(fuser["v"], sharer_v, receiver.v, g_v))


def capacity(batch: PipelineBatch, spec: topology.TraceSpec) -> int:
  """Cache slots the sharer needs: the trace, then the solver prompt."""
  return spec.length(batch.prompt_width) + batch.solver_tokens.shape[1]


def target_logits(fuser: Fuser, weights: Weights, cfg: ModelConfig, cache: KVCache,
                  batch: PipelineBatch, realigner: agents.Realigner, spec: topology.TraceSpec,
                  key: jax.Array | None = None, tau: jax.Array | float = 1.0) -> jax.Array:
  """[B, U, V] f32 logits for the solver's targets on the fused cache (teacher forcing)."""
  fused = fused_cache(fuser, weights, cfg, cache, batch, realigner, spec, key, tau)
  tokens = jnp.concatenate([batch.solver_tokens[:, -1:], batch.target_tokens[:, :-1]], axis=1)
  valid = jnp.concatenate([batch.solver_valid[:, -1:], batch.target_valid[:, :-1]], axis=1)
  out = model_lib.forward(weights, cfg, fused, tokens=tokens, valid=valid, logits="none",
                          append=False)
  return model_lib.lm_head(weights, out.hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "spec"))
def fuse_and_decode(fuser: Fuser, weights: Weights, cfg: ModelConfig, cache: KVCache,
                    batch: PipelineBatch, realigner: agents.Realigner, key: jax.Array, *,
                    sc: sampling.SamplingConfig, spec: topology.TraceSpec) -> sampling.Generation:
  """Inference: hard gates, fused prompt cache, the prompt's last token, then decoding."""
  fused = fused_cache(fuser, weights, cfg, cache, batch, realigner, spec)
  fused = grow(fused, fused.capacity + 1 + sc.max_new_tokens)
  out = model_lib.forward(weights, cfg, fused, tokens=batch.solver_tokens[:, -1:],
                          valid=batch.solver_valid[:, -1:], logits="last")
  return sampling.decode(weights, cfg, out.cache, out.logits[:, 0], key, sc)


# --- export: one safetensors file (the orbax training checkpoint holds the same tree) ---

def save_fuser(path: str, fuser: Fuser, fc: FuserConfig, base_model: str = "") -> str:
  """Writes `path` (safetensors: k.w_in, ..., v.gate) with the config in its metadata.

  `path` may be a URL (gs://...). Call it on every process: process 0 writes, and
  all wait until the file is whole, so any process that sees the path can read it.
  """
  from safetensors.numpy import save
  if multihost.is_main():
    tensors = {f"{half}.{name}": np.asarray(jax.device_get(fuser[half][name]))
               for half in ("k", "v") for name in _LEAVES}
    meta = {"format": "diffmas-jax c2c fuser", "base_model": base_model,
            "config": json.dumps(dataclasses.asdict(fc))}
    paths.write_atomic(path, save(tensors, metadata=meta))
  multihost.barrier("c2c_fuser_saved")
  return path


def load_fuser(path: str, cfg: ModelConfig | None = None) -> Fuser:
  """Reads a `save_fuser` file (local or a URL); with `cfg`, checks it was made for
  that model's shapes."""
  from safetensors.numpy import load
  p = paths.as_path(path)
  if not p.is_file():
    raise FileNotFoundError(f"no C2C fuser at {path}; train one with "
                            "`python -m launch.train --config=configs/gpqa.py:quickstart,c2c`")
  tensors = load(p.read_bytes())
  want = {f"{h}.{n}" for h in ("k", "v") for n in _LEAVES}
  if set(tensors) != want:
    raise ValueError(f"{path} is not a C2C fuser: tensors {sorted(set(tensors) ^ want)} missing "
                     "or unexpected")
  fuser = {h: {n: jnp.asarray(tensors[f"{h}.{n}"]) for n in _LEAVES} for h in ("k", "v")}
  if cfg is not None:
    kd = cfg.num_kv_heads * cfg.head_dim
    shape = fuser["k"]["w_proj"].shape
    if shape[0] != cfg.num_layers or shape[2] != kd:
      raise ValueError(f"{path} was trained for {shape[0]} layers x {shape[2]} K/V features; "
                       f"this model has {cfg.num_layers} x {kd}")
  return fuser
