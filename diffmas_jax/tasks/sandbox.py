"""Running untrusted, model-generated Python in an isolated child process.

Layers, each independent of the others:
  * process: a fresh interpreter (`python -I -B`: no user site, no PYTHON* env,
    no bytecode writes) in a new session whose whole process group is killed on
    timeout; a scrubbed environment; a fresh temp dir as cwd, HOME and TMPDIR.
  * resource limits (set by the child before the program runs): address space,
    CPU seconds, file size (also bounds captured output), open files.
  * network: a new, empty network namespace (`unshare -rn`) when the kernel
    allows it; the loopback is down, so even 127.0.0.1 is unreachable.
  * identity: when running as root and the interpreter is readable by an
    unprivileged user, the child runs as `nobody`, so RLIMIT_NPROC bounds fork
    bombs (the kernel does not apply RLIMIT_NPROC to root) and the filesystem's
    own permissions block writes.
  * audit hook (`sandbox_prelude.py`): refuses fork/exec/spawn, signals, sockets,
    ctypes, raising limits, and file writes outside the temp dir. Always on by
    default; the only fork-bomb guard when the child must stay root.
`isolation_report()` says which layers are active on this machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping

from diffmas_jax.tasks.records import Record

PRELUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_prelude.py")
_NOBODY = 65534


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and isolation switches for one sandboxed run.

  Attributes:
    timeout_s: wall-clock limit; the whole process group is killed after it.
    memory_mb: address-space limit (RLIMIT_AS).
    cpu_s: CPU-time limit; None = ceil(timeout_s) + 1.
    max_output_mb: largest file the program may write (RLIMIT_FSIZE), stdout included.
    max_open_files: RLIMIT_NOFILE.
    max_processes: RLIMIT_NPROC, applied only when the child runs unprivileged.
    network_namespace: None = use `unshare -rn` when it works here; False = never.
    drop_privileges: None = run as `nobody` when root and possible; False = never.
    audit_hook: install the in-process guard (see module docstring).
    tail_chars: how much of stdout/stderr to keep in the result.
    python: interpreter that runs the program; None = this one (sys.executable).
  """

  timeout_s: float = 10.0
  memory_mb: int = 1024
  cpu_s: int | None = None
  max_output_mb: int = 16
  max_open_files: int = 64
  max_processes: int = 64
  network_namespace: bool | None = None
  drop_privileges: bool | None = None
  audit_hook: bool = True
  tail_chars: int = 2000
  python: str | None = None

  @classmethod
  def from_any(cls, cfg: "SandboxConfig | Mapping[str, Any] | None") -> "SandboxConfig":
    """Accepts a SandboxConfig, a dict / ConfigDict of its fields, or None (defaults)."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown sandbox option(s) {sorted(unknown)}; valid: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    return cls(**items)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one run.

  Attributes:
    passed: the program ran to completion and exited 0 within the limits.
    returncode: exit status (negative = killed by that signal).
    timed_out: killed by the wall-clock limit.
    stdout_tail, stderr_tail: the last `tail_chars` characters of each stream.
    reason: one short word or phrase: "passed", "timeout", "memory limit",
      "cpu limit", "output limit", "blocked: <what>", "early exit", or "error: <last line>".
    elapsed_s: wall-clock seconds.
  """

  passed: bool
  returncode: int
  timed_out: bool
  stdout_tail: str
  stderr_tail: str
  reason: str
  elapsed_s: float = 0.0


def _python_cmd(python: str | None) -> list[str]:
  return [python or sys.executable, "-I", "-B"]


def _probe(cmd: list[str], **popen_kwargs) -> bool:
  try:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=20, cwd="/",
                          **popen_kwargs).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


@functools.lru_cache(maxsize=None)
def _can_drop_privileges(python: str | None) -> bool:
  """Root, and `nobody` can start this interpreter (not when it lives under a
  private /root). The prelude is copied next to each program, so where this
  package is installed does not matter."""
  if os.name != "posix" or os.geteuid() != 0:
    return False
  return _probe(_python_cmd(python) + ["-c", "pass"], user=_NOBODY, group=_NOBODY,
                extra_groups=[])


@functools.lru_cache(maxsize=None)
def _can_unshare_net(python: str | None, drop: bool) -> bool:
  """`unshare -rn` works for the identity the child will have."""
  if shutil.which("unshare") is None:
    return False
  ids = dict(user=_NOBODY, group=_NOBODY, extra_groups=[]) if drop else {}
  return _probe(["unshare", "-rn"] + _python_cmd(python) + ["-c", "pass"], **ids)


def _plan(cfg: SandboxConfig) -> tuple[bool, bool]:
  """(drop_privileges, network_namespace) actually used for `cfg`."""
  if cfg.drop_privileges is None:
    drop = _can_drop_privileges(cfg.python)
  else:
    drop = cfg.drop_privileges
  if cfg.network_namespace is None:
    netns = _can_unshare_net(cfg.python, drop)
  else:
    netns = cfg.network_namespace
  return drop, netns


def isolation_report(cfg: SandboxConfig | None = None) -> dict[str, str]:
  """Which isolation mechanisms a run with `cfg` gets on this machine."""
  cfg = cfg or SandboxConfig()
  drop, netns = _plan(cfg)
  layers = lambda *names: " + ".join(n for n in names if n) or "none"
  hook = "audit hook" if cfg.audit_hook else ""
  nproc = f"RLIMIT_NPROC={cfg.max_processes} as uid {_NOBODY}" if drop else ""
  return {
      "network": layers("network namespace (unshare -rn)" if netns else "", hook),
      "processes": layers(nproc, hook) + ("" if drop else
                                          " (child keeps uid 0; RLIMIT_NPROC does not bind root)"
                                          if os.geteuid() == 0 else ""),
      "filesystem": layers("unprivileged uid" if drop else "", hook),
      "limits": f"RLIMIT_AS={cfg.memory_mb}MB, RLIMIT_CPU, RLIMIT_FSIZE={cfg.max_output_mb}MB, "
                f"RLIMIT_NOFILE={cfg.max_open_files}, wall timeout {cfg.timeout_s}s",
  }


def _rlimits(cfg: SandboxConfig, drop: bool) -> dict[str, tuple[int, int]]:
  """(soft, hard) limits. CPU's hard limit is one second higher so that the soft
  one delivers SIGXCPU (reported as "cpu limit") before the hard SIGKILL."""
  cpu = int(cfg.cpu_s if cfg.cpu_s is not None else math.ceil(cfg.timeout_s) + 1)
  same = lambda v: (v, v)
  limits = {
      "RLIMIT_AS": same(cfg.memory_mb * 2**20),
      "RLIMIT_CPU": (cpu, cpu + 1),
      "RLIMIT_FSIZE": same(cfg.max_output_mb * 2**20),
      "RLIMIT_NOFILE": same(cfg.max_open_files),
      "RLIMIT_CORE": same(0),
  }
  if drop:
    limits["RLIMIT_NPROC"] = same(cfg.max_processes)
  return limits


def _tail(path: str, n: int) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * n))
    return f.read().decode("utf-8", errors="replace")[-n:]


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
  """Waits for `pid` to exit WITHOUT reaping it, so its process group id stays
  reserved and `killpg` cannot hit an unrelated group. Returns False on timeout."""
  deadline = time.monotonic() + timeout_s
  delay = 0.001
  while True:
    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(delay)
    delay = min(delay * 2, 0.02)


def _classify(returncode: int, timed_out: bool, completed: bool, stderr: str) -> str:
  if timed_out:
    return "timeout"
  if completed and returncode == 0:
    return "passed"
  if returncode == -signal.SIGXCPU:
    return "cpu limit"
  if returncode == -signal.SIGXFSZ or "File too large" in stderr:
    return "output limit"  # CPython ignores SIGXFSZ, so usually it is an OSError
  if returncode == 0 or (returncode == 3 and "sandbox: program called exit" in stderr):
    return "early exit"  # exit code 0 without reaching the end: os._exit / sys.exit
  if "MemoryError" in stderr:
    return "memory limit"
  blocked = re.findall(r"sandbox: (.+?)(?: is not allowed| outside the sandbox|$)", stderr,
                       flags=re.MULTILINE)
  if blocked:
    return f"blocked: {blocked[-1].strip()}"
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  return f"error: {lines[-1].strip()[:200]}" if lines else f"error: exit code {returncode}"


def run_code(program: str, timeout_s: float | None = None, memory_mb: int | None = None,
             cpu_s: int | None = None, *, config: SandboxConfig | Mapping | None = None,
             as_main: bool = True) -> SandboxResult:
  """Runs `program` (Python source) in the sandbox and reports how it ended.

  Args:
    program: the full program text.
    timeout_s, memory_mb, cpu_s: override the corresponding `config` fields.
    config: a `SandboxConfig` (or dict of its fields); None = defaults.
    as_main: run with `__name__ == "__main__"`. Scoring passes False so that a
      solution's `if __name__ == "__main__":` demo block does not run.

  Returns:
    SandboxResult. `passed` requires a normal completion: exit code 0 AND the
    program text ran to its end (a program that calls `sys.exit(0)` or
    `os._exit(0)` before its tests does not pass).
  """
  cfg = SandboxConfig.from_any(config)
  overrides = {k: v for k, v in dict(timeout_s=timeout_s, memory_mb=memory_mb,
                                     cpu_s=cpu_s).items() if v is not None}
  cfg = dataclasses.replace(cfg, **overrides)
  drop, netns = _plan(cfg)

  # base/ holds the program and captured output; base/work/ is the child's cwd,
  # HOME and TMPDIR, and the only place it may write.
  base = tempfile.mkdtemp(prefix="diffmas-sandbox-")
  try:
    workdir = os.path.join(base, "work")
    os.mkdir(workdir)
    program_path = os.path.join(base, "program.py")
    with open(program_path, "w", encoding="utf-8") as f:
      f.write(program)
    out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
    settings = json.dumps({"rlimits": _rlimits(cfg, drop), "audit_hook": cfg.audit_hook,
                           "as_main": as_main})
    # A copy beside the program: `nobody` may not be able to read the installed one.
    prelude_path = shutil.copy(PRELUDE, os.path.join(base, "prelude.py"))
    cmd = _python_cmd(cfg.python) + [prelude_path, program_path, settings]
    if netns:
      cmd = ["unshare", "-rn"] + cmd
    ids = {}
    if drop:
      os.chmod(base, 0o755)
      os.chown(workdir, _NOBODY, _NOBODY)
      ids = dict(user=_NOBODY, group=_NOBODY, extra_groups=[])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out,
                              stderr=err, start_new_session=True, close_fds=True, **ids)
    try:
      try:
        proc.stdin.write(f"{nonce}\n".encode())
        proc.stdin.close()
      except BrokenPipeError:
        pass
      finished = _wait_unreaped(proc.pid, cfg.timeout_s)
    finally:  # also on KeyboardInterrupt: never leave the group running
      try:  # the program and anything it managed to start
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      returncode = proc.wait()
    elapsed = time.monotonic() - start
    stdout, stderr = _tail(out_path, cfg.tail_chars + 64), _tail(err_path, cfg.tail_chars)
  finally:
    shutil.rmtree(base, ignore_errors=True)

  completed = stdout.rstrip().endswith(nonce)
  if completed:
    stdout = stdout.rstrip()[:-len(nonce)].rstrip("\n")
  reason = _classify(returncode, not finished, completed, stderr)
  return SandboxResult(passed=reason == "passed", returncode=returncode, timed_out=not finished,
                       stdout_tail=stdout[-cfg.tail_chars:], stderr_tail=stderr, reason=reason,
                       elapsed_s=elapsed)


def run_many(programs: Iterable[str], config: SandboxConfig | Mapping | None = None,
             max_workers: int | None = None, as_main: bool = True) -> list[SandboxResult]:
  """Runs several programs concurrently (threads waiting on child processes), in order."""
  programs = list(programs)
  workers = max_workers or min(len(programs), os.cpu_count() or 1) or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda p: run_code(p, config=config, as_main=as_main), programs))


def _defines(code: str, name: str) -> bool:
  return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, flags=re.MULTILINE) is not None


def build_test_program(code: str, record: Record) -> str:
  """The program that checks candidate `code` against a code record's tests.

  HumanEval-style records (`meta["style"] == "humaneval"`): the prompt comes
  first so its imports and helper functions exist; the candidate either
  redefines the whole function or, when it does not define the entry point, is
  taken as the body that completes the prompt. MBPP-style: code, then asserts.
  """
  if record.family != "code":
    raise ValueError(f"record {record.id!r} is a {record.family!r} task, not code")
  if record.meta.get("style") == "humaneval":
    prompt = record.meta.get("prompt", record.question)
    body = f"{prompt}\n{code}" if _defines(code, record.entry_point) else prompt + code
  else:
    body = code
  return f"{body}\n\n# ---- tests ----\n{record.tests}\n"


def run_tests(code: str, record: Record,
              config: SandboxConfig | Mapping | None = None) -> SandboxResult:
  """Runs candidate `code` against `record.tests` in the sandbox (demo blocks skipped)."""
  if not code.strip():
    return SandboxResult(False, -1, False, "", "", "error: no code found in the answer")
  return run_code(build_test_program(code, record), config=config, as_main=False)
