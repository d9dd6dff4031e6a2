"""Seconds per sandboxed program, this checkout against another one, runs alternated.

  git archive af08a7c diffmas_jax | tar -x -C /tmp/old     # the previous sandbox
  python -m bench.sandbox_timing /tmp/old --rounds 4

Each round runs, in a fresh process per checkout, the canonical HumanEval/0
solution 3 times through `run_tests` (the scoring path) and 3 times through
`run_code` (one process, tests in-process). Prints min/median/max per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_ONE_ROUND = """
import json
from diffmas_jax.tasks.registry import load_task
from diffmas_jax.tasks.sandbox import build_test_program, run_code, run_tests
rec = load_task("humaneval", limit=1)[0]
times = {"run_tests": [], "run_code": []}
for _ in range(3):
  r = run_tests(rec.gold, rec, config={"timeout_s": 10})
  assert r.passed, r
  times["run_tests"].append(r.elapsed_s)
  r = run_code(build_test_program(rec.gold, rec), config={"timeout_s": 10}, as_main=False)
  assert r.passed, r
  times["run_code"].append(r.elapsed_s)
print(json.dumps(times))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("other", help="another checkout (a directory holding diffmas_jax/)")
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  checkouts = {"other": os.path.abspath(args.other), "this": here}
  times = {name: {"run_tests": [], "run_code": []} for name in checkouts}
  for _ in range(args.rounds):
    for name, path in checkouts.items():
      out = subprocess.run([sys.executable, "-c", _ONE_ROUND], cwd=path, check=True,
                           env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True)
      for key, values in json.loads(out.stdout.strip().splitlines()[-1]).items():
        times[name][key] += values
  print(f"load average {os.getloadavg()}")
  for name, per_path in times.items():
    for key, v in per_path.items():
      print(f"{name} {key}: n={len(v)} min {min(v):.3f} s, median {statistics.median(v):.3f} s, "
            f"max {max(v):.3f} s")


if __name__ == "__main__":
  main()
