"""HF model directories: config.json + (sharded) safetensors, read and written atomically.

Tensors stay numpy arrays in HF naming and torch layout; bfloat16 is kept as
`ml_dtypes.bfloat16`, so nothing here needs torch or JAX.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from diffmas_jax.tokenizer import Tokenizer

INDEX = "model.safetensors.index.json"
READ_CHUNK_BYTES = 32 * 2**20  # rows mapped at once by SafetensorsSource.read
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SINGLE = "model.safetensors"


class CheckpointFileError(FileNotFoundError):
  """A model directory is missing files it needs, or holds unreadable ones."""


def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of an HF model directory (nothing else is read)."""
  if not os.path.isdir(path):
    raise CheckpointFileError(f"model directory not found: {path}; pass a directory holding "
                              "config.json and *.safetensors.")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CheckpointFileError(f"{config_file} is missing: an HF model directory needs "
                              "config.json next to its *.safetensors files; copy it from the "
                              "model's source.")
  with open(config_file) as f:
    return json.load(f)


class SafetensorsSource:
  """The tensors of an HF directory, read lazily and by slice.

  Construction reads only the safetensors headers (names, shapes, dtypes).
  `read` opens the file for the one slice it returns, so at most that slice's
  pages are ever mapped: a process reads only what its devices hold.

  Attributes:
    shapes: {HF tensor name: shape}.
    files: {HF tensor name: safetensors file path}.
    bytes_read: payload bytes returned by `read` so far (tests, benchmarks).
  """

  def __init__(self, path: str):
    weight_map = _weight_map(path)
    names = sorted(set(weight_map.values())) if weight_map else _unindexed_files(path)
    self.files: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    self.bytes_read = 0
    for name in names:
      file = os.path.join(path, name)
      with _reading(file):
        with _safe_open(file) as f:
          for key in f.keys():
            if key in self.files:
              raise CheckpointFileError(f"{path}: tensor {key!r} appears in more than one "
                                        "safetensors file; remove the stray copy.")
            self.files[key] = file
            self.shapes[key] = tuple(f.get_slice(key).get_shape())
            self.dtypes[key] = f.get_slice(key).get_dtype()
    absent = sorted(set(weight_map) - set(self.files))
    if absent:
      raise CheckpointFileError(f"{path}: {INDEX} names tensors that its shards do not hold "
                                f"(e.g. {absent[:3]}); the download is incomplete or mixed, "
                                "fetch the shards again.")

  def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """Block `index` (one slice per axis, trailing axes whole) of `name`, stored dtype.

    Read in chunks of whole rows, each through its own mapping: a column slice
    touches every page of its rows, and mapped pages count as this process's
    memory until unmapped.
    """
    file, shape = self.files[name], self.shapes[name]
    if not shape:
      index = ()
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    r0, r1, _ = index[0].indices(shape[0]) if shape else (0, 1, 1)
    row_bytes = math.prod(shape[1:]) * _ITEMSIZE.get(self.dtypes[name], 8)
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    out = None
    for a in range(r0, max(r1, r0 + 1), step):
      b = min(a + step, r1)
      with _reading(file):
        with _safe_open(file) as f:
          part = f.get_slice(name)[(slice(a, b), *index[1:]) if shape else slice(None)]
      if out is None:
        if b == r1:  # a single chunk: no copy
          out = part
          break
        out = np.empty((r1 - r0, *part.shape[1:]), part.dtype)
      out[a - r0:b - r0] = part
    self.bytes_read += out.nbytes
    return out


def open_hf_dir(path: str) -> tuple[dict[str, Any], SafetensorsSource]:
  """An HF model directory's config and its tensors as a lazy `SafetensorsSource`.

  Weights come from `model.safetensors.index.json` and the shards it names,
  else `model.safetensors`, else every `*.safetensors` file in the directory.
  """
  config = read_hf_config(path)
  return config, SafetensorsSource(path)


def read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads an HF model directory's config and all of its weights into memory.

  Args:
    path: the directory (see `open_hf_dir` for which files are read).

  Returns:
    (config.json as a dict, {HF tensor name: numpy array in the stored dtype}).
  """
  config, source = open_hf_dir(path)
  return config, {name: source.read(name) for name in source.shapes}


def write_hf_dir(path: str, config: Mapping[str, Any], state: Mapping[str, Any],
                 tokenizer: Tokenizer | None = None, max_shard_bytes: int | None = None) -> str:
  """Writes an HF model directory; readers never see a half-written one.

  Everything goes into a temporary directory beside `path`, which is then
  renamed into place (replacing an existing directory of that name).

  Args:
    path: the directory to create.
    config: config.json contents.
    state: {HF tensor name: array}; numpy, ml_dtypes bfloat16 or JAX arrays.
    tokenizer: also written (tokenizer.json, tokenizer_config.json, ...) if given.
    max_shard_bytes: split weights into `model-0000i-of-0000n.safetensors` files
      of at most this many bytes (a larger single tensor gets its own file) plus
      an index; None writes one `model.safetensors`.

  Returns:
    `path`.
  """
  from safetensors.numpy import save_file

  target = os.path.abspath(path)
  if os.path.lexists(target) and (os.path.islink(target) or not os.path.isdir(target)):
    raise FileExistsError(f"{target} exists and is not a directory; choose another output path.")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
  try:
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
    shards = _split(arrays, max_shard_bytes)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
      save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
               "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
      _write_json(os.path.join(tmp, INDEX), index)
    _write_json(os.path.join(tmp, "config.json"), dict(config))
    _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(config))
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _weight_map(path: str) -> dict[str, str]:
  """The index's {tensor: shard file}, checked for missing shards; {} without an index."""
  index_file = os.path.join(path, INDEX)
  if not os.path.exists(index_file):
    return {}
  with open(index_file) as f:
    weight_map = json.load(f).get("weight_map")
  if not weight_map:
    raise CheckpointFileError(f"{index_file} has no weight_map; re-download it.")
  missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(path, s))})
  if missing:
    raise CheckpointFileError(f"{path}: {INDEX} lists shard file(s) that are missing: "
                              f"{missing}. The download is incomplete; fetch those files again.")
  return weight_map


def _unindexed_files(path: str) -> list[str]:
  if os.path.isfile(os.path.join(path, SINGLE)):
    return [SINGLE]
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    found = f" (found {pickles})" if pickles else ""
    raise CheckpointFileError(
        f"{path}: no *.safetensors weights found{found}. PyTorch .bin checkpoints are not "
        "supported; convert them once with transformers: `AutoModelForCausalLM."
        "from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`.")
  return files


def _safe_open(file: str):
  from safetensors import safe_open
  return safe_open(file, framework="numpy")


@contextlib.contextmanager
def _reading(file: str):
  """Turns any safetensors failure on `file` into a CheckpointFileError with advice."""
  try:
    yield
  except CheckpointFileError:
    raise
  except Exception as e:  # safetensors raises its own error types; every cause needs this advice
    raise CheckpointFileError(
        f"could not read {file} ({type(e).__name__}: {e}). A truncated file means an incomplete "
        "download (fetch it again); a dtype error needs newer libraries "
        "(`pip install -U safetensors ml_dtypes`).") from e


def _split(arrays: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Groups tensors in order into shards of at most max_bytes (one oversized tensor alone)."""
  if not max_bytes:
    return [arrays]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, value in arrays.items():
    if shards[-1] and size + value.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = value
    size += value.nbytes
  return shards


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {k: config[k] for k in keys if config.get(k) is not None}


def _replace_dir(new: str, target: str) -> None:
  """Renames `new` to `target`; an old `target` is moved aside first and deleted after.

  `new` comes from mkdtemp (mode 0700) and safetensors writes its files 0600;
  they get the modes a plain mkdir / open would give (0777 / 0666 minus the
  umask), so an export is as readable as any other directory.
  """
  mask = _umask()
  for root, dirs, files in os.walk(new):
    os.chmod(root, 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~mask)
  if not os.path.lexists(target):
    os.replace(new, target)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
  os.replace(target, os.path.join(old, "dir"))
  try:
    os.replace(new, target)
  except BaseException:
    os.replace(os.path.join(old, "dir"), target)  # put the previous version back
    raise
  finally:
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
  mask = os.umask(0)  # the only way to read it; set straight back
  os.umask(mask)
  return mask


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
