"""Append-only per-sample JSONL that survives kills and lets evaluation runs resume.

    store = ResultStore("runs/gsm8k50/results.jsonl")
    for item in items:
      if ("latent_mas", item.id, 0) not in store.done_keys():
        store.append({"method": "latent_mas", "id": item.id, "correct": ..., ...})

One record per (method, item id, sample index). The harness writes these fields:
method, task, id, question, gold, prediction, raw_output, correct, output_tokens,
trace_len_per_agent (list, one length per upstream agent), seconds, answer_nll (sum
of the generated answer's token NLL), answer_tokens, sample_index, seed, and
optionally mean_token_entropy. Only `method`, `id` and `correct` are required
here; the statistics skip fields a record does not carry. The path may be a URL
(gs://...): it goes through `diffmas_jax.paths` (etils epath).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

from diffmas_jax import paths

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("method", "id", "correct")

SampleKey = tuple[str, str, int]


def sample_key(record: dict) -> SampleKey:
  """(method, item id as str, sample index): what makes a record unique in a run."""
  return (str(record["method"]), str(record["id"]), int(record.get("sample_index") or 0))


class ResultStore:
  """A JSONL file of per-sample records; each append is flushed and fsynced.

  A kill can lose at most the line being written. On open, a truncated or
  unparseable *last* line (the trace of such a kill) is reported with a warning
  and cut from the file, so later appends stay parseable and that sample is
  simply recomputed. A bad line anywhere else is not a kill and raises.

  Attributes:
    path: the JSONL file.
    records: every record in the file, in write order (a later duplicate of a
      sample key replaces the earlier one).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    file = paths.as_path(self.path)
    if file.is_dir():
      raise IsADirectoryError(f"results path {self.path!r} is a directory; pass the JSONL file "
                              "path, e.g. <workdir>/results.jsonl")
    file.parent.mkdir(parents=True, exist_ok=True)
    self._by_key: dict[SampleKey, dict] = {}
    if file.exists():
      self._load()

  @property
  def records(self) -> list[dict]:
    return list(self._by_key.values())

  def done_keys(self) -> set[SampleKey]:
    """Keys (method, id, sample_index) of the samples already written."""
    return set(self._by_key)

  def append(self, record: dict) -> None:
    """Validates `record`, then writes it as one line with flush + fsync.

    Raises:
      ValueError: a required key is missing, or a value is not JSON-serialisable.
    """
    self.extend([record])

  def extend(self, records: Iterable[dict]) -> None:
    """Appends several records in one write (one rewrite for a remote file)."""
    lines = [self._line(r) for r in records]
    if not lines:
      return
    paths.append_text(self.path, "".join(lines), fsync=True)
    for line in lines:
      parsed = json.loads(line)  # store what a reload would see (numpy -> python)
      self._by_key.pop(sample_key(parsed), None)
      self._by_key[sample_key(parsed)] = parsed

  def _line(self, record: dict) -> str:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
      raise ValueError(f"result record lacks {missing}; every record needs {list(REQUIRED_KEYS)} "
                       f"(got keys {sorted(record)})")
    try:
      line = json.dumps(record, ensure_ascii=False, default=_to_json) + "\n"
    except TypeError as e:
      raise ValueError(f"result record for {sample_key(record)} is not JSON-serialisable: {e}; "
                       "convert that field to a str, number or list first") from e
    return line

  def _load(self) -> None:
    data = paths.as_path(self.path).read_bytes()
    lines = data.splitlines(keepends=True)
    good_end, duplicates = 0, 0
    for number, line in enumerate(lines, start=1):
      if not line.strip():  # blank lines (hand edits) are harmless
        good_end += len(line)
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or any(k not in record for k in REQUIRED_KEYS):
          raise ValueError(f"not a record with keys {list(REQUIRED_KEYS)}")
      except ValueError as e:
        if number < len(lines):
          raise ValueError(
              f"{self.path}: line {number} of {len(lines)} is corrupt ({e}); only the last line "
              "can be cut by a kill, so this file was edited or written concurrently. Delete "
              "that line (its sample is then recomputed) or start a fresh workdir") from None
        log.warning("%s: dropping the last line (%d bytes), cut off by an interrupted run; its "
                    "sample will be recomputed", self.path, len(line))
        break
      key = sample_key(record)
      duplicates += key in self._by_key
      self._by_key.pop(key, None)
      self._by_key[key] = record
      good_end += len(line)
    if duplicates:
      log.warning("%s: %d sample(s) appear more than once; keeping the last of each",
                  self.path, duplicates)
    if good_end < len(data):
      paths.write_atomic(self.path, data[:good_end])
    elif data and not data.endswith(b"\n"):
      # A complete record whose newline was lost: terminate it so appends start a new line.
      paths.append_text(self.path, "\n")


def _to_json(x: Any) -> Any:
  """JSON fallback for numpy / JAX scalars and arrays."""
  if hasattr(x, "tolist") and hasattr(x, "dtype"):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")
