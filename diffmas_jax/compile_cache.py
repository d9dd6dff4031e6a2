"""JAX's persistent compilation cache, on by default for the launchers.

Almost all of a quick command's first run is XLA compilation; with the cache a
second run of the same command (same shapes, same JAX/XLA version) loads the
compiled executables from disk instead. The directory is, in order:
the `--compile_cache` flag, `$DIFFMAS_COMPILE_CACHE`, then
`$XDG_CACHE_HOME/diffmas_jax/xla` (default `~/.cache/diffmas_jax/xla`).
"off" (or "none", "0", "") in the flag or the variable disables it.
"""

from __future__ import annotations

import os

ENV = "DIFFMAS_COMPILE_CACHE"
_OFF = ("off", "none", "0", "false", "")
# Compilations shorter than this are not worth a disk round trip.
MIN_COMPILE_SECONDS = 0.1


def user_cache_dir(name: str) -> str:
  """`$XDG_CACHE_HOME/diffmas_jax/<name>`, default `~/.cache/diffmas_jax/<name>`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffmas_jax", name)


def default_dir() -> str:
  return user_cache_dir("xla")


def resolve(setting: str | None = None) -> str | None:
  """The cache directory for a flag value (None: not given), or None when disabled."""
  value = setting if setting is not None else os.environ.get(ENV)
  if value is None:
    return default_dir()
  if value.strip().lower() in _OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(setting: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache at the resolved directory.

  Returns the directory, or None when disabled or not writable (a read-only
  home must not stop a run: it only costs the compile time again).
  """
  path = resolve(setting)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  if not os.access(path, os.W_OK):
    return None
  import jax

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
