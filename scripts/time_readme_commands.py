"""Times README's commands twice each: first with an empty compile cache, then again with
the cache the first run filled (fresh workdirs both times, so the work is redone and only
compilation can be skipped). Prints a markdown table; appends JSONL rows to --out.

  python scripts/time_readme_commands.py [--only=generate,eval_quick] [--out=FILE]

Run it on a quiet machine (`uptime` is recorded with each row): the figures go into
README's time claims.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> argv after `python -m`; {w} is a fresh directory per run.
COMMANDS = {
    "generate": ["launch.generate", "--prompt=What is the capital of France?"],
    "convert": ["launch.convert", "--out={w}/hf"],
    "eval_quick": ["launch.eval", "--config=configs/eval_arc.py:quick", "--workdir={w}/eval"],
    "plan_8b_8": ["launch.plan", "--config=configs/gpqa.py", "--model=qwen3-8b", "--devices=8"],
    "quickstart": ["launch.train", "--config=configs/quickstart.py", "--workdir={w}/train"],
    "eval_gsm8k_50": ["launch.eval", "--config=configs/eval_gsm8k.py", "--config.eval.limit=50",
                      "--workdir={w}/eval"],
    "bench": ["launch.bench"],
}


def _load() -> float:
  return os.getloadavg()[0]


def time_once(name: str, cache_dir: str, root: str) -> dict:
  work = tempfile.mkdtemp(prefix=f"{name}_", dir=root)
  argv = [sys.executable, "-m"] + [a.format(w=work) for a in COMMANDS[name]]
  env = dict(os.environ, DIFFMAS_COMPILE_CACHE=cache_dir, PYTHONUNBUFFERED="1")
  load_before = _load()
  log = os.path.join(work, "output.log")
  t0 = time.perf_counter()
  # Each output line stamped with the seconds since start (phases: e.g. training vs eval).
  with open(log, "w") as f:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      f.write(f"[{time.perf_counter() - t0:8.1f}] {line}")
    proc.wait()
  seconds = time.perf_counter() - t0
  return dict(command=name, argv=" ".join(argv[2:]), exit=proc.returncode, seconds=seconds,
              load_before=load_before, load_after=_load(), log=log)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(COMMANDS), help="Comma list of command names.")
  parser.add_argument("--out", default="runs/readme_timings.jsonl")
  parser.add_argument("--root", default="", help="Scratch root (default: a temp dir).")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n]
  unknown = [n for n in names if n not in COMMANDS]
  if unknown:
    print(f"error: unknown command name(s) {unknown}; available: {list(COMMANDS)}")
    return 2
  root = args.root or tempfile.mkdtemp(prefix="readme_timings_")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  rows = []
  for name in names:
    cache = tempfile.mkdtemp(prefix=f"cache_{name}_", dir=root)  # empty: a first run
    for run in ("first", "second"):
      row = dict(time_once(name, cache, root), run=run)
      rows.append(row)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"{name} {run}: {row['seconds']:.1f} s (exit {row['exit']}, load "
            f"{row['load_before']:.1f} -> {row['load_after']:.1f})", flush=True)
  print("\n| command | first run s | second run s (cache warm) | load |\n|---|---|---|---|")
  for name in names:
    first, second = [r for r in rows if r["command"] == name]
    print(f"| `python -m {first['argv']}` | {first['seconds']:.0f} | {second['seconds']:.0f} | "
          f"{first['load_before']:.1f}-{second['load_after']:.1f} |")
  return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
