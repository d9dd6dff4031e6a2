"""Per-operation times of a jitted function, from XLA:CPU's own trace (jax.profiler).

Shared by `bench.profile_step` (a decode step) and `bench.profile_train` (a train step).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any, Callable


def op_rows(run: Callable[[], Any], hlo: str, steps: int
            ) -> tuple[float, list[tuple[str, str, float, float]], str]:
  """Traces `steps` calls of `run()` (a compiled jitted call) with jax.profiler.

  `hlo`: the compiled module's text (`jitted.lower(...).compile().as_text()`), for the
  result shape of every instruction, so each traced name says what it computes.
  Returns (seconds per call, rows, trace directory); rows are (XLA operation, its result
  shape, ms per call summed over loops, executions per call), slowest first.
  """
  import jax
  shapes = dict(re.findall(r"%([\w.-]+) = (\S+) ", hlo))
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(run())
    wall = (time.perf_counter() - t0) / steps
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  total = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, microseconds]
  for e in events:
    if e.get("ph") == "X":
      total[e["name"]][0] += 1
      total[e["name"]][1] += e["dur"]
  skip = ("ThunkExecutor", "$", "Pjit", "CommonPjRt", "SlinkyThreadPool", "end: ", "while")
  rows = [(name, shapes.get(name, ""), us / steps / 1e3, calls / steps)
          for name, (calls, us) in total.items() if not name.startswith(skip)]
  return wall, sorted(rows, key=lambda r: -r[2]), trace_dir


def format_rows(rows, top: int, trace_dir: str) -> str:
  lines = ["| operation | result | ms / call | calls / call |", "|---|---|---|---|"]
  lines += [f"| {name} | {shape[:40]} | {ms:.3f} | {calls:.0f} |"
            for name, shape, ms, calls in rows[:top]]
  return "\n".join(lines + [f"trace: {trace_dir} (open in Perfetto or TensorBoard)"])
