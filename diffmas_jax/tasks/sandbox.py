"""Running untrusted, model-generated Python in a sandbox.

Two isolation modes (`SandboxConfig.isolation`):
  * "bwrap" (default): the operating system isolates the program (see
    `sandbox_bwrap.py`): new user, PID, network, IPC, UTS and mount namespaces, a
    read-only view of the interpreter and system libraries, a private tmpfs as
    the only writable place, no view of the checkout or workdir, an
    unprivileged uid, and the resource limits below. Where user namespaces are
    unavailable, running untrusted code is refused (`SandboxUnavailableError`)
    unless the weaker mode is chosen explicitly.
  * "process": the previous, weaker isolation, kept for machines without user
    namespaces: a fresh interpreter in its own session, `unshare -rn` for the
    network when possible, uid `nobody` when possible; the rest rests on an
    in-process audit hook, which a program written to escape can switch off.

In both, the prelude (`sandbox_prelude.py`) sets the resource limits (address
space, CPU seconds, file size, open files, processes) and installs the audit
hook, a guard rail against accidents, not a boundary.

Verdicts. Records whose tests reach the answer only through its entry point
(HumanEval's `check(fn)`, MBPP's asserts) are judged by a split run: the
candidate's code runs in one sandbox, the tests (after the HumanEval prompt) in
another, which calls the entry point across two pipes with plain values; the
verdict is the judge's own completion and exit status, which the candidate
cannot reach. Other programs (tests that use the answer's classes, `run_code`)
are judged in-process: a program written to fool its own tests can; the
sandbox still contains what it does. `isolation_report()` says what a run gets.
"""

from __future__ import annotations

import ast
import builtins
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

from diffmas_jax.tasks import sandbox_bwrap
from diffmas_jax.tasks.records import Record

PRELUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_prelude.py")
_NOBODY = 65534


ISOLATION_FLAG = "--config.eval.sandbox.isolation=process"


class SandboxUnavailableError(RuntimeError):
  """The requested isolation cannot be set up here; no untrusted code was run."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and isolation switches for one sandboxed run.

  Attributes:
    isolation: "bwrap" (OS namespaces; refuses to run where unavailable) or
      "process" (the weaker in-process guard; see the module docstring).
    timeout_s: wall-clock limit; everything the program started is killed after it.
    memory_mb: address-space limit (RLIMIT_AS).
    cpu_s: CPU-time limit; None = ceil(timeout_s) + 1.
    max_output_mb: largest file the program may write (RLIMIT_FSIZE), stdout included.
    max_open_files: RLIMIT_NOFILE.
    max_processes: RLIMIT_NPROC, applied whenever the child runs unprivileged
      (always under bwrap).
    tmpfs_mb: size of the writable /tmp under bwrap.
    split_verdict: judge records whose tests only call the entry point in a separate
      sandbox (module docstring).
    network_namespace: "process" mode: None = use `unshare -rn` when it works here; False = never.
    drop_privileges: "process" mode: None = run as `nobody` when root and possible; False = never.
    audit_hook: install the in-process guard (see module docstring).
    tail_chars: how much of stdout/stderr to keep in the result.
    python: interpreter that runs the program; None = this one (sys.executable).
  """

  isolation: str = "bwrap"
  timeout_s: float = 10.0
  memory_mb: int = 1024
  cpu_s: int | None = None
  max_output_mb: int = 16
  max_open_files: int = 64
  max_processes: int = 64
  tmpfs_mb: int = 64
  split_verdict: bool = True
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
  """Isolated mode, no bytecode writes, and no `site` import: the prelude puts the
  site-packages directories on sys.path itself, skipping .pth files, whose hooks
  cost ~0.2 s per start here (and are code the sandbox has no need to run)."""
  return [python or sys.executable, "-I", "-B", "-S"]


@functools.lru_cache(maxsize=None)
def _site_packages(python: str | None) -> tuple[str, ...]:
  """The interpreter's site-packages directories (asked once per interpreter)."""
  if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
    import site
    return tuple(site.getsitepackages())
  out = subprocess.run([python, "-I", "-c", "import site, json; print(json.dumps("
                        "site.getsitepackages()))"], capture_output=True, text=True, timeout=60)
  return tuple(json.loads(out.stdout)) if out.returncode == 0 else ()


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
  """(drop_privileges, network_namespace) actually used for `cfg` in "process" mode."""
  if cfg.drop_privileges is None:
    drop = _can_drop_privileges(cfg.python)
  else:
    drop = cfg.drop_privileges
  if cfg.network_namespace is None:
    netns = _can_unshare_net(cfg.python, drop)
  else:
    netns = cfg.network_namespace
  return drop, netns


def check_available(cfg: SandboxConfig | Mapping | None = None) -> None:
  """Raises SandboxUnavailableError (one line: the cause and the fix) when `cfg`'s
  isolation cannot be set up here. Cheap after the first call (cached probe)."""
  cfg = SandboxConfig.from_any(cfg)
  if cfg.isolation == "process":
    return
  if cfg.isolation != "bwrap":
    raise ValueError(f"unknown sandbox isolation {cfg.isolation!r}; expected 'bwrap' or 'process'")
  reason = sandbox_bwrap.unavailable_reason(cfg.python or sys.executable)
  if reason is not None:
    raise SandboxUnavailableError(
        f"code sandbox: bubblewrap cannot isolate programs on this machine ({reason}); no "
        f"untrusted code was run. Fix: allow user namespaces (e.g. sysctl "
        f"kernel.unprivileged_userns_clone=1; in Docker, a seccomp profile that permits "
        f"unshare), or accept the weaker in-process isolation with {ISOLATION_FLAG}")


def isolation_report(cfg: SandboxConfig | None = None) -> dict[str, str]:
  """Which isolation mechanisms a run with `cfg` gets on this machine."""
  cfg = SandboxConfig.from_any(cfg)
  layers = lambda *names: " + ".join(n for n in names if n) or "none"
  hook = "audit hook" if cfg.audit_hook else ""
  limits = (f"RLIMIT_AS={cfg.memory_mb}MB, RLIMIT_CPU, RLIMIT_FSIZE={cfg.max_output_mb}MB, "
            f"RLIMIT_NOFILE={cfg.max_open_files}, wall timeout {cfg.timeout_s}s")
  verdict = ("tests that only call the entry point: separate judge sandbox; others: in-process"
             if cfg.split_verdict else "in-process")
  if cfg.isolation == "bwrap":
    reason = sandbox_bwrap.unavailable_reason(cfg.python or sys.executable)
    if reason is not None:
      return {"mode": f"bwrap UNAVAILABLE ({reason}); runs are refused", "limits": limits,
              "verdict": verdict}
    uid = _NOBODY if os.geteuid() == 0 else os.geteuid()
    return {
        "mode": "bwrap (user, pid, net, ipc, uts, mount namespaces; --die-with-parent)",
        "network": layers("empty network namespace", hook),
        "processes": layers(f"own pid namespace, RLIMIT_NPROC={cfg.max_processes} as uid {uid}",
                            hook),
        "filesystem": layers(f"read-only /usr + interpreter, {cfg.tmpfs_mb} MB tmpfs /tmp "
                             "writable, checkout/workdir not mounted", hook),
        "limits": limits, "verdict": verdict,
    }
  drop, netns = _plan(cfg)
  nproc = f"RLIMIT_NPROC={cfg.max_processes} as uid {_NOBODY}" if drop else ""
  return {
      "mode": "process (weaker: rests on the in-process audit hook)",
      "network": layers("network namespace (unshare -rn)" if netns else "", hook),
      "processes": layers(nproc, hook) + ("" if drop else
                                          " (child keeps uid 0; RLIMIT_NPROC does not bind root)"
                                          if os.geteuid() == 0 else ""),
      "filesystem": layers("unprivileged uid" if drop else "", hook),
      "limits": limits, "verdict": verdict,
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
  blocked = re.findall(r"sandbox: (.+?)(?: is not allowed| outside the sandbox)", stderr,
                       flags=re.MULTILINE)
  if blocked:
    return f"blocked: {blocked[-1].strip()}"
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  return f"error: {lines[-1].strip()[:200]}" if lines else f"error: exit code {returncode}"


_ENV = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclasses.dataclass
class _Child:
  """One started sandboxed process and where its output goes."""
  proc: subprocess.Popen
  out_path: str
  err_path: str
  bwrap: bool

  def returncode(self) -> int:
    code = self.proc.wait()
    # bwrap reports a program killed by signal N as exit status 128 + N.
    return -(code - 128) if self.bwrap and code > 128 else code

  def kill(self) -> None:
    try:  # the program and anything it managed to start
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def _spawn(mode: str, program: str, settings: dict, cfg: SandboxConfig, base: str, name: str,
           stdin_text: str | None, pass_fds: tuple[int, ...] = ()) -> _Child:
  """Starts `prelude.py <mode>` on `program` in its own directory `base/name`."""
  files = os.path.join(base, name)
  os.mkdir(files)
  os.chmod(files, 0o755)
  program_path = os.path.join(files, "program.py")
  with open(program_path, "w", encoding="utf-8") as f:
    f.write(program)
  # A copy beside the program: the sandbox cannot see where this package is installed.
  prelude_path = shutil.copy(PRELUDE, os.path.join(files, "prelude.py"))
  for path in (program_path, prelude_path):
    os.chmod(path, 0o644)
  out_path, err_path = os.path.join(base, f"{name}.stdout"), os.path.join(base, f"{name}.stderr")
  python = cfg.python or sys.executable
  use_bwrap = cfg.isolation == "bwrap"
  settings = dict(settings, keep_fds=list(pass_fds), audit_hook=cfg.audit_hook,
                  sys_path=list(_site_packages(cfg.python)))
  stdin = subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL
  with open(out_path, "wb") as out, open(err_path, "wb") as err:
    if use_bwrap:
      inside = sandbox_bwrap.SANDBOX_DIR
      settings.update(rlimits=_rlimits(cfg, True), cwd="/tmp",
                      uid=sandbox_bwrap.UNPRIVILEGED_UID if os.geteuid() == 0 else None)
      inner = _python_cmd(python) + [f"{inside}/prelude.py", mode, f"{inside}/program.py",
               json.dumps(settings)]
      env = dict(_ENV, PATH="/usr/local/bin:/usr/bin:/bin", HOME="/tmp", TMPDIR="/tmp")
      proc = sandbox_bwrap.start(inner, python=python, files_dir=files, tmpfs_mb=cfg.tmpfs_mb,
                                 env=env, stdin=stdin, stdout=out, stderr=err, pass_fds=pass_fds)
    else:
      drop, netns = _plan(cfg)
      workdir = os.path.join(files, "work")  # cwd, HOME, TMPDIR: the only writable place
      os.mkdir(workdir)
      settings.update(rlimits=_rlimits(cfg, drop), cwd=workdir, uid=None)
      cmd = _python_cmd(cfg.python) + [prelude_path, mode, program_path, json.dumps(settings)]
      if netns:
        cmd = ["unshare", "-rn"] + cmd
      ids = {}
      if drop:
        os.chmod(base, 0o755)
        os.chown(workdir, _NOBODY, _NOBODY)
        ids = dict(user=_NOBODY, group=_NOBODY, extra_groups=[])
      env = dict(_ENV, PATH="/usr/local/bin:/usr/bin:/bin", HOME=workdir, TMPDIR=workdir)
      proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=stdin, stdout=out, stderr=err,
                              start_new_session=True, close_fds=True, pass_fds=pass_fds, **ids)
  if stdin_text is not None:
    try:
      proc.stdin.write(stdin_text.encode())
      proc.stdin.close()
    except BrokenPipeError:
      pass
  return _Child(proc, out_path, err_path, use_bwrap)


def _finish(children: list[_Child], timeout_s: float) -> bool:
  """Waits for the first child (the one whose result counts), then kills all of
  them and everything they started. Returns False on timeout."""
  try:
    return _wait_unreaped(children[0].proc.pid, timeout_s)
  finally:  # also on KeyboardInterrupt: never leave anything running
    for child in children:
      child.kill()
    for child in children:
      child.proc.wait()


def _completed(stdout: str, nonce: str) -> tuple[bool, str]:
  if stdout.rstrip().endswith(nonce):
    return True, stdout.rstrip()[:-len(nonce)].rstrip("\n")
  return False, stdout


def _resolve(config: SandboxConfig | Mapping | None, **overrides) -> SandboxConfig:
  cfg = SandboxConfig.from_any(config)
  cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
  check_available(cfg)
  return cfg


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
    `os._exit(0)` before its tests does not pass). In-process: see the module docstring.

  Raises:
    SandboxUnavailableError: "bwrap" isolation is not possible here.
  """
  cfg = _resolve(config, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s)
  base = tempfile.mkdtemp(prefix="diffmas-sandbox-")
  try:
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    child = _spawn("run", program, {"as_main": as_main}, cfg, base, "main", f"{nonce}\n")
    finished = _finish([child], cfg.timeout_s)
    elapsed = time.monotonic() - start
    returncode = child.returncode()
    stdout, stderr = _tail(child.out_path, cfg.tail_chars + 64), _tail(child.err_path,
                                                                      cfg.tail_chars)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  completed, stdout = _completed(stdout, nonce)
  reason = _classify(returncode, not finished, completed, stderr)
  return SandboxResult(passed=reason == "passed", returncode=returncode, timed_out=not finished,
                       stdout_tail=stdout[-cfg.tail_chars:], stderr_tail=stderr, reason=reason,
                       elapsed_s=elapsed)


def run_split(candidate: str, prompt: str, tests: str, entry_point: str,
              config: SandboxConfig | Mapping | None = None) -> SandboxResult:
  """Judges `candidate` with the judge outside its reach (see the module docstring).

  Args:
    candidate: the program that defines `entry_point` (prompt + answer).
    prompt: code the tests rely on (imports, helpers), run in the judge first.
    tests: code that calls `entry_point` (HumanEval: `def check...; check(fn)`; MBPP: asserts).
    entry_point: the function name; in the judge it is a proxy to the candidate.
    config: SandboxConfig or a dict of its fields.

  Returns:
    SandboxResult: passed = the judge ran the tests to their end and exited 0.
    stdout_tail is the candidate's; stderr_tail the candidate's then the judge's.
  """
  cfg = _resolve(config)
  base = tempfile.mkdtemp(prefix="diffmas-sandbox-")
  request_r, request_w = os.pipe()
  reply_r, reply_w = os.pipe()
  try:
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    settings = {"as_main": False, "entry_point": entry_point}
    try:
      judge = _spawn("judge", tests, dict(settings, prompt=prompt), cfg, base, "judge",
                     f"{nonce}\n", pass_fds=(request_w, reply_r))
      try:
        answer = _spawn("serve", candidate, settings, cfg, base, "answer", None,
                        pass_fds=(request_r, reply_w))
      except BaseException:
        _finish([judge], 0.0)
        raise
    finally:  # only the children hold the pipes now: a dead side means EOF for the other
      for fd in (request_r, request_w, reply_r, reply_w):
        os.close(fd)
    finished = _finish([judge, answer], cfg.timeout_s)
    elapsed = time.monotonic() - start
    judge_code, answer_code = judge.returncode(), answer.returncode()
    tail = cfg.tail_chars
    judge_out, judge_err = _tail(judge.out_path, tail + 64), _tail(judge.err_path, tail)
    answer_out, answer_err = _tail(answer.out_path, tail), _tail(answer.err_path, tail)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  completed, _ = _completed(judge_out, nonce)
  reason = _classify(judge_code, not finished, completed, judge_err)
  if reason not in ("passed", "timeout") and "answer's process ended" in judge_err:
    reason = _classify(answer_code, False, False, answer_err)  # say why the answer died
  stderr = (answer_err + ("\n" if answer_err else "") + judge_err)[-tail:]
  return SandboxResult(passed=reason == "passed", returncode=judge_code, timed_out=not finished,
                       stdout_tail=answer_out, stderr_tail=stderr, reason=reason,
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


def _candidate_body(code: str, record: Record) -> str:
  """The candidate's program without the tests (see `build_test_program`)."""
  if record.meta.get("style") == "humaneval":
    prompt = record.meta.get("prompt", record.question)
    return f"{prompt}\n{code}" if _defines(code, record.entry_point) else prompt + code
  return code


def build_test_program(code: str, record: Record) -> str:
  """The program that checks candidate `code` against a code record's tests.

  HumanEval-style records (`meta["style"] == "humaneval"`): the prompt comes
  first so its imports and helper functions exist; the candidate either
  redefines the whole function or, when it does not define the entry point, is
  taken as the body that completes the prompt. MBPP-style: code, then asserts.
  """
  if record.family != "code":
    raise ValueError(f"record {record.id!r} is a {record.family!r} task, not code")
  return f"{_candidate_body(code, record)}\n\n# ---- tests ----\n{record.tests}\n"


def _free_names(code: str) -> set[str] | None:
  """Names `code` reads but never binds (nor are builtins); None when it does not parse."""
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return None
  loaded, bound = set(), set(dir(builtins))
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      bound.add(node.name)
  return loaded - bound


def split_prompt(record: Record) -> str | None:
  """The code the judge runs before the tests when `record` can be judged by a split
  run, else None. HumanEval's `check(fn)` form: the prompt (its helpers). Other
  tests (MBPP's asserts): "" when the only outside name they read is the entry point."""
  if record.family != "code" or not record.entry_point:
    return None
  if record.meta.get("style") == "humaneval":
    called = re.search(rf"^check\({re.escape(record.entry_point)}\)\s*$", record.tests,
                       flags=re.MULTILINE)
    return record.meta.get("prompt", record.question) if called else None
  return "" if _free_names(record.tests) == {record.entry_point} else None


def splittable(record: Record) -> bool:
  """Whether `record`'s tests can be judged outside the candidate's process (`split_prompt`)."""
  return split_prompt(record) is not None


def run_tests(code: str, record: Record,
              config: SandboxConfig | Mapping | None = None) -> SandboxResult:
  """Runs candidate `code` against `record.tests` in the sandbox (demo blocks skipped).

  Records whose tests only reach the answer through its entry point (HumanEval's
  `check(fn)`, MBPP's asserts) get a split run (`run_split`) unless
  `config.split_verdict` is False; others run in one process (`run_code`).
  """
  if record.family != "code":
    raise ValueError(f"record {record.id!r} is a {record.family!r} task, not code")
  if not code.strip():
    return SandboxResult(False, -1, False, "", "", "error: no code found in the answer")
  cfg = SandboxConfig.from_any(config)
  prompt = split_prompt(record) if cfg.split_verdict else None
  if prompt is not None:
    return run_split(_candidate_body(code, record), prompt, record.tests, record.entry_point, cfg)
  return run_code(build_test_program(code, record), config=cfg, as_main=False)
