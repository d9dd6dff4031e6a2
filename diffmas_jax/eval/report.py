"""Run report: summary.md (one table row per method), summary.json and accuracy.png.

    md_path, png_path = write_summary(records, "runs/gsm8k50", "GSM8K test (50 items)",
                                      notes=["offline stand-in: ARC-Challenge for GPQA-Diamond"])
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from diffmas_jax import paths
from diffmas_jax.eval.stats import stats_by_method

SUMMARY_MD, SUMMARY_JSON, ACCURACY_PNG = "summary.md", "summary.json", "accuracy.png"


def write_summary(records: Sequence[dict], workdir: str, title: str, notes: Sequence[str] = (),
                  n_resamples: int = 5000, seed: int = 0) -> tuple[str, str]:
  """Writes summary.md, summary.json and accuracy.png into `workdir`.

  Args:
    records: per-sample rows of any number of methods (see `results.py`).
    workdir: output folder (created if missing).
    title: heading of the report and the chart.
    notes: free-form lines listed under the title (model, settings, stand-ins).
    n_resamples, seed: of the 95% percentile bootstrap over items.
  Returns:
    (path of summary.md, path of accuracy.png). summary.json holds
    {"title", "notes", "bootstrap", "methods": {name: `method_stats` figures}}.
  """
  if not records:
    raise ValueError(f"no records to summarise for {title!r}; run the evaluation first "
                     "(python -m launch.eval) or check that its methods/limit select samples")
  stats = stats_by_method(records, n_resamples=n_resamples, level=0.95, seed=seed)
  directory = paths.as_path(workdir)  # a local path or a URL (gs://...)
  directory.mkdir(parents=True, exist_ok=True)
  bootstrap = {"level": 0.95, "n_resamples": n_resamples, "seed": seed, "over": "items"}
  md_path = str(directory / SUMMARY_MD)
  _write_atomic(md_path, _markdown(stats, title, notes, bootstrap))
  _write_atomic(str(directory / SUMMARY_JSON), json.dumps(
      _finite({"title": title, "notes": list(notes), "bootstrap": bootstrap, "methods": stats}),
      indent=1) + "\n")
  png_path = str(directory / ACCURACY_PNG)
  accuracy_chart(stats, title, png_path)
  return md_path, png_path


def _markdown(stats: dict[str, dict], title: str, notes: Sequence[str],
              bootstrap: dict) -> str:
  """The report text: title, notes, one table row per method, a legend."""
  has = lambda key: any(s.get(key) is not None for s in stats.values())
  columns = [  # (header, cell formatter)
      ("method", None), ("n", lambda s: str(s["n"])),
      ("accuracy %", lambda s: _fmt(100 * s["accuracy"])),
      ("95% CI", lambda s: f"[{_fmt(100 * s['ci_low'])}, {_fmt(100 * s['ci_high'])}]"),
      ("mean output tokens", lambda s: _fmt(s["mean_output_tokens"])),
      ("mean trace length", lambda s: _fmt(s["mean_trace_len"])),
      ("s/sample", lambda s: _fmt(s["seconds_per_sample"], ".2f")),
      ("answer PPL", lambda s: _fmt(s["answer_ppl"], ".2f")),
  ]
  if has("self_consistency"):
    columns += [("self-consistency %", lambda s: _fmt(_pct(s.get("self_consistency")))),
                ("majority vote %", lambda s: _fmt(_pct(s.get("majority_vote_accuracy"))))]
  if has("mean_token_entropy"):
    columns.append(("token entropy", lambda s: _fmt(s["mean_token_entropy"], ".3f")))

  lines = [f"# {title}", ""]
  if notes:
    lines += [f"- {note}" for note in notes] + [""]
  lines.append("| " + " | ".join(header for header, _ in columns) + " |")
  lines.append("|" + "---|" * len(columns))
  for method, s in stats.items():
    lines.append("| " + " | ".join([method] + [cell(s) for _, cell in columns[1:]]) + " |")
  lines += ["", f"n: items. Accuracy: sample 0 of each item; 95% CI: percentile bootstrap over "
            f"items ({bootstrap['n_resamples']} resamples, seed {bootstrap['seed']}). Answer "
            "PPL: exp(total answer NLL / total answer tokens); per-sample mean in summary.json."]
  if has("self_consistency"):
    lines.append("Self-consistency: mean fraction of an item's samples that are correct; "
                 "majority vote: accuracy of the most frequent answer.")
  return "\n".join(lines) + "\n"


def accuracy_chart(stats: dict[str, dict], title: str, png_path: str) -> str:
  """Bar chart of accuracy per method with 95% CI error bars; returns `png_path`."""
  from matplotlib.figure import Figure  # Figure API: no pyplot state, renders with Agg

  names = list(stats)
  acc = [100 * stats[m]["accuracy"] for m in names]
  # Error bars as distances below/above the bar; clipped at 0 against float rounding.
  below = [max(0.0, a - 100 * stats[m]["ci_low"]) for a, m in zip(acc, names)]
  above = [max(0.0, 100 * stats[m]["ci_high"] - a) for a, m in zip(acc, names)]
  fig = Figure(figsize=(1.4 * len(names) + 2.5, 3.8), dpi=110)
  ax = fig.add_subplot()
  palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
  bars = ax.bar(range(len(names)), acc, yerr=[below, above], capsize=5,
                color=[palette[i % len(palette)] for i in range(len(names))])
  for bar, a in zip(bars, acc):  # value inside the bar; just above it when the bar is too low
    inside = a >= 8
    ax.text(bar.get_x() + 0.12 * bar.get_width(), a / 2 if inside else a + 1, f"{a:.1f}",
            color="white" if inside else "black", fontsize=9, va="center" if inside else "bottom")
  ax.set_xticks(range(len(names)),
                [f"{m}\n(n={stats[m]['n']})" for m in names],
                rotation=20 if len(names) > 5 else 0)
  ax.set_ylabel("accuracy % (95% bootstrap CI)")
  ax.set_ylim(0, 105)  # room for a CI cap at 100%
  ax.set_yticks(range(0, 101, 20))
  ax.set_title(title, fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  paths.write_png(png_path, fig)
  return png_path


def _fmt(x: float | None, spec: str = ".1f") -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pct(x: float | None) -> float | None:
  return None if x is None else 100 * x


def _finite(obj: Any) -> Any:
  """NaN/inf -> None, so summary.json is strict JSON."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def _write_atomic(path: str, text: str) -> None:
  """Writes via a temp file + rename, so a kill never leaves a half-written report."""
  paths.write_atomic(path, text)
