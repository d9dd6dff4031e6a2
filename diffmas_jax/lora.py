"""LoRA adapters as a pytree with a leading layer axis, like the weights.

`model.LoRA` holds a[name]: [L, *in, r] and b[name]: [L, r, *out] for the
targeted projections (q, k, v, o, gate, up, down) and the static scale
alpha / r; `model.forward` applies it unmerged. This module builds adapters
from config (targets by name or regex, PEFT's initialisation: A uniform in
+-1/sqrt(fan_in), B zero, so a fresh adapter leaves the model unchanged),
stacks them per agent, adds dropout keys for training and merges them into the
base weights. PEFT files: `diffmas_jax.peft_io`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from diffmas_jax.config import ModelConfig
from diffmas_jax.model import PROJ_EQ, LoRA, _num_contracted
from diffmas_jax.params import Weights, abstract_weights

TARGETS = tuple(PROJ_EQ)  # q, k, v, o, gate, up, down
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
            "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r), dropout on the adapter input, targets."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora rank must be >= 1, got {self.rank} (--config.lora.rank)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, lora_cfg: Any) -> "LoraConfig":
    return cls(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
               dropout=float(lora_cfg.dropout), targets=resolve_targets(lora_cfg.targets))


def resolve_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
  """"all", "q,v", "q_proj|v_proj", "(gate|up|down)" or a list -> our projection names.

  Each comma-separated item is a regex matched in full against both our name
  ("q") and the HF module name ("q_proj"); every item must match something.
  """
  items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  if items == ["all"]:
    return TARGETS
  chosen = set()
  for item in items:
    try:
      pattern = re.compile(item)
    except re.error as e:
      raise ValueError(f"lora target {item!r} is not a valid regex: {e}") from None
    hits = {n for n in TARGETS if pattern.fullmatch(n) or pattern.fullmatch(HF_NAMES[n])}
    if not hits:
      raise ValueError(f"lora target {item!r} matches no projection; choose from {TARGETS} "
                       f"(or {tuple(HF_NAMES.values())}, regexes, or 'all')")
    chosen |= hits
  if not chosen:
    raise ValueError("no lora targets given (--config.lora.targets, e.g. 'all' or 'q,v')")
  return tuple(n for n in TARGETS if n in chosen)


def _io_shapes(cfg: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Input and output dims of projection `name` (without the layer axis)."""
  shape = getattr(abstract_weights(cfg).layers, name).shape[1:]
  n_in = _num_contracted(PROJ_EQ[name])
  return shape[:n_in], shape[n_in:]


def init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array,
              dtype: Any = jnp.float32) -> LoRA:
  """A fresh adapter: A ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0."""
  a, b = {}, {}
  for name, k in zip(lora_cfg.targets, jax.random.split(key, len(lora_cfg.targets))):
    ins, outs = _io_shapes(cfg, name)
    bound = 1.0 / math.sqrt(math.prod(ins))
    a[name] = jax.random.uniform(k, (cfg.num_layers, *ins, lora_cfg.rank), dtype, -bound, bound)
    b[name] = jnp.zeros((cfg.num_layers, lora_cfg.rank, *outs), dtype)
  return LoRA(a=a, b=b, scale=lora_cfg.scale)


def init_stacked(cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array, num: int,
                 dtype: Any = jnp.float32) -> LoRA:
  """`num` independent adapters stacked on a leading axis (one per upstream agent)."""
  keys = jax.random.split(key, num)
  return jax.vmap(lambda k: init_lora(cfg, lora_cfg, k, dtype))(keys)


def with_dropout(lora: LoRA | None, rate: float, key: jax.Array, stacked: bool = False
                 ) -> LoRA | None:
  """The adapter with training dropout on its input: one key per layer (and per
  agent when `stacked`); forward folds in the write position, so every stage and
  latent step draws new masks."""
  if lora is None or rate <= 0.0:
    return lora
  lead = jax.tree.leaves(lora.a)[0].shape[:2 if stacked else 1]
  keys = jax.random.split(key, math.prod(lead)).reshape(lead)
  return dataclasses.replace(lora, dropout=rate, dropout_key=keys)


def merge(weights: Weights, lora: LoRA) -> Weights:
  """Base weights with W + scale * A @ B folded in (f32 math, cast back)."""
  layers = weights.layers
  for name, a in lora.a.items():
    w = getattr(layers, name)
    ins, outs = a.shape[1:-1], lora.b[name].shape[2:]
    delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32),
                       lora.b[name].reshape(a.shape[0], a.shape[-1], -1).astype(jnp.float32))
    merged = w.astype(jnp.float32) + lora.scale * delta.reshape(w.shape[0], *ins, *outs)
    layers = dataclasses.replace(layers, **{name: merged.astype(w.dtype)})
  return dataclasses.replace(weights, layers=layers)


def num_params(lora: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(lora))
