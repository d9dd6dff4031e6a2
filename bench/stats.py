"""Figures that hold across runs: median [min, max] over repeated runs, per-process peak RSS."""

from __future__ import annotations

import resource
import statistics
from typing import Any, Callable, Sequence


def peak_rss_mb() -> float:
  """This process's own peak resident set (MB).

  Linux's VmHWM belongs to the process's current address space, so it starts
  afresh at exec. `ru_maxrss` does not: a worker started by a parent that had
  loaded the model reports the parent's peak (vfork + exec keeps the larger
  value), which made every worker print the same figure.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def spread(values: Sequence[float]) -> tuple[float, float, float]:
  """(median, min, max)."""
  return statistics.median(values), min(values), max(values)


def fmt(values: Sequence[float], digits: int = 1, suffix: str = "") -> str:
  """'12.3 [11.9, 13.0]' (a single run prints as one number)."""
  med, lo, hi = spread(values)
  if len(values) == 1:
    return f"{med:.{digits}f}{suffix}"
  return f"{med:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ratios(ours: Sequence[float], ref: Sequence[float], higher_is_better: bool = True
           ) -> list[float]:
  """Per-run ratios (ours vs the reference measured in the same run)."""
  return [(a / b if higher_is_better else b / a) for a, b in zip(ours, ref)]


def between_probes(probe: Callable[[], dict], measure: Callable[[], Any]) -> tuple[Any, dict]:
  """`measure()` run between two hardware probes (dicts of figures, higher is better).

  Returns its result and the probe figures to divide by: each the better of the
  two, with both probes under "probes". The host's bandwidth drifts 1.3x or more
  within the hour, and a single probe taken in a slow moment flatters every
  percentage of its run; the better of two moments around the measurement is
  the harder bar.
  """
  probes = [probe()]
  result = measure()
  probes.append(probe())
  return result, {**{key: max(p[key] for p in probes) for key in probes[0]}, "probes": probes}
