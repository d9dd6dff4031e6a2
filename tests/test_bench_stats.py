"""Benchmark statistics: median [min, max] formatting, per-run ratios, probes around a
measurement, per-process peak RSS."""

import subprocess
import sys

import numpy as np
import pytest

from bench.stats import between_probes, fmt, peak_rss_mb, ratios


def test_fmt_and_ratios():
  assert fmt([3.0, 1.0, 2.0]) == "2.0 [1.0, 3.0]"
  assert fmt([2.5], 2, "x") == "2.50x"
  # Ratios are per run (paired), not a ratio of medians.
  assert ratios([10.0, 30.0], [5.0, 10.0]) == [2.0, 3.0]


def test_between_probes_runs_in_order_and_keeps_the_better_probe():
  calls, readings = [], iter([{"read_gbps": 35.0, "matmul_gflops": 480.0},
                              {"read_gbps": 50.0, "matmul_gflops": 440.0}])
  probe = lambda: calls.append("probe") or next(readings)
  result, hw = between_probes(probe, lambda: calls.append("measure") or "ours")
  assert calls == ["probe", "measure", "probe"] and result == "ours"
  # Each figure is the better of the two moments (a slow probe must not flatter the run).
  assert hw["read_gbps"] == 50.0 and hw["matmul_gflops"] == 480.0
  assert [p["read_gbps"] for p in hw["probes"]] == [35.0, 50.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_child_reports_its_own_peak_not_the_parents():
  """ru_maxrss survives vfork + exec, so a child started by a big parent reported the
  parent's peak; VmHWM starts afresh with the child's address space."""
  big = np.ones(400 * 2**20 // 8)  # ~400 MB resident in this (parent) process
  assert peak_rss_mb() > 400
  code = "from bench.stats import peak_rss_mb; print(peak_rss_mb())"
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
  assert float(out.stdout) < 200, out.stdout
  del big
