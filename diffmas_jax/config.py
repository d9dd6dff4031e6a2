"""Static model configuration for the decoder families we support.

One frozen dataclass covers Qwen3 (per-head q/k RMSNorm), Llama (incl. Llama 3
`rope_scaling`) and Qwen2/2.5 (q/k/v bias). `ModelConfig.from_hf` builds it from
an HF `config.json` through an allow-list: an attribute we do not model raises,
so a checkpoint is never silently run with the wrong architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("qwen3", "llama", "qwen2")
DTYPES = ("float32", "bfloat16", "float16", "float64")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attn", "attn_mlp")


class UnsupportedConfigError(ValueError):
  """An HF config asks for something this implementation does not model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style frequency-dependent RoPE scaling (rope_type == "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of a decoder-only transformer; hashable, so jit-static."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"  # parameter and activation dtype; norms/softmax run in f32
  remat: str = "none"  # activation checkpointing policy per layer, see model.REMAT
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise UnsupportedConfigError(f"family={self.family!r}; supported: {FAMILIES}")
    if self.dtype not in DTYPES:
      raise UnsupportedConfigError(f"dtype={self.dtype!r}; supported: {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      raise UnsupportedConfigError(f"remat={self.remat!r}; supported: {REMAT_POLICIES}")
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def qk_norm(self) -> bool:
    return self.family == "qwen3"

  @property
  def qkv_bias(self) -> bool:
    return self.family == "qwen2"

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from an HF `config.json` dict, refusing unknown features."""
    return _from_hf(cls, dict(hf), overrides)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict that transformers reads back as the same model."""
    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    out: dict[str, Any] = {
        "architectures": [arch[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.dtype,
        "rope_scaling": None,
    }
    if self.family == "llama":
      out.update(attention_bias=False, mlp_bias=False)
    if self.family == "qwen3":
      out.update(attention_bias=False)
    if self.rope_scaling is not None:
      out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    if self.bos_token_id is not None:
      out["bos_token_id"] = self.bos_token_id
    if self.eos_token_id is not None:
      out["eos_token_id"] = self.eos_token_id
    return out


# Keys we either read below or know to carry no architectural meaning here.
_KNOWN_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "pad_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "_name_or_path", "tokenizer_class", "id2label",
    "label2id", "bad_words_ids", "prefix", "task_specific_params",
    "max_window_layers", "layer_types", "bos_token_id", "eos_token_id", "head_dim",
    "embd_pdrop", "resid_pdrop", "mlp_bias", "attention_bias", "pretraining_tp",
    "use_sliding_window", "sliding_window", "rope_scaling", "rope_theta", "rope_parameters",
    "hidden_act", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings",
    "rms_norm_eps", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "is_decoder", "chunk_size_feed_forward", "tie_encoder_decoder",
    "problem_type", "torchscript", "keys_to_ignore_at_inference", "is_encoder_decoder",
})


def _require(cond: bool, msg: str):
  if not cond:
    raise UnsupportedConfigError(msg)


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  """Reads rope theta/scaling from either the classic or the `rope_parameters` layout."""
  params = hf.get("rope_parameters") or {}
  theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
  scaling = hf.get("rope_scaling")
  if scaling is None and params.get("rope_type", "default") != "default":
    scaling = params
  if not scaling:
    return theta, None
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type == "default":
    return theta, None
  _require(rope_type == "llama3",
           f"rope_scaling type {rope_type!r} is not supported (only 'llama3' and none). "
           "Remove rope_scaling from config.json if the model was trained without it.")
  return theta, RopeScaling(
      factor=float(scaling["factor"]),
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _from_hf(cls, hf: dict, overrides: dict) -> ModelConfig:
  family = hf.get("model_type")
  _require(family in FAMILIES,
           f"model_type={family!r} is not supported; supported families: {FAMILIES}.")
  unknown = sorted(k for k in hf if k not in _KNOWN_KEYS)
  _require(not unknown,
           f"config.json has attributes this implementation does not handle: {unknown}. "
           "They may change the architecture; if they are harmless metadata, drop them from "
           "config.json (or add them to config._KNOWN_KEYS after checking).")
  _require(hf.get("hidden_act", "silu") == "silu",
           f"hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu').")
  _require(not hf.get("mlp_bias", False), "mlp_bias=True is not supported.")
  _require(hf.get("pretraining_tp", 1) == 1, "pretraining_tp != 1 is not supported.")
  if family in ("qwen2", "qwen3"):
    _require(not hf.get("use_sliding_window", False),
             "use_sliding_window=True (sliding-window attention) is not supported; set it to "
             "false in config.json (the released Qwen checkpoints ship it disabled).")
  layer_types = hf.get("layer_types")
  _require(layer_types is None or all(t == "full_attention" for t in layer_types),
           f"layer_types other than 'full_attention' are not supported: {set(layer_types or [])}")
  if family == "llama":
    _require(not hf.get("attention_bias", False), "llama attention_bias=True is not supported.")
  if family == "qwen3":
    _require(not hf.get("attention_bias", False), "qwen3 attention_bias=True is not supported.")
  theta, scaling = _rope_from_hf(hf)
  heads = int(hf["num_attention_heads"])
  kwargs = dict(
      family=family,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
      intermediate_size=int(hf["intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      bos_token_id=_first_id(hf.get("bos_token_id")),
      eos_token_id=_first_id(hf.get("eos_token_id")),
  )
  kwargs.update(overrides)
  return cls(**kwargs)


def _first_id(value) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def _qwen3(hidden, inter, layers, heads, tied) -> ModelConfig:
  return ModelConfig(family="qwen3", vocab_size=151936, hidden_size=hidden, num_layers=layers,
                     num_heads=heads, num_kv_heads=8, head_dim=128, intermediate_size=inter,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)


# Published Qwen3 dense shapes (config.json of each Qwen/Qwen3-* release).
PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2),
}


def tiny_config(family: str = "qwen3", **kw) -> ModelConfig:
  """A few-KB model for tests: every architectural feature, tiny shapes."""
  base = dict(family=family, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=512)
  base.update(kw)
  return ModelConfig(**base)
