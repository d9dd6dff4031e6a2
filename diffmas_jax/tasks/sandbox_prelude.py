"""Runs INSIDE the sandbox, before any untrusted code (stdlib only, a standalone script).

  python -I -B -S prelude.py run   <program.py> <settings-json>   (nonce on stdin)
  python -I -B -S prelude.py serve <program.py> <settings-json>   (candidate side of a split run)
  python -I -B -S prelude.py judge <program.py> <settings-json>   (test side of a split run)

Common steps: close every inherited descriptor except 0-2 and the ones named in
the settings, lower the resource limits, drop from the sandbox's root to an
unprivileged uid when started as root inside a user namespace (so RLIMIT_NPROC
binds: the kernel exempts uid 0 from it), optionally install the audit hook.

`run`: executes the program and prints the nonce only if it ran to completion.
In-process: a program written to fool this check can (it shares the memory
that holds the nonce); the OS sandbox around it is what contains the damage.

Split run (tests that reach the answer only through its entry-point function):
`serve` executes the candidate's code and answers calls to its entry point read
as JSON lines from one pipe, writing JSON-encoded plain values (numbers,
strings, lists, tuples, dicts, sets, iterators) to another; `judge` executes
the task's prompt (HumanEval) and tests in a separate sandbox with the entry
point replaced by a proxy that calls across the pipes. The candidate never runs
in the judge's process, so it cannot reach the judge's nonce, its assertions,
or its exit status.

The audit hook is a guard rail against accidents, not a security boundary: it
copies its deny-lists into its closure (rebinding module globals does not turn
it off), but any in-process guard can be bypassed by code running in-process.
"""

import json
import numbers
import os
import resource
import sys

# Events that are refused outright. Model solutions never need them.
_DENY = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.sendto", "socket.sendmsg", "urllib.Request", "ftplib.connect", "smtplib.connect",
    "http.client.connect", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "resource.setrlimit", "resource.prlimit", "os.chroot",
    "os.setuid", "os.setgid", "sys.remote_exec", "winreg.OpenKey",
})
# Modules that can start processes or call native code without raising an event.
_DENY_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "_xxsubinterpreters"})
# event -> (indices of its path arguments, index of its dir_fd argument or None)
_PATH_EVENTS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
    "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.truncate": ((0,), None),
    "os.utime": ((0,), 3), "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None),
    "shutil.move": ((1,), None), "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Lazy results an honest answer may return (`list(f(x))` works on them in the judge too).
_ITERATORS = (type(x for x in ()), map, filter, zip, reversed, enumerate, range)
_MAX_MESSAGE = 16 * 2**20  # bytes per JSON line across the split-run pipes
_MAX_DEPTH = 64


def _set_limits(limits):
  for name, (soft, hard) in limits.items():
    resource.setrlimit(getattr(resource, name), (soft, hard))


def _drop_root(uid):
  """From uid 0 inside the sandbox's user namespace to `uid`: no capabilities left."""
  if uid is not None and os.getuid() == 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
      raise SystemExit("sandbox: could not drop root")


def _make_hook(root, deny, deny_imports, path_events, write_flags):
  """The audit hook; every table it reads is bound here, not looked up as a global."""
  root = os.path.realpath(root)
  allowed_devices = ("/dev/null",)
  realpath, join, getcwd, fspath, fsdecode = (os.path.realpath, os.path.join, os.getcwd,
                                              os.fspath, os.fsdecode)

  def inside(path):
    if isinstance(path, int):  # an already-open descriptor: checked when it was opened
      return True
    if isinstance(path, bytes):
      path = fsdecode(path)
    full = realpath(join(getcwd(), fspath(path)))
    return full == root or full.startswith(root + "/") or full in allowed_devices

  def hook(event, args):
    if event in deny:
      raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in deny_imports:
      raise ImportError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
      path, mode, flags = args
      writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & write_flags)
      if writes and path is not None and not inside(path):
        raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
    elif event in path_events:
      path_indices, dir_fd_index = path_events[event]
      if dir_fd_index is not None and len(args) > dir_fd_index and args[dir_fd_index] not in (
          None, -1):
        raise PermissionError(f"sandbox: {event} relative to a directory fd is not allowed")
      for i in path_indices:
        if not inside(args[i]):
          raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox")

  return hook


# ---- plain values across the split-run pipes ----

def encode(x, depth=0):
  """A JSON-able form of a plain value; ValueError for anything else."""
  if depth > _MAX_DEPTH:
    raise ValueError("value nested too deeply")
  if x is None or isinstance(x, bool):
    return None if x is None else bool(x)
  if type(x).__name__ == "bool_":  # numpy's bool, which is not a Python bool
    return bool(x)
  if isinstance(x, str):
    return {"s": str(x)}
  if isinstance(x, numbers.Integral):
    return {"i": str(int(x))}
  if isinstance(x, numbers.Real):
    return {"f": repr(float(x))}
  if isinstance(x, numbers.Complex):
    return {"c": [repr(float(x.real)), repr(float(x.imag))]}
  if isinstance(x, (bytes, bytearray)):
    return {"b": bytes(x).hex()}
  if isinstance(x, _ITERATORS):  # consumed here; the judge gets an iterator back
    return {"it": [encode(v, depth + 1) for v in x]}
  tags = ((list, "l"), (tuple, "t"), (set, "set"), (frozenset, "fs"))
  for kind, tag in tags:
    if isinstance(x, kind):
      return {tag: [encode(v, depth + 1) for v in x]}
  if isinstance(x, dict):
    return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
  raise ValueError(f"cannot pass a {type(x).__name__} between sandboxes")


def decode(x, depth=0):
  """Inverse of `encode`; builds only plain built-in values (safe on hostile input)."""
  if depth > _MAX_DEPTH:
    raise ValueError("value nested too deeply")
  if x is None or type(x) is bool:
    return x
  if type(x) is not dict or len(x) != 1:
    raise ValueError("malformed value")
  (tag, v), = x.items()
  if tag == "s" and type(v) is str:
    return v
  if tag == "i" and type(v) is str and len(v) < 5000:
    return int(v)
  if tag == "f" and type(v) is str:
    return float(v)
  if tag == "c" and type(v) is list and len(v) == 2:
    return complex(float(v[0]), float(v[1]))
  if tag == "b" and type(v) is str:
    return bytes.fromhex(v)
  if type(v) is list:
    if tag == "d":
      return {decode(k, depth + 1): decode(w, depth + 1) for k, w in v}
    items = [decode(w, depth + 1) for w in v]
    builders = {"l": list, "t": tuple, "set": set, "fs": frozenset,
                "it": lambda items: iter(items)}
    if tag in builders:
      return builders[tag](items)
  raise ValueError("malformed value")


def _read_line(fd):
  chunks, size = [], 0
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      raise EOFError
    chunks.append(chunk)
    size += len(chunk)
    if chunk.endswith(b"\n"):
      return b"".join(chunks)
    if size > _MAX_MESSAGE:
      raise ValueError("message too long")


def _write_line(fd, obj):
  data = (json.dumps(obj) + "\n").encode()
  while data:
    data = data[os.write(fd, data):]


def _serve(namespace, entry_point, fd_in, fd_out):
  """Answers calls to the entry point until the judge closes its pipe."""
  fn = namespace.get(entry_point)
  while True:
    try:
      request = json.loads(_read_line(fd_in))
    except EOFError:
      return
    try:
      if not callable(fn):
        raise NameError(f"{entry_point!r} is not defined by the answer")
      args = decode(request["args"])
      reply = {"ok": encode(fn(*args))}
    except Exception as e:  # the candidate's own error: reported to the judge, which fails
      reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
    _write_line(fd_out, reply)


def _proxy(entry_point, fd_out, fd_in):
  """Stands in for the entry point in the judge: a call crosses to the candidate's sandbox."""

  def call(*args, **kwargs):
    if kwargs:
      raise TypeError("keyword arguments are not passed between sandboxes")
    request = {"args": encode(tuple(args))}
    try:
      _write_line(fd_out, request)
      reply = json.loads(_read_line(fd_in))
    except (EOFError, BrokenPipeError):
      raise RuntimeError("sandbox: the answer's process ended before replying") from None
    if type(reply) is not dict or len(reply) != 1:
      raise RuntimeError("sandbox: malformed reply from the answer's process")
    if "error" in reply:
      raise RuntimeError(f"sandbox: the answer raised {str(reply['error'])[:500]}")
    if "ok" not in reply:
      raise RuntimeError("sandbox: malformed reply from the answer's process")
    return decode(reply["ok"])

  call.__name__ = entry_point
  return call


def main():
  mode, program_path, settings_json = sys.argv[1], sys.argv[2], sys.argv[3]
  config = json.loads(settings_json)
  sys.path.extend(p for p in config.get("sys_path", ()) if p not in sys.path)  # started with -S
  keep = set(config.get("keep_fds", ()))
  for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
    if int(fd) > 2 and int(fd) not in keep:
      try:
        os.close(int(fd))
      except OSError:
        pass
  nonce = sys.stdin.readline().strip() if mode != "serve" else ""
  with open(program_path, encoding="utf-8") as f:
    source = f.read()
  _set_limits(config["rlimits"])
  _drop_root(config.get("uid"))
  os.chdir(config.get("cwd") or os.getcwd())
  if config["audit_hook"]:
    sys.addaudithook(_make_hook(os.getcwd(), frozenset(_DENY), frozenset(_DENY_IMPORTS),
                                dict(_PATH_EVENTS), _WRITE_FLAGS))
  code = compile(source, os.path.basename(program_path), "exec")
  namespace = {"__name__": "__main__" if config["as_main"] else "__sandbox__",
               "__builtins__": __builtins__}
  del source
  if mode == "judge":
    # The prompt's definitions first (helpers the tests use), then the proxy, then the tests.
    exec(compile(config["prompt"], "prompt.py", "exec"), namespace)
    namespace[config["entry_point"]] = _proxy(config["entry_point"], *config["keep_fds"])
  try:
    exec(code, namespace)
    if mode == "serve":
      _serve(namespace, config["entry_point"], *config["keep_fds"])
      sys.stdout.flush()
      os._exit(0)
  except SystemExit as e:
    # A program that exits early never reached the tests after it: not a pass.
    sys.stderr.write(f"sandbox: program called exit({e.code!r}) before finishing\n")
    sys.stderr.flush()
    os._exit(3)
  sys.stdout.write(f"\n{nonce}\n")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
