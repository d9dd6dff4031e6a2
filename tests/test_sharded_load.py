"""Sharded loading: weights go straight into their NamedShardings, reading only each block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model
from diffmas_jax import model as model_lib
from diffmas_jax import sharding
from diffmas_jax.config import ModelConfig
from diffmas_jax.io import gguf as gguf_io
from diffmas_jax.io.safetensors_io import SafetensorsSource, open_hf_dir
from diffmas_jax.io.sharded_load import DictSource, load_weights, read_block
from diffmas_jax.params import _hf_rows, weights_from_hf_state_dict
from test_io_gguf import write_tiny_gguf
from test_loading import save_tiny_tokenizer

MESHES = [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=1, tensor=8)]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  """A tiny qwen2 (q/k/v biases, untied head) in several safetensors files; 8 heads."""
  path = tmp_path_factory.mktemp("qwen2")
  hf = make_hf_model("qwen2", seed=7, num_attention_heads=8, num_key_value_heads=8, head_dim=4)
  hf.save_pretrained(path, max_shard_size="30KB")
  save_tiny_tokenizer(path)
  assert len(list(path.glob("*.safetensors"))) > 2
  return str(path), hf


def _load(path, mesh=None, dtype="float32"):
  config, source = open_hf_dir(path)
  cfg = ModelConfig.from_hf(config, dtype=dtype)
  shardings = None if mesh is None else sharding.weight_shardings(cfg, mesh)
  return cfg, load_weights(cfg, source, shardings), shardings, source


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(map(str, a.values())))
def test_sharded_load_equals_unsharded_and_reads_each_byte_once(qwen2_dir, axes):
  path, _ = qwen2_dir
  _, whole, _, _ = _load(path)
  mesh = sharding.make_mesh(**axes)
  _, weights, expected, source = _load(path, mesh)
  got_sh = jax.tree.map(lambda x: x.sharding, weights)
  assert jax.tree.structure(got_sh) == jax.tree.structure(expected)
  for got, want, ref in zip(jax.tree.leaves(got_sh), jax.tree.leaves(expected),
                            jax.tree.leaves(whole)):
    assert got == want
    assert got.is_equivalent_to(want, ref.ndim)
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Blocks that several devices replicate are read once, and no block reads
  # more than it covers: the whole checkpoint is read exactly once.
  total = sum(int(np.prod(s)) * 4 for s in source.shapes.values())
  assert source.bytes_read == total


def test_sharded_weights_match_transformers(qwen2_dir):
  path, hf = qwen2_dir
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  from diffmas_jax.loading import load_model
  m = load_model(path, mesh=mesh)
  assert m.weights.layers.q.sharding == sharding.weight_shardings(m.cfg, mesh).layers.q
  # What the trainer does with them is a no-op: no second, unsharded copy exists.
  again = sharding.shard(m.weights, sharding.weight_shardings(m.cfg, mesh))
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(m.weights)))
  tokens = np.random.RandomState(0).randint(0, 128, (2, 7))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(model_lib.forward_no_cache(m.weights, m.cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_a_device_reads_only_its_block(qwen2_dir):
  path, _ = qwen2_dir
  cfg = ModelConfig.from_hf(open_hf_dir(path)[0])
  source = SafetensorsSource(path)
  rows = {ours: (suffix, layout) for suffix, ours, layout in _hf_rows(cfg)}
  suffix, layout = rows["q"]  # ours [D, H, Dh] from HF [H*Dh, D]
  name = f"model.layers.1.{suffix}"
  full = layout.to_ours(source.read(name))
  before = source.bytes_read
  index = (slice(8, 16), slice(2, 4), slice(None))  # a quarter of D, heads 2-3
  block = read_block(source, name, layout, index)
  np.testing.assert_array_equal(block, full[index])
  assert source.bytes_read - before == block.size * 4 == full.nbytes // 16
  # An inner sub-range of a split axis (part of head_dim) reads whole heads, no more.
  index = (slice(None), slice(5, 6), slice(1, 3))
  before = source.bytes_read
  np.testing.assert_array_equal(read_block(source, name, layout, index), full[index])
  assert source.bytes_read - before == full.nbytes // 8


def test_bf16_checkpoint_converts_per_slice(tmp_path):
  hf = make_hf_model("qwen3", seed=3).to(torch.bfloat16)
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  config, source = open_hf_dir(str(tmp_path))
  state = {k: source.read(k) for k in source.shapes}
  assert {v.dtype.name for v in state.values()} == {"bfloat16"}
  reads = []
  real_read = source.read
  source.read = lambda name, index: reads.append(real_read(name, index)) or reads[-1]
  cfg = ModelConfig.from_hf(config, dtype="float32")
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  weights = load_weights(cfg, source, sharding.weight_shardings(cfg, mesh))
  assert all(r.dtype.name == "bfloat16" for r in reads)  # the file's dtype, slice by slice
  assert max(r.size for r in reads) < max(v.size for v in state.values())
  want = weights_from_hf_state_dict(cfg, {k: v.astype(np.float32) for k, v in state.items()})
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dict_source_consumes_converted_tensors(qwen2_dir):
  path, _ = qwen2_dir
  config, source = open_hf_dir(path)
  state = {k: source.read(k) for k in source.shapes}
  cfg = ModelConfig.from_hf(config)
  weights_from_hf_state_dict(cfg, state, consume=True)
  assert state == {}


def test_gguf_loads_sharded_by_row_blocks(tmp_path):
  write_tiny_gguf(tmp_path / "m.gguf", heads=4, kv_heads=2, d=16, f=24)
  source = gguf_io.GGUFSource(str(tmp_path / "m.gguf"))
  cfg = ModelConfig.from_hf(source.hf_config)
  whole = weights_from_hf_state_dict(cfg, gguf_io.load_gguf(str(tmp_path / "m.gguf")).state_dict)
  # The vocab (12 tokens) is split over tensor x fsdp: 4 divides it, 8 would not.
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  weights = load_weights(cfg, source, sharding.weight_shardings(cfg, mesh))
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Row ranges that cut through a head still come back in HF row order.
  q = "model.layers.1.self_attn.q_proj.weight"
  np.testing.assert_array_equal(source.read(q, (slice(3, 11), slice(2, 5))),
                                source.read(q)[3:11, 2:5])


def test_quantised_gguf_rows_dequantise_alone():
  source = gguf_io.GGUFSource(gguf_io.default_gguf_path())  # Q4_1 / Q8_0 tensors
  for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight"):
    full = source.read(name, (slice(0, 192),))
    np.testing.assert_array_equal(source.read(name, (slice(70, 130), slice(64, 128))),
                                  full[70:130, 64:128])


def test_dict_source_rejects_mismatched_checkpoints():
  cfg = ModelConfig.from_hf(make_hf_model("qwen3").config.to_dict())
  from diffmas_jax.params import CheckpointMismatchError
  with pytest.raises(CheckpointMismatchError, match="missing tensors"):
    load_weights(cfg, DictSource({"model.norm.weight": np.ones(32, np.float32)}))


def test_safetensors_reads_in_row_chunks(qwen2_dir, monkeypatch):
  from diffmas_jax.io import safetensors_io
  path, _ = qwen2_dir
  source = SafetensorsSource(path)
  name = "model.layers.0.mlp.down_proj.weight"  # [32, 64] f32: 256-byte rows
  full = source.read(name)
  monkeypatch.setattr(safetensors_io, "READ_CHUNK_BYTES", 3 * 256)  # 3 rows per mapping
  np.testing.assert_array_equal(source.read(name, (slice(1, 30), slice(5, 20))), full[1:30, 5:20])
  np.testing.assert_array_equal(source.read(name, (slice(4, 6),)), full[4:6])
  norm = SafetensorsSource(path).read("model.norm.weight")  # 1-D, 128 bytes: 1 chunk
  monkeypatch.setattr(safetensors_io, "READ_CHUNK_BYTES", 40)  # 10 floats per mapping
  np.testing.assert_array_equal(source.read("model.norm.weight", (slice(3, 31),)), norm[3:31])
