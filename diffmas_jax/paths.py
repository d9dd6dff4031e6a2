"""One path abstraction for run directories: local paths and URLs (gs://, s3://).

Every file a run writes (metrics, results, summaries, checkpoints, exports)
goes through `etils.epath`, which orbax uses too, so `--workdir=gs://bucket/run`
stays a URL end to end: never `os.path` on it. Object stores cannot append to a
file, so `append_text` rewrites remote files whole (they are small: one line per
update or per sample) and appends with fsync locally.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """An epath.Path; local paths become absolute, URLs are kept as they are."""
  p = epath.Path(path)
  return p if is_url(path) else p.absolute()


def append_text(path: PathLike, text: str, fsync: bool = False) -> None:
  """Appends `text` (whole lines) to `path`, creating it when missing."""
  if is_url(path):
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object stores
    old = p.read_bytes() if p.exists() else b""
    p.write_bytes(old + text.encode("utf-8"))
    return
  # One write() in append mode, so concurrent lines never interleave partially.
  with open(path, "ab") as f:
    f.write(text.encode("utf-8"))
    f.flush()
    if fsync:
      os.fsync(f.fileno())


def write_atomic(path: PathLike, data: bytes | str) -> None:
  """Writes a whole file so readers never see half of it (temp file + rename); creates
  its directory when missing."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f"{p.name}.tmp"
  tmp.write_bytes(data)
  tmp.replace(p)


def write_png(path: PathLike, fig) -> str:
  """Saves a matplotlib Figure as a PNG at `path` (local or URL), atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  write_atomic(path, buf.getvalue())
  return os.fspath(path)


def read_jsonl(path: PathLike) -> list[dict]:
  """The rows of a JSONL file; [] when it does not exist yet (a fresh run)."""
  p = epath.Path(path)
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def local_dir_for(path: PathLike) -> Iterator[str]:
  """A local directory whose files end up in `path` (copied there on exit when
  it is a URL), for writers that need a local file name (safetensors, PEFT)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    target = epath.Path(path)
    for root, _, files in os.walk(tmp):
      rel = os.path.relpath(root, tmp)  # local side only
      dest = target if rel == "." else target / rel
      dest.mkdir(parents=True, exist_ok=True)
      for name in files:
        epath.Path(os.path.join(root, name)).copy(dest / name, overwrite=True)

