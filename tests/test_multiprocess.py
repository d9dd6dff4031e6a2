"""Multi-process training and evaluation with real processes over jax.distributed.

Two local processes (CPU collectives over gloo), each with 2 fake CPU devices,
run `python -m launch.train` on a tiny random Qwen3 and are compared with one
process holding all 4 devices: same adapters, each result written once, the
same summary, one metrics row per update, and kill + restart bitwise equal.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import make_hf_model
from tests.test_loading import save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4  # in total, in every run
TIMEOUT_S = 900  # per launch; ~1 min on an idle 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """A tiny Qwen3 directory, 8 training pairs and 6 AIME-format eval items."""
  root = tmp_path_factory.mktemp("mp")
  model_dir = root / "model"
  make_hf_model("qwen3", seed=2).save_pretrained(model_dir)
  save_tiny_tokenizer(model_dir)
  rng = np.random.default_rng(0)
  words = lambda n: " ".join(f"w{j}" for j in rng.integers(3, 120, n))
  with open(root / "pairs.jsonl", "w") as f:
    for _ in range(8):
      f.write(json.dumps({"question": words(6), "target": words(5)}) + "\n")
  with open(root / "aime.jsonl", "w") as f:
    for i in range(100, 106):
      f.write(json.dumps({"id": i, "problem": words(5), "answer": str(i)}) + "\n")
  return root


def _args(root, workdir, *extra):
  return ["-m", "launch.train", "--config=configs/gpqa.py:quickstart", f"--workdir={workdir}",
          f"--config.model.source={root / 'model'}", "--config.train.data=jsonl",
          f"--config.train.data_path={root / 'pairs.jsonl'}", "--config.train.num_examples=0",
          "--config.train.epochs=2", "--config.train.batch_size=1",
          "--config.train.grad_accum=4", "--config.train.lr=1e-2",
          "--config.train.max_prompt_tokens=96", "--config.train.max_target_tokens=8",
          "--config.train.probe_examples=0", "--config.agents.latent_steps=2",
          "--config.agents.roles=('planner',)", "--config.lora.rank=2",
          "--config.lora.dropout=0.1", "--config.eval.task=aime2024",
          f"--config.eval.data_path={root / 'aime.jsonl'}", "--config.eval.limit=0",
          "--config.eval.methods=('diffmas',)", "--config.eval.batch_size=2",
          "--config.eval.max_new_tokens=3", "--config.agents.agent_max_new_tokens=2",
          "--config.eval.bucket=64", *extra]


def _launch(args, processes, cache_dir, kill_after_save=None):
  """Runs `python args` as `processes` processes (DEVICES fake CPU devices in all);
  returns (return codes, outputs, wall seconds). Runs share a persistent
  compilation cache, so restarts load the step compiled by an earlier run."""
  # Compiling the train step is most of a launch (~2/3 of the 1-process run's wall time,
  # profiled); LLVM at -O0 halves XLA:CPU's compile time for these tiny programs and
  # changes no result (every compared run uses the same flags).
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes} "
                      "--xla_backend_optimization_level=0",
         "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("DIFFMAS_TEST_KILL_AFTER_SAVE", None)
  if kill_after_save is not None:
    env["DIFFMAS_TEST_KILL_AFTER_SAVE"] = str(kill_after_save)
  multi = []
  if processes > 1:
    multi = [f"--coordinator_address=127.0.0.1:{_free_port()}",
             f"--num_processes={processes}"]
  t0 = time.perf_counter()
  procs = [subprocess.Popen([sys.executable, *args, *multi] +
                            ([f"--process_id={i}"] if processes > 1 else []),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(processes)]
  outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  return [p.returncode for p in procs], outs, time.perf_counter() - t0


def _show(logs):
  """Each process's log, trimmed to what explains a failure (an abort's reason
  comes before its long stack dump)."""
  return "\n".join(f"--- process {i}:\n{log[:3000]}\n...\n{log[-2000:]}"
                   for i, log in enumerate(logs))


def _final_state(workdir):
  """(last step, leaves as numpy) of a run's final checkpoint, whatever processes
  and devices saved it (multi-process CPU device ids are not 0..3)."""
  import jax
  import orbax.checkpoint as ocp
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*")
                 if os.path.basename(p).isdigit())
  path = f"{workdir}/checkpoints/{steps[-1]}/state"
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", None) or meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return steps[-1], jax.tree.leaves(ckptr.restore(path, args=ocp.args.PyTreeRestore(
      restore_args=args)))


@pytest.fixture(scope="module")
def runs(job):
  """One process x 4 devices; 2 processes x 2 devices; 2 processes killed and restarted."""
  out = {}
  for name, processes in (("single", 1), ("multi", 2)):
    rcs, logs, seconds = _launch(_args(job, job / name), processes, job / "cache")
    assert rcs == [0] * processes, _show(logs)
    out[name] = (logs, seconds)
  # Kill both processes right after starting the (async) save of micro-step 2 of 4.
  killed = job / "killed"
  rcs, logs, _ = _launch(_args(job, killed, "--skip_eval"), 2, job / "cache", kill_after_save=2)
  assert rcs == [-9, -9], _show(logs)
  rcs, logs, _ = _launch(_args(job, killed, "--skip_eval"), 2, job / "cache")
  assert rcs == [0, 0], _show(logs)
  out["killed"] = (logs, None)
  return out


def _step_seconds(workdir):
  """Seconds between consecutive updates (1 call each; the first includes compilation)."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return np.diff([json.loads(line)["time"] for line in lines])


def test_two_processes_train_the_same_adapters_as_one(job, runs):
  logs, seconds = runs["multi"]
  for name in ("single", "multi"):
    steps = _step_seconds(job / name)
    print(f"\n{name}: train + eval {runs[name][1]:.1f} s wall; s/update after the first: "
          f"min {steps.min():.3f} median {np.median(steps):.3f} max {steps.max():.3f}")
  # The batch arithmetic is printed once: 1 x 4 on 4 batch shards runs as 4 x 1.
  text = "".join(logs)
  assert text.count("batch: 4 examples per update = 1 calls x 4 examples") == 1, text[-3000:]
  assert "this process builds 2 rows" in text
  step_s, leaves_s = _final_state(job / "single")
  step_m, leaves_m = _final_state(job / "multi")
  assert step_s == step_m == 4
  assert any(np.abs(np.asarray(x)).max() > 0 for x in leaves_s)
  for a, b in zip(leaves_s, leaves_m, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  exported = sorted(glob.glob(f"{job / 'multi'}/adapter/**/*.safetensors", recursive=True))
  assert exported and os.path.exists(job / "multi" / "loss.png")


def test_metrics_have_one_row_per_update(job, runs):
  for name in ("single", "multi", "killed"):
    lines = (job / name / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    # killed: the restart re-logs the updates after its checkpoint (read_metrics keeps
    # the latest), but no process other than 0 ever writes a row.
    if name != "killed":
      assert steps == [1, 2, 3, 4], (name, steps)
  from diffmas_jax.logging_utils import read_metrics
  rows = read_metrics(str(job / "killed" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_kill_both_processes_and_restart_is_bitwise_equal(job, runs):
  step_m, leaves_m = _final_state(job / "multi")
  step_k, leaves_k = _final_state(job / "killed")
  assert step_m == step_k == 4
  for a, b in zip(leaves_m, leaves_k, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluation_writes_each_record_once_with_the_same_summary(job, runs):
  rows = [json.loads(line) for line in (job / "multi" / "results.jsonl").read_text().splitlines()]
  keys = [(r["method"], r["id"], r["sample_index"]) for r in rows]
  assert len(keys) == len(set(keys)) == 6
  single = json.loads((job / "single" / "summary.json").read_text())
  multi = json.loads((job / "multi" / "summary.json").read_text())
  # Equal but for time, and float rounding: the adapters agree to ~1e-7, not bitwise.
  def close(a, b, where):
    if isinstance(a, dict):
      assert a.keys() == b.keys(), where
      for k in a:
        if k != "seconds_per_sample":
          close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
      assert len(a) == len(b), where
      for i, (x, y) in enumerate(zip(a, b)):
        close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
      assert b == pytest.approx(a, rel=1e-5, abs=1e-8), where
    else:
      assert a == b, where
  close(single["methods"], multi["methods"], "methods")
  assert "| diffmas | 6 |" in (job / "multi" / "summary.md").read_text()
