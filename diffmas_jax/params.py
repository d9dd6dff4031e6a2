"""Weight pytrees: one declaration per leaf drives init, sharding and HF conversion.

Layer weights carry a leading `layers` axis so the decoder runs as one `lax.scan`.
Einsum letters used across the project: b batch, t query, s key slot, d model,
h heads, k kv-heads, g heads per kv-head, e head dim, f ffn, v vocab, l layer, r rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names, see sharding.DEFAULT_RULES
  init: str  # "normal" | "ones" | "zeros"


def _register(cls):
  """Registers a dataclass as a pytree whose fields are all leaves/subtrees."""
  cls = dataclasses.dataclass(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@_register
class LayerWeights:
  """Per-layer weights, stacked on a leading `layers` axis. Optional leaves are None."""

  attn_norm: Any  # [L, D]
  q: Any  # [L, D, H, Dh]
  k: Any  # [L, D, K, Dh]
  v: Any  # [L, D, K, Dh]
  o: Any  # [L, H, Dh, D]
  mlp_norm: Any  # [L, D]
  gate: Any  # [L, D, F]
  up: Any  # [L, D, F]
  down: Any  # [L, F, D]
  q_norm: Any = None  # [L, Dh] (qwen3)
  k_norm: Any = None  # [L, Dh] (qwen3)
  q_bias: Any = None  # [L, H, Dh] (qwen2)
  k_bias: Any = None  # [L, K, Dh] (qwen2)
  v_bias: Any = None  # [L, K, Dh] (qwen2)


@_register
class Weights:
  embed: Any  # [V, D]
  layers: LayerWeights
  final_norm: Any  # [D]
  lm_head: Any = None  # [D, V]; None when tied to `embed`


def layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
  """Per-layer leaf declarations (without the layer axis)."""
  d, h, k, e, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  specs = {
      "attn_norm": ParamSpec((d,), ("embed",), "ones"),
      "q": ParamSpec((d, h, e), ("embed", "heads", "head_dim"), "normal"),
      "k": ParamSpec((d, k, e), ("embed", "kv_heads", "head_dim"), "normal"),
      "v": ParamSpec((d, k, e), ("embed", "kv_heads", "head_dim"), "normal"),
      "o": ParamSpec((h, e, d), ("heads", "head_dim", "embed"), "normal"),
      "mlp_norm": ParamSpec((d,), ("embed",), "ones"),
      "gate": ParamSpec((d, f), ("embed", "mlp"), "normal"),
      "up": ParamSpec((d, f), ("embed", "mlp"), "normal"),
      "down": ParamSpec((f, d), ("mlp", "embed"), "normal"),
  }
  if cfg.qk_norm:
    specs["q_norm"] = ParamSpec((e,), ("head_dim",), "ones")
    specs["k_norm"] = ParamSpec((e,), ("head_dim",), "ones")
  if cfg.qkv_bias:
    specs["q_bias"] = ParamSpec((h, e), ("heads", "head_dim"), "zeros")
    specs["k_bias"] = ParamSpec((k, e), ("kv_heads", "head_dim"), "zeros")
    specs["v_bias"] = ParamSpec((k, e), ("kv_heads", "head_dim"), "zeros")
  return specs


def weight_specs(cfg: ModelConfig) -> Weights:
  """The whole model's declarations, as a `Weights` tree of `ParamSpec` leaves."""
  stacked = {n: ParamSpec((cfg.num_layers, *s.shape), ("layers", *s.axes), s.init)
             for n, s in layer_specs(cfg).items()}
  d, v = cfg.hidden_size, cfg.vocab_size
  return Weights(
      embed=ParamSpec((v, d), ("vocab", "embed"), "normal"),
      layers=LayerWeights(**stacked),
      final_norm=ParamSpec((d,), ("embed",), "ones"),
      lm_head=None if cfg.tie_word_embeddings else ParamSpec((d, v), ("embed", "vocab"), "normal"),
  )


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def init_weights(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Weights:
  """Random weights (normal(std) matrices, unit norms, zero biases)."""
  specs = weight_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  dtype = param_dtype(cfg)

  def make(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_weights(cfg: ModelConfig) -> Weights:
  """ShapeDtypeStructs of the weights, without allocating (restore targets, eval_shape)."""
  return jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0)))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------
# HF conversion. Each row: HF name suffix -> (our leaf, HFLayout). HF Linear
# weights are [out, in]; ours put the contracted (input) dims first. The layout
# is declarative so a loader can convert any block of a leaf on its own
# (diffmas_jax/io/sharded_load.py) without materialising the whole tensor.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFLayout:
  """How one HF tensor (torch layout) becomes one of our leaves (one layer's part).

  The HF tensor is viewed as `view` (each stored axis split into the listed
  sizes: a reshape that moves no data), then transposed: our axis j is view
  axis `perm[j]`.
  """
  view: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.view)

  @property
  def view_shape(self) -> tuple[int, ...]:
    return tuple(s for g in self.view for s in g)

  @property
  def shape(self) -> tuple[int, ...]:
    """Our shape (without the layer axis)."""
    return tuple(self.view_shape[p] for p in self.perm)

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return np.asarray(w).reshape(self.view_shape).transpose(self.perm)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def _hf_rows(cfg: ModelConfig) -> list[tuple[str, str, HFLayout]]:
  """Per-layer tensors: (HF suffix after `model.layers.{i}.`, our leaf, layout)."""
  d, h, k, e, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  in_heads = lambda n: HFLayout(((n, e), (d,)), (2, 0, 1))  # [N*Dh, D] -> [D, N, Dh]
  transposed = lambda out, inp: HFLayout(((out,), (inp,)), (1, 0))  # [out, in] -> [in, out]
  vector = lambda *split: HFLayout((split,), tuple(range(len(split))))
  rows = [
      ("input_layernorm.weight", "attn_norm", vector(d)),
      ("post_attention_layernorm.weight", "mlp_norm", vector(d)),
      ("self_attn.q_proj.weight", "q", in_heads(h)),
      ("self_attn.k_proj.weight", "k", in_heads(k)),
      ("self_attn.v_proj.weight", "v", in_heads(k)),
      ("self_attn.o_proj.weight", "o", HFLayout(((d,), (h, e)), (1, 2, 0))),  # -> [H, Dh, D]
      ("mlp.gate_proj.weight", "gate", transposed(f, d)),
      ("mlp.up_proj.weight", "up", transposed(f, d)),
      ("mlp.down_proj.weight", "down", transposed(d, f)),
  ]
  if cfg.qk_norm:
    rows += [("self_attn.q_norm.weight", "q_norm", vector(e)),
             ("self_attn.k_norm.weight", "k_norm", vector(e))]
  if cfg.qkv_bias:
    rows += [("self_attn.q_proj.bias", "q_bias", vector(h, e)),
             ("self_attn.k_proj.bias", "k_bias", vector(k, e)),
             ("self_attn.v_proj.bias", "v_bias", vector(k, e))]
  return rows


def _hf_top_rows(cfg: ModelConfig) -> dict[str, tuple[str, HFLayout]]:
  """Whole-model tensors: HF name -> (our leaf, layout)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  return {"model.embed_tokens.weight": ("embed", HFLayout(((v,), (d,)), (0, 1))),
          "model.norm.weight": ("final_norm", HFLayout(((d,),), (0,))),
          "lm_head.weight": ("lm_head", HFLayout(((v,), (d,)), (1, 0)))}  # -> [D, V]


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class CheckpointMismatchError(ValueError):
  """A state dict does not match the config (unknown, missing or mis-shaped tensors)."""


@dataclasses.dataclass(frozen=True)
class HFPlan:
  """Which HF tensors feed each leaf: layers[leaf] lists one name per layer."""
  layers: dict[str, tuple[list[str], HFLayout]]
  top: dict[str, tuple[str, HFLayout]]


def plan_hf_tensors(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> HFPlan:
  """Matches HF tensor names and shapes (no data) against the config.

  Raises CheckpointMismatchError naming every unknown, missing or mis-shaped tensor.
  """
  rows = {suffix: (ours, layout) for suffix, ours, layout in _hf_rows(cfg)}
  layer_src: dict[str, list] = {ours: [None] * cfg.num_layers for ours, _ in rows.values()}
  top_rows = _hf_top_rows(cfg)
  top_src: dict[str, tuple[str, HFLayout]] = {}
  errors: list[str] = []

  def check_shape(name, layout) -> bool:
    if tuple(shapes[name]) != layout.hf_shape:
      errors.append(f"{name}: shape {tuple(shapes[name])}, expected {layout.hf_shape}")
      return False
    return True

  for name in list(shapes):
    if _IGNORED_HF.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
      continue  # some exports also write the tied copy
    m = _LAYER_RE.match(name)
    if m and m.group(2) in rows and int(m.group(1)) < cfg.num_layers:
      ours, layout = rows[m.group(2)]
      if check_shape(name, layout):
        layer_src[ours][int(m.group(1))] = name
    elif name in top_rows:
      if check_shape(name, top_rows[name][1]):
        top_src[top_rows[name][0]] = (name, top_rows[name][1])
    else:
      errors.append(f"{name}: unknown tensor for a {cfg.family} model with "
                    f"{cfg.num_layers} layers")

  missing = [f"model.layers.{i}.{suffix}" for suffix, (ours, _) in rows.items()
             for i, src in enumerate(layer_src[ours]) if src is None]
  needed = ["embed", "final_norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
  missing += [n for n, (key, _) in top_rows.items() if key in needed and key not in top_src]
  if missing:
    errors.append(f"missing tensors ({len(missing)}): {missing[:8]}"
                  f"{' ...' if len(missing) > 8 else ''}")
  if errors:
    raise CheckpointMismatchError(
        "checkpoint does not match the model config:\n  " + "\n  ".join(errors) +
        "\nCheck that config.json belongs to these weights and that every shard downloaded.")
  layouts = {ours: layout for ours, layout in rows.values()}
  return HFPlan({ours: (names, layouts[ours]) for ours, names in layer_src.items()}, top_src)


def weights_from_hf_state_dict(cfg: ModelConfig, state: dict[str, np.ndarray],
                               consume: bool = False) -> Weights:
  """Converts an HF-named state dict (numpy, [out, in] layout) into `Weights`.

  Validates every name and shape first, then converts one leaf at a time onto
  the default device. With `consume=True` each source tensor is dropped from
  `state` once converted, so peak memory stays near one copy of the weights.
  Files are better loaded with `diffmas_jax.loading.load_model`, which reads
  only the slices each device holds.
  Raises CheckpointMismatchError naming every unknown, missing or mis-shaped tensor.
  """
  from diffmas_jax.io.sharded_load import DictSource, load_weights
  return load_weights(cfg, DictSource(state, consume=consume))


def weights_to_hf_state_dict(cfg: ModelConfig, weights: Weights) -> dict[str, np.ndarray]:
  """Inverse of `weights_from_hf_state_dict` (float32 numpy unless params are lower)."""
  out: dict[str, np.ndarray] = {}
  np_of = lambda x: np.asarray(jax.device_get(x))
  for suffix, ours, layout in _hf_rows(cfg):
    stacked = np_of(getattr(weights.layers, ours))
    for i in range(cfg.num_layers):
      out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(layout.to_hf(stacked[i]))
  out["model.embed_tokens.weight"] = np_of(weights.embed)
  out["model.norm.weight"] = np_of(weights.final_norm)
  if weights.lm_head is not None:
    out["lm_head.weight"] = np.ascontiguousarray(np_of(weights.lm_head).T)
  return out
