"""Evaluation data parallel over one process's devices (8 fake CPU devices, conftest)
equals the single-device path; batches that do not divide the devices keep every record."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffmas_jax import eval_mesh, lora as lora_lib, sharding
from diffmas_jax.evaluation import evaluate
from diffmas_jax.methods import latent_mas
from test_eval_harness import _cfg
from test_methods import RECORDS, tiny_model

METHODS = ["single", "text_mas", "latent_mas", "diffmas", "spy"]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def lora(model):
  cfg = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
  params = lora_lib.init_lora(model.cfg, cfg, jax.random.key(1))
  return jax.tree.map(lambda x: x + 0.05, params)  # non-zero B: the adapters change outputs


@pytest.fixture(scope="module")
def runs(model, lora, tmp_path_factory):
  """The same evaluation (3 records in one batch of 3, sampled at T 0.7) on one
  device and on the default mesh (all 8 devices: 3 rows padded to 8)."""
  cfg = _cfg(batch_size=3, temperature=0.7, top_p=0.9)
  out = {}
  for name, mesh in (("one", sharding.make_mesh(devices=jax.local_devices()[:1])),
                     ("all", None)):
    seen = []

    def spy(ctx, records, seed=0, seen=seen):  # what a method is handed
      seen.append((ctx.mesh.devices.size, len(records),
                   [s.data.shape for s in ctx.put(np.zeros((len(records), 5))).addressable_shards]))
      return latent_mas.run(ctx, records, seed)

    result = evaluate(model, RECORDS, METHODS, cfg.eval, cfg.agents,
                      str(tmp_path_factory.mktemp(name)), lora=lora,
                      extra_methods={"spy": spy}, progress=False, mesh=mesh)
    out[name] = (result, seen)
  return out


def test_batch_is_split_over_every_local_device(runs):
  assert jax.local_device_count() == 8
  assert runs["one"][1] == [(1, 3, [(3, 5)])]
  assert runs["all"][1] == [(8, 8, [(1, 5)] * 8)]  # 3 rows padded to 8, one per device


def test_data_parallel_rows_equal_the_single_device_rows(runs):
  one, all_ = runs["one"][0]["records"], runs["all"][0]["records"]
  assert len(one) == len(all_) == len(METHODS) * len(RECORDS)  # padding dropped, none lost
  exact = ("method", "id", "seed", "raw_output", "prediction", "output_tokens", "answer_tokens",
           "trace_len_per_agent", "agent_texts")
  for a, b in zip(one, all_, strict=True):
    assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
    np.testing.assert_allclose([a["answer_nll"], a["mean_token_entropy"]],
                               [b["answer_nll"], b["mean_token_entropy"]], rtol=1e-5)
  # The adapters and the sampling matter here, so the comparison can fail.
  by = {(r["method"], r["id"]): r["raw_output"] for r in one}
  assert any(by[("latent_mas", i)] != by[("diffmas", i)] for i in ("0", "1", "2"))


def test_summaries_agree(runs):
  figures = lambda r: json.dumps({m: {k: v for k, v in f.items() if k != "seconds_per_sample"}
                                  for m, f in r["methods"].items()}, sort_keys=True)
  one, all_ = (json.loads(figures(runs[n][0])) for n in ("one", "all"))
  assert one.keys() == all_.keys()
  for m in one:
    for k, v in one[m].items():
      assert all_[m][k] == pytest.approx(v, rel=1e-5), (m, k)


def test_padding_rounds_up_to_the_batch_shards():
  mesh = sharding.make_mesh(data=4, fsdp=2)
  assert [eval_mesh.padded_rows(n, mesh) for n in (1, 8, 9)] == [8, 8, 16]
  assert eval_mesh.padded_rows(3, None) == 3
  with pytest.raises(sharding.ShardingError, match="batch=3 cannot be split"):
    eval_mesh.put_rows(np.zeros((3, 2)), mesh)


def test_placement_keeps_leaves_on_the_mesh_and_replicates_the_rest():
  mesh = eval_mesh.inference_mesh({"w": np.zeros(2)})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert eval_mesh.local_mesh(mesh) is mesh  # one process: its block is the whole mesh
  on = jax.device_put(np.arange(8.0), NamedSharding(mesh, P("data")))
  placed = eval_mesh.on_mesh({"on": on, "host": np.ones(3)}, mesh)
  assert placed["on"] is on
  assert placed["host"].sharding == NamedSharding(mesh, P())
  assert eval_mesh.inference_mesh(placed) is mesh


@pytest.mark.parametrize("parallelism, tensor", [("auto", 1), ("tensor", 2)])
def test_launch_eval_loads_into_the_config_mesh(tmp_path, parallelism, tensor):
  from configs import eval_arc
  from launch.eval import load_eval_model
  from tests.conftest import make_hf_model
  from tests.test_loading import save_tiny_tokenizer
  make_hf_model("qwen3").save_pretrained(tmp_path)  # 4 heads, 2 kv heads: tensor <= 2
  save_tiny_tokenizer(tmp_path)
  cfg = eval_arc.get_config("quick")
  cfg.model.source, cfg.mesh.parallelism = str(tmp_path), parallelism
  weights = load_eval_model(cfg).weights
  # Layer 0's per-layer buffer: heads over tensor ([D, H, Dh]); replicated weights
  # have q|k|v fused ([D, K, G + 2, Dh], model.per_layer).
  q = weights.layers[0].q
  assert isinstance(weights.layers, tuple)
  assert dict(q.sharding.mesh.shape) == {"data": 8 // tensor, "fsdp": 1, "tensor": tensor}
  if tensor == 1:
    assert q.shape[1:3] == (2, 4) and q.sharding.is_fully_replicated
  else:
    assert weights.layers[0].k is not None  # split matrices are not fused
    assert {s.data.shape[1] for s in q.addressable_shards} == {4 // tensor}
  assert len(q.sharding.device_set) == 8
