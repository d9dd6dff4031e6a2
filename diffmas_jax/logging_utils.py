"""Training metrics as JSONL (one line per logged step) and the loss-curve plot.

    logger = MetricsLogger(workdir)
    logger.log(step, loss=loss, token_acc=acc, ppl=ppl, lr=lr, grad_norm=gnorm,
               tokens_per_s=tps)
    ...
    plot_loss_curve(logger.path, os.path.join(workdir, "loss.png"))

A resumed run appends to the same file and re-logs the steps after its
checkpoint; `read_metrics` keeps only the latest run's rows for those steps.
In a multi-process job only process 0 writes. Paths may be URLs (gs://...):
files go through `diffmas_jax.paths` (etils epath).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

from diffmas_jax import paths

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
  """Appends one JSON object per step to `<workdir>/metrics.jsonl`, flushed each time.

  Attributes:
    path: the JSONL file.
    writes: False on processes other than 0 of a multi-process job (`log`
      then only returns the row), unless `write` is given.
  """

  def __init__(self, workdir: str, filename: str = METRICS_FILE, write: bool | None = None):
    if write is None:
      import jax
      write = jax.process_index() == 0
    self.writes = write
    directory = paths.as_path(workdir)
    self.path = str(directory / filename)
    if write:
      directory.mkdir(parents=True, exist_ok=True)
      _drop_partial_last_line(self.path)

  def log(self, step: int, metrics: Mapping[str, Any] | None = None, **more: Any) -> dict:
    """Writes {"step", "time", **metrics} as one line.

    Args:
      step: the optimizer step the metrics belong to.
      metrics, **more: scalar values (python/numpy/JAX scalars become floats,
        ints stay ints; strings are kept). `time` defaults to the wall clock.
    Returns:
      The row written.
    """
    row: dict[str, Any] = {"step": int(step), "time": time.time()}
    for key, value in {**(metrics or {}), **more}.items():
      row[key] = _scalar(key, value)
    if self.writes:
      paths.append_text(self.path, json.dumps(row) + "\n")
    return row


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics JSONL as the latest run saw them, sorted by step.

  A step smaller than the previous row's marks a resume from a checkpoint: rows
  from that step on written before it belong to the abandoned run and are
  dropped. Consecutive rows of one step are merged (later values win). So for
  every step the last value written wins. Unparseable lines (a kill mid-write)
  are skipped with a warning.
  """
  if not paths.as_path(path).exists():
    raise FileNotFoundError(f"no metrics file at {path}; pass <train workdir>/{METRICS_FILE} "
                            "written by MetricsLogger")
  rows: list[dict] = []
  bad = 0
  with paths.as_path(path).open("r", encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        bad += line.strip() != ""
        continue
      if rows and step == rows[-1]["step"]:
        rows[-1] = {**rows[-1], **row}  # several rows for one step (e.g. train + eval)
        continue
      if rows and step < rows[-1]["step"]:
        rows = [r for r in rows if r["step"] < step]  # resumed: drop the abandoned run's rows
      rows.append(row)
  if bad:
    log.warning("%s: skipped %d unparseable line(s)", path, bad)
  return rows


def plot_loss_curve(metrics_jsonl: str, png_path: str, key: str = "loss",
                    also: tuple[str, ...] = ()) -> str:
  """Plots `key` against step (with a moving average once there are many points).

  Args:
    metrics_jsonl: a file written by `MetricsLogger`.
    png_path: where the PNG goes.
    key: which metric to plot.
    also: further metrics drawn on the same axes where present (e.g. probe_loss).
  Returns:
    png_path.
  """
  from matplotlib.figure import Figure  # Figure API: no pyplot state, renders with Agg

  rows = [r for r in read_metrics(metrics_jsonl)
          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  if not rows:
    available = sorted({k for r in read_metrics(metrics_jsonl) for k in r} - {"step", "time"})
    raise ValueError(f"{metrics_jsonl} has no finite {key!r} values to plot; metrics present: "
                     f"{available}")
  steps, values = [r["step"] for r in rows], [r[key] for r in rows]
  fig = Figure(figsize=(5.5, 3.5), dpi=110)
  ax = fig.add_subplot()
  ax.plot(steps, values, marker="o" if len(rows) < 30 else None, alpha=0.45 if
          len(rows) >= 50 else 1.0, label=key)
  legend = False
  if len(rows) >= 50:
    window = max(5, len(rows) // 25)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
              for i in range(len(values))]
    ax.plot(steps, smooth, label=f"{key} (mean of last {window})")
    legend = True
  for extra in also:
    points = [(r["step"], r[extra]) for r in read_metrics(metrics_jsonl)
              if isinstance(r.get(extra), (int, float)) and math.isfinite(r[extra])]
    if points:
      ax.plot(*zip(*points), marker="s" if len(points) < 30 else None, label=extra)
      legend = True
  if legend:
    ax.legend(fontsize=8)
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(f"training {key}", fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.write_png(png_path, fig)
  return png_path


def _scalar(key: str, value: Any) -> Any:
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, int):
    return value
  if getattr(value, "ndim", 0) != 0:
    raise ValueError(f"metric {key!r} has shape {getattr(value, 'shape', '?')}; log scalars only "
                     "(reduce it first, e.g. with .mean())")
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"metric {key!r}={value!r} is not a number or string") from e


def _drop_partial_last_line(path: str) -> None:
  """Cuts a line left half-written by a kill, so the next row starts on its own line."""
  p = paths.as_path(path)
  if not p.exists():
    return
  data = p.read_bytes()
  if data and not data.endswith(b"\n"):
    cut = data.rfind(b"\n") + 1
    log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run",
                path, len(data) - cut)
    paths.write_atomic(path, data[:cut])
