"""Multi-process settings, the batch arithmetic on any mesh, and remote (gs://) workdirs."""

import json
import os

import numpy as np
import pytest

from diffmas_jax import data
from launch import runtime


def test_distributed_args_from_flags_env_or_auto_detection():
  args = runtime.distributed_args
  assert args(False, env={}) is None  # a plain single-process run
  assert args(True, env={}) == {}  # --multihost alone: jax auto-detects (TPU, SLURM, ...)
  full = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
  assert args(False, "10.0.0.1:1234", 4, 2, env={}) == full  # explicit flags imply multihost
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  assert args(True, env=env) == full
  assert args(True, process_id=3, env=env)["process_id"] == 3  # flags win over the env
  assert args(True, env={"JAX_PROCESS_ID": "1"}) == {"process_id": 1}  # rest: SLURM etc.
  assert args(True, num_processes=1, env={}) is None  # one process: nothing to join
  with pytest.raises(runtime.MultihostConfigError, match="outside 0..1"):
    args(True, "h:1", 2, 2, env={})
  with pytest.raises(runtime.MultihostConfigError, match="needs a port"):
    args(True, "10.0.0.1", 2, 0, env={})
  with pytest.raises(runtime.MultihostConfigError, match="integers"):
    args(True, env={"JAX_NUM_PROCESSES": "two"})


@pytest.mark.parametrize("batch,accum,shards,per_call,calls", [
    (1, 64, 1, 1, 64), (1, 64, 8, 8, 8), (1, 64, 4, 4, 16), (2, 32, 8, 8, 8), (8, 8, 4, 8, 8),
    (3, 4, 4, 4, 3), (1, 64, 64, 64, 1)])
def test_batch_plan_keeps_the_update_size_on_any_mesh(batch, accum, shards, per_call, calls):
  plan = data.plan_batches(batch, accum, shards)
  assert (plan.per_call, plan.grad_accum) == (per_call, calls)
  assert plan.effective == batch * accum and plan.per_call % shards == 0
  assert f"batch: {batch * accum} examples per update" in plan.describe()
  # Same updates, same examples per update: micro-steps walk the same stream.
  n = 100
  updates = data.num_micro_steps(n, 1.0, plan.per_call, plan.grad_accum) // plan.grad_accum
  assert updates == data.num_micro_steps(n, 1.0, batch, accum) // accum
  first = np.concatenate([data.micro_batch_indices(n, plan.per_call, m, 0)
                          for m in range(plan.grad_accum)])
  np.testing.assert_array_equal(first, np.concatenate(
      [data.micro_batch_indices(n, batch, m, 0) for m in range(accum)]))


def test_batch_plan_refuses_an_impossible_split_naming_valid_sizes():
  with pytest.raises(data.TrainDataError) as e:
    data.plan_batches(1, 64, 3)
  msg = str(e.value)
  assert "63 or 66" in msg and "1, 2, 4, 8, 16, 32, 64" in msg and "data x fsdp" in msg
  with pytest.raises(data.TrainDataError, match="multiple of 128"):
    data.plan_batches(1, 64, 128)


def test_remote_workdir_stays_a_url_and_goes_through_epath(fake_gcs, tmp_path, monkeypatch):
  from diffmas_jax import checkpoint, paths
  from diffmas_jax.eval import ResultStore, write_summary
  from diffmas_jax.logging_utils import MetricsLogger, plot_loss_curve, read_metrics

  monkeypatch.chdir(tmp_path)  # any local "gs:" directory would appear here
  work = "gs://bucket/run"
  assert runtime.make_workdir(work, "x") == work
  logger = MetricsLogger(work, write=True)
  assert logger.path == "gs://bucket/run/metrics.jsonl"
  for step in (1, 2):
    logger.log(step, loss=1.0 / step)
  assert [r["loss"] for r in read_metrics(logger.path)] == [1.0, 0.5]
  plot_loss_curve(logger.path, f"{work}/loss.png")
  store = ResultStore(f"{work}/results.jsonl")
  store.extend([{"method": "m", "id": i, "correct": i % 2 == 0} for i in range(3)])
  assert len(ResultStore(f"{work}/results.jsonl").records) == 3
  md, png = write_summary(store.records, work, "t")
  assert md == "gs://bucket/run/summary.md" and png == "gs://bucket/run/accuracy.png"
  with paths.local_dir_for(f"{work}/adapter") as local:
    assert not paths.is_url(local)
    with open(os.path.join(local, "adapter_config.json"), "w") as f:
      json.dump({"r": 2}, f)
  # Orbax gets the URL as an epath.Path (it needs google-cloud-storage to touch GCS).
  seen = []
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda d, **kw: seen.append(d))
  ckpt = checkpoint.Checkpointer(f"{work}/checkpoints", 1, async_save=False)
  assert ckpt.directory == "gs://bucket/run/checkpoints"
  assert str(seen[0]) == "gs://bucket/run/checkpoints" and paths.is_url(str(seen[0]))
  assert not os.path.exists(tmp_path / "gs:")
  written = sorted(os.listdir(fake_gcs / "bucket" / "run"))
  for name in ("metrics.jsonl", "loss.png", "results.jsonl", "summary.md", "summary.json",
               "accuracy.png", "adapter"):
    assert name in written, written
  assert json.loads((fake_gcs / "bucket/run/adapter/adapter_config.json").read_text()) == {"r": 2}


def test_metrics_are_written_by_process_zero_only(tmp_path):
  from diffmas_jax.logging_utils import MetricsLogger
  other = MetricsLogger(str(tmp_path), write=False)
  assert other.log(1, loss=2.0)["loss"] == 2.0
  assert not os.path.exists(other.path)
