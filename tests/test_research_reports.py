"""Research reports (relay, probes, m-sweep) go through paths.py: they work for gs:// workdirs,
and only process 0 writes them."""

import json

import numpy as np

from diffmas_jax import paths
from diffmas_jax.research import probe_run, relay_run, run_tables

ORDER = ["single", "latent_mas m=4"]


def _rows():
  rng = np.random.default_rng(0)
  return [dict(condition=c, id=f"q{i}", gold="A", pred="A" if rng.random() < 0.5 else "B",
               correct=bool(rng.random() < 0.5), nll=float(rng.random()), condition_seconds=1.0)
          for c in ORDER for i in range(10)]


def test_relay_report_is_written_to_a_url(fake_gcs):
  stats = relay_run.summarize(_rows(), ORDER)
  relay_run.write_report("gs://bucket/relay", stats, [dict(condition="x", losses=[1.0, 0.5])], "h")
  out = fake_gcs / "bucket" / "relay"
  assert sorted(p.name for p in out.iterdir()) == ["relay.png", "summary.json", "summary.md"]
  assert json.loads((out / "summary.json").read_text())["single"]["n"] == 10
  assert "| latent_mas m=4 | 10 |" in (out / "summary.md").read_text()
  assert (out / "relay.png").read_bytes()[:4] == b"\x89PNG"


def test_jsonl_rows_round_trip_through_a_url(fake_gcs):
  path = "gs://bucket/run/results.jsonl"
  assert paths.read_jsonl(path) == []  # a fresh run
  paths.append_text(path, json.dumps({"a": 1}) + "\n")
  paths.append_text(path, json.dumps({"a": 2}) + "\n")
  assert paths.read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_probe_plot_goes_to_a_url(fake_gcs):
  rows = [dict(model="tiny", trace_keep=keep, agents=k, agent=j, distance=k - 1 - j,
               kv_norm=0.1 / (j + 1), adapter_norm=0.2, kv_jvp=0.3)
          for keep in ("all", "own_segment") for k in (2, 3) for j in range(k - 1)]
  probe_run.plot(rows, "gs://bucket/probe/probes.png", "t")
  assert (fake_gcs / "bucket/probe/probes.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_compare_reads_and_writes_urls(fake_gcs):
  run = fake_gcs / "bucket" / "runs" / "train_a"
  run.mkdir(parents=True)
  (run / "summary.json").write_text(json.dumps({"methods": {"diffmas": dict(
      n=4, accuracy=0.5, ci_low=0.1, ci_high=0.9)}}))
  table = run_tables.compare_table(["gs://bucket/runs/train_a"])
  assert "train_a: diffmas" in table
  run_tables.write_text("gs://bucket/out/ablations.md", table)
  assert (fake_gcs / "bucket/out/ablations.md").read_text() == table + "\n"
