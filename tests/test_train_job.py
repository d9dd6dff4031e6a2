"""`launch.train` as users run it: kill-and-resume equivalence, NaN stop, clear errors."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import make_hf_model
from tests.test_loading import save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
  """A tiny Qwen3 HF directory (word-level ChatML tokenizer) and a jsonl of 4 pairs."""
  root = tmp_path_factory.mktemp("job")
  model_dir = root / "model"
  make_hf_model("qwen3", seed=1).save_pretrained(model_dir)
  save_tiny_tokenizer(model_dir)
  rng = np.random.default_rng(0)
  with open(root / "pairs.jsonl", "w") as f:
    for i in range(4):
      q = " ".join(f"w{j}" for j in rng.integers(3, 120, 6))
      t = " ".join(f"w{j}" for j in rng.integers(3, 120, 5))
      f.write(json.dumps({"question": q, "target": t}) + "\n")
  return str(model_dir), str(root / "pairs.jsonl")


def _args(model_dir, data_path, workdir, *extra):
  return [sys.executable, "-m", "launch.train", "--config=configs/gpqa.py:quickstart",
          f"--workdir={workdir}", "--skip_eval", f"--config.model.source={model_dir}",
          "--config.train.data=jsonl", f"--config.train.data_path={data_path}",
          "--config.train.num_examples=0", "--config.train.epochs=2", "--config.train.grad_accum=2",
          "--config.train.lr=1e-2", "--config.train.max_prompt_tokens=96",
          "--config.train.max_target_tokens=8", "--config.agents.latent_steps=2",
          "--config.lora.rank=2", "--config.lora.dropout=0.1", *extra]


def _run(args, kill_after_save=None, expect_rc=0):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env.pop("DIFFMAS_TEST_KILL_AFTER_SAVE", None)
  if kill_after_save is not None:
    env["DIFFMAS_TEST_KILL_AFTER_SAVE"] = str(kill_after_save)
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc


def _final_state(workdir):
  import orbax.checkpoint as ocp
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*"))
  restored = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{steps[-1]}/state")
  import jax
  return steps[-1], jax.tree.leaves(restored)


def test_kill_at_any_moment_then_resume_ends_bitwise_equal(tiny_job, tmp_path):
  model_dir, data_path = tiny_job
  straight = tmp_path / "straight"
  _run(_args(model_dir, data_path, straight))
  interrupted = tmp_path / "interrupted"
  # SIGKILL right after starting the (asynchronous) save of micro-step 4: mid-save.
  _run(_args(model_dir, data_path, interrupted), kill_after_save=4, expect_rc=-9)
  # Resume, and get killed again mid-save at micro-step 6.
  _run(_args(model_dir, data_path, interrupted), kill_after_save=6, expect_rc=-9)
  _run(_args(model_dir, data_path, interrupted))  # finishes
  step_a, leaves_a = _final_state(straight)
  step_b, leaves_b = _final_state(interrupted)
  assert step_a == step_b == 8
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The adapter actually trained (B left zero-init), and the exported adapters match.
  assert any(np.abs(np.asarray(x)).max() > 0 for x in leaves_a)
  for name in ("adapter_model.safetensors",):
    ours = sorted(glob.glob(f"{straight}/adapter/**/{name}", recursive=True))
    theirs = sorted(glob.glob(f"{interrupted}/adapter/**/{name}", recursive=True))
    assert ours and len(ours) == len(theirs)
    for x, y in zip(ours, theirs):
      assert open(x, "rb").read() == open(y, "rb").read()
  # Metrics: one row per update, none lost or duplicated by the restarts.
  from diffmas_jax.logging_utils import read_metrics
  rows = read_metrics(f"{interrupted}/metrics.jsonl")
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # 0: the probe before training
  straight_rows = read_metrics(f"{straight}/metrics.jsonl")
  assert [r.get("loss") for r in rows] == [r.get("loss") for r in straight_rows]
  # The fixed-set probe loss (quickstart: 4 examples) is logged for every update, and
  # training on those same 4 examples at lr 1e-2 lowers it.
  probe = [r["probe_loss"] for r in rows]
  assert probe == [r["probe_loss"] for r in straight_rows]
  assert all(np.isfinite(probe)) and probe[-1] < probe[0], probe
  assert os.path.exists(f"{straight}/loss.png")
  # A rerun of a finished job trains nothing more.
  _run(_args(model_dir, data_path, straight))
  assert _final_state(straight)[0] == 8


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_job, tmp_path):
  model_dir, data_path = tiny_job
  # lr 1e30: the first update is finite, the next forward overflows.
  proc = _run(_args(model_dir, data_path, tmp_path / "nan", "--config.train.lr=1e30",
                    "--config.train.max_grad_norm=1e30", "--config.train.grad_accum=1"),
              expect_rc=2)
  assert "non-finite loss" in proc.stderr and "last good checkpoint is micro-step" in proc.stderr
  assert os.path.isdir(tmp_path / "nan" / "checkpoints" / "1")


def test_missing_inputs_fail_fast_with_instructions(tiny_job, tmp_path):
  model_dir, data_path = tiny_job
  proc = _run([sys.executable, "-m", "launch.train", "--config=configs/gpqa.py",
               f"--workdir={tmp_path}/gpqa"], expect_rc=2)
  assert "gpqa_diamond" in proc.stderr and "--config.eval.data_path" in proc.stderr
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  proc = _run(_args(model_dir, str(empty), tmp_path / "e"), expect_rc=2)
  assert "empty.jsonl" in proc.stderr
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "w5"}\n')
  proc = _run(_args(model_dir, str(bad), tmp_path / "b"), expect_rc=2)
  assert "line 1" in proc.stderr and "target" in proc.stderr
  proc = _run(_args(model_dir, data_path, tmp_path / "m", "--config.train.grad_mode=sideways"),
              expect_rc=2)
  assert "error: train.grad_mode='sideways' does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _run(_args(model_dir, data_path, tmp_path / "k", "--config.train.lrr=1"), expect_rc=1)
  assert "lrr" in proc.stderr and "Did you mean" in proc.stderr and "Traceback" not in proc.stderr
  # Model and data problems are reported together, before anything is loaded.
  proc = _run(_args(str(tmp_path / "no_model"), str(tmp_path / "no.jsonl"), tmp_path / "t"),
              expect_rc=2)
  assert "no_model" in proc.stderr and "no.jsonl" in proc.stderr
