"""Runs every launcher on bad inputs and prints a markdown table: input, exit code,
seconds to fail, message (docs/errors_and_cache.md).

  python scripts/bad_input_table.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=16, hidden_size=8,
             intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=4)


def _model_dir(root: str, name: str, weights: bytes, **fields) -> str:
  path = os.path.join(root, name)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**QWEN3, **fields}, f)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(weights)
  return path


def cases(root: str) -> list[tuple[str, list[str]]]:
  from safetensors.numpy import save
  import numpy as np
  whole = save({"w": np.zeros(64, np.float32)})
  yarn = _model_dir(root, "yarn", whole, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  gpt2 = _model_dir(root, "gpt2", whole, model_type="gpt2")
  cut = _model_dir(root, "truncated", whole[:-10])
  a_file = os.path.join(root, "a_file")
  open(a_file, "w").close()
  ev = ["launch.eval", "--config=configs/eval_arc.py:quick", f"--workdir={root}/run"]
  tr = ["launch.train", "--config=configs/quickstart.py", f"--workdir={root}/train"]
  return [
      ("eval: misspelt key", ev + ["--config.eval.limt=3"]),
      ("eval: missing model dir + missing data", ev + ["--config.model.source=./models/Qwen3-8B",
                                                       "--config.eval.data_path=/data/arc.csv"]),
      ("eval: negative limit", ev + ["--config.eval.limit=-1"]),
      ("eval: unwritable workdir", ev[:2] + ["--workdir=/proc/run"]),
      ("eval: unsupported rope scaling", ev + [f"--config.model.source={yarn}"]),
      ("eval: unsupported architecture", ev + [f"--config.model.source={gpt2}"]),
      ("eval: truncated weights", ev + [f"--config.model.source={cut}"]),
      ("eval: unknown trace_keep + batch 0", ev + ["--config.agents.trace_keep=none",
                                                   "--config.eval.batch_size=0"]),
      ("train: unknown grad mode", tr + ["--config.train.grad_mode=sideways"]),
      ("train: gated data not given", ["launch.train", "--config=configs/gpqa.py",
                                       f"--workdir={root}/gpqa"]),
      ("train: hub id, offline machine", tr + ["--config.model.source=Qwen/Qwen3-8B"]),
      ("generate: missing model + bad top_p", ["launch.generate", "--source=./models/x",
                                               "--top_p=2"]),
      ("convert: --out is a file, bad dtype", ["launch.convert", f"--out={a_file}",
                                               "--dtype=int3"]),
      ("convert: --out not given", ["launch.convert"]),
      ("bench: unknown suite", ["launch.bench", "--suites=core,fast"]),
  ]


def _children_cpu() -> float:
  """CPU seconds used by finished child processes: a figure the host's load does not inflate."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main() -> None:
  env = {**os.environ, "DIFFMAS_COMPILE_CACHE": "off"}
  with tempfile.TemporaryDirectory() as root:
    print("| launcher: input | exit code | seconds to fail (wall / CPU) | message (stderr) |")
    print("|---|---|---|---|")
    for name, args in cases(root):
      t, cpu = time.perf_counter(), _children_cpu()
      proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
      dt, dcpu = time.perf_counter() - t, _children_cpu() - cpu
      lines = [l for l in proc.stderr.splitlines() if l.startswith(("error:", "FATAL"))]
      lines = lines or proc.stderr.strip().splitlines()[-2:]
      msg = "<br>".join(l.replace("|", "\\|") for l in lines)
      print(f"| {name} | {proc.returncode} | {dt:.1f} / {dcpu:.1f} | {msg} |", flush=True)


if __name__ == "__main__":
  main()
