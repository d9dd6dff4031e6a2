"""Hand-written CPU kernels for inference (XLA FFI): weight products and one-query attention.

Decode and latent steps multiply a few rows by every weight matrix. XLA:CPU's
products read a [K, N] weight at 60-80% of the memory bandwidth at one row and
about half at eight (docs/performance.md). `PackedMatrix` stores the weight as
column panels [N / 32, K, 32], each one contiguous stream, and `packed_matmul.cc`
reads them on XLA's intra-op threads. Prefill's many-row products run on it too:
there it matched XLA's tiled matmul (one [576, 3072] weight, 1024 rows: 8.2 vs
8.8 ms, scratch), so there is no second copy of the weights in XLA's layout.
`partial_attention` (attention.cc) scores one query per row against cached keys and
values read in place; `layers.attention(kernel=True)` uses it on packed weights.

The library is compiled on first use with the system's C++ compiler (`$CXX`, else
g++, c++ or clang++; -O3 -march=native, about 3 s) into
`$DIFFMAS_KERNEL_CACHE`, default `$XDG_CACHE_HOME/diffmas_jax/kernels`, keyed by
source, compiler, flags, jaxlib and CPU model, so every host builds its own.
`$DIFFMAS_CPU_KERNELS` picks when to use it: "auto" (default: on a single CPU
device when the build succeeds; otherwise XLA's product, with one warning saying
why), "on" (fail when it cannot build), "off" (XLA's product everywhere).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

from diffmas_jax import compile_cache
from diffmas_jax.errors import InputError

ENV = "DIFFMAS_CPU_KERNELS"
CACHE_ENV = "DIFFMAS_KERNEL_CACHE"
PANEL = 32  # columns per panel (packed_matmul.cc: kPanel)
_TARGET = "diffmas_packed_matmul"
_ATTENTION_TARGET = "diffmas_partial_attention"
# One library; each source defines one FFI handler: (file, handler symbol, target name).
_KERNELS = (("packed_matmul.cc", "DiffmasPackedMatmul", _TARGET),
            ("attention.cc", "DiffmasPartialAttention", _ATTENTION_TARGET))
_SOURCES = tuple(pathlib.Path(__file__).with_name(f) for f, _, _ in _KERNELS)
_HEADERS = (pathlib.Path(__file__).with_name("cpu_common.h"),)
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def mode() -> str:
  value = os.environ.get(ENV, "auto").strip().lower()
  if value not in ("auto", "on", "off"):
    raise InputError(f"${ENV}={value!r}: expected auto, on or off")
  return value


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or compile_cache.user_cache_dir("kernels"))


def _cpu_model() -> str:
  """The first CPU's model and instruction-set flags (-march=native builds for them)."""
  try:
    first_cpu = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
  except OSError:
    return platform.processor()
  return "\n".join(line for line in first_cpu.splitlines()
                   if line.startswith(("model name", "flags", "Features", "CPU part")))


def _compile(out: pathlib.Path, cxx: str) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  # Written aside and renamed: processes building at once never load half a library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
  try:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


@functools.cache
def _build() -> str | None:
  """Compiles and registers the kernel; None when done, else why it is unavailable."""
  cxx = os.environ.get("CXX") or next(
      (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
  if cxx is None:
    return "no C++ compiler found (install g++ or set $CXX)"
  key = hashlib.sha256("\n".join([
      *(src.read_text() for src in (*_SOURCES, *_HEADERS)), cxx, *_FLAGS, jax.__version__,
      jax.lib.__version__, _cpu_model(), platform.machine()]).encode()).hexdigest()[:16]
  out = _cache_dir() / f"packed_matmul-{key}.so"
  try:
    if not out.exists():
      _compile(out, cxx)
    library = ctypes.cdll.LoadLibrary(str(out))
    for _, symbol, target in _KERNELS:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f"building {', '.join(f for f, _, _ in _KERNELS)} into {out.parent} failed: {e}"
  return None


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered, else why not (compiles on first call)."""
  return _build()


def check_setting() -> None:
  """Validates $DIFFMAS_CPU_KERNELS; with "on", builds the kernel now, before long work."""
  if mode() == "on":
    enabled()


def _require() -> None:
  """A PackedMatrix exists only where its kernel is registered."""
  if (reason := _build()) is not None:
    raise InputError(f"cannot pack weights for the CPU kernel: {reason}; pack with "
                     f"model.per_layer(weights, packed=False) or set {ENV}=off")


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("packed CPU matmul unavailable, using XLA's product: %s", reason)


def enabled() -> bool:
  """Whether `per_layer` packs CPU weights (see the module docstring)."""
  setting = mode()
  if setting == "off":
    return False
  reason = unavailable_reason()
  if reason is not None:
    if setting == "on":
      raise InputError(f"${ENV}=on but the packed CPU matmul is unavailable: {reason}; "
                       f"set {ENV}=auto to fall back to XLA's product")
    _warn_once(reason)
    return False
  return True


def packable(w) -> bool:
  """A concrete f32 [*in, *out] matrix on one CPU device, N a multiple of the panel."""
  if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array) or w.dtype != jnp.float32:
    return False
  devices = w.sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
  """A [*in, *out] weight stored as column panels [N / 32, K, 32] (K = prod(in)).

  `copy_of_embedding`: the LM head of a tied model, a packed copy of embed^T
  (model.per_layer); `model.stacked` drops it.
  """

  panels: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  n_in: int = dataclasses.field(metadata=dict(static=True))
  copy_of_embedding: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def dtype(self):
    return self.panels.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def unpack(self) -> jax.Array:
    return jnp.swapaxes(self.panels, 0, 1).reshape(self.shape)

  def matmul(self, x2: jax.Array) -> jax.Array:
    """[M, K] @ this weight as [K, N] -> [M, N]."""
    return _packed_matmul(x2, self.panels)

  def transposed_matmul(self, g2: jax.Array) -> jax.Array:
    """[M, N] @ this weight's transpose [N, K] -> [M, K] (the input's gradient)."""
    return _transposed_product(g2, self.panels)

  def untied(self) -> jax.Array | None:
    """As an LM head: the [D, V] matrix it packs, None for a tied model's copy of embed^T."""
    return None if self.copy_of_embedding else self.unpack()


def pack(w: jax.Array, n_in: int, copy_of_embedding: bool = False) -> PackedMatrix | jax.Array:
  """w [*in, *out] as a PackedMatrix, or w unchanged when it does not fit the kernel."""
  k = math.prod(w.shape[:n_in])
  n = w.size // k
  return _packed(w, n, lambda: jnp.swapaxes(w.reshape(k, n // PANEL, PANEL), 0, 1),
                 tuple(w.shape), n_in, copy_of_embedding)


def pack_rows(w: jax.Array, copy_of_embedding: bool = False) -> PackedMatrix | jax.Array:
  """w [N, K] (one row per output, like an embedding) as the PackedMatrix of w^T [K, N],
  without materializing w^T; w unchanged when it does not fit the kernel."""
  n, k = w.shape
  return _packed(w, n, lambda: jnp.swapaxes(w.reshape(n // PANEL, PANEL, k), 1, 2),
                 (k, n), 1, copy_of_embedding)


def _packed(w, n: int, make_panels, shape, n_in: int, copy_of_embedding: bool):
  if not packable(w) or n % PANEL:
    return w
  _require()
  return PackedMatrix(panels=jax.device_put(make_panels(), w.sharding), shape=shape,
                      n_in=n_in, copy_of_embedding=copy_of_embedding)


def _transposed_product(g2: jax.Array, panels: jax.Array) -> jax.Array:
  return jnp.einsum("mpt,pkt->mk", g2.reshape(g2.shape[0], -1, PANEL), panels)


def _product(x2: jax.Array, panels: jax.Array) -> jax.Array:
  m, n = x2.shape[0], panels.shape[0] * PANEL
  if x2.dtype != jnp.float32:
    return jnp.einsum("mk,pkt->mpt", x2, panels.astype(x2.dtype)).reshape(m, n)
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")
  return call(x2, panels)


# The kernel has no derivative rule of its own; the backward runs as XLA products.
@jax.custom_vjp
def _packed_matmul(x2: jax.Array, panels: jax.Array) -> jax.Array:
  return _product(x2, panels)


def _packed_matmul_fwd(x2, panels):
  return _product(x2, panels), (x2, panels)


def _packed_matmul_bwd(res, g):
  x2, panels = res
  return (_transposed_product(g, panels).astype(x2.dtype),
          jnp.einsum("mk,mpt->pkt", x2, g.reshape(g.shape[0], -1, PANEL)).astype(panels.dtype))


_packed_matmul.defvjp(_packed_matmul_fwd, _packed_matmul_bwd)


def partial_attention(qc: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                      layer: jax.Array, keys_transposed: bool = False
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One query per row and head group against layer `layer` of a key/value block.

  qc [B, K, G, Dh] f32 (pre-scaled; Dh 16, 32, 64 or 128); values [L, B, K, S, Dh] and
  keys alike, or [L, B, K, Dh, S] with `keys_transposed`; f32, read in place; mask
  [B, S] bool. Returns the block's softmax statistics
  (o [B, K, G, Dh], m [B, K, G], l [B, K, G]): m the largest visible score, l and o
  the sums of exp(s - m) and exp(s - m) v over visible slots (attention.cc). Slots no
  row sees are not read. No derivative rule: layers.py wraps it in one.
  """
  _require()
  b, k, g, d = qc.shape
  call = jax.ffi.ffi_call(_ATTENTION_TARGET, (jax.ShapeDtypeStruct((b, k, g, d), jnp.float32),
                                              jax.ShapeDtypeStruct((b, k, g), jnp.float32),
                                              jax.ShapeDtypeStruct((b, k, g), jnp.float32)),
                          vmap_method="sequential")
  return call(qc, keys, values, mask, jnp.asarray(layer, jnp.int32),
              keys_transposed=bool(keys_transposed))
