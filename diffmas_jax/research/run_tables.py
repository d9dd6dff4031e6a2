"""Tables and plots of finished training runs: the m-sweep and side-by-side ablations.

Pure readers of launch.train workdirs (local or URL): metrics.jsonl gives the
training figures, summary.json the evaluated methods. `launch.sweep` drives them.
"""

from __future__ import annotations

import json

from diffmas_jax import paths


def training_figures(workdir: str) -> dict:
  """From metrics.jsonl: updates, first/last probe loss, mean seconds per update."""
  path = f"{workdir}/metrics.jsonl"
  if not paths.as_path(path).exists():
    return {}
  from diffmas_jax.logging_utils import read_metrics
  rows = read_metrics(path)
  probe = [r["probe_loss"] for r in rows if "probe_loss" in r]
  updates = [r for r in rows if "loss" in r]
  times = [r["time"] for r in rows if "loss" in r]
  return {"updates": len(updates),
          "last_loss": updates[-1]["loss"] if updates else None,
          "probe_first": probe[0] if probe else None,
          "probe_last": probe[-1] if probe else None,
          "s_per_update": ((times[-1] - times[0]) / (len(times) - 1)) if len(times) > 1 else None}


def run_summaries(workdir: str) -> dict:
  path = paths.as_path(f"{workdir}/summary.json")
  if not path.exists():
    return {}
  return json.loads(path.read_text())["methods"]


def _f(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def _row(label: str, s: dict, t: dict) -> str:
  return (f"| {label} | {s.get('n', '-')} | {_f(100 * s['accuracy'], '.1f')} | "
          f"[{_f(100 * s['ci_low'], '.1f')}, {_f(100 * s['ci_high'], '.1f')}] | "
          f"{_f(s.get('answer_ppl'))} | {_f(s.get('mean_trace_len'), '.0f')} | "
          f"{_f(s.get('seconds_per_sample'))} | {_f(t.get('probe_first'), '.3f')} -> "
          f"{_f(t.get('probe_last'), '.3f')} | {_f(t.get('s_per_update'), '.0f')} |")


HEADER = ("| {} | n | accuracy % | 95% CI | answer PPL | mean trace length | s/sample | "
          "probe loss before -> after training | s/update |\n|---|---|---|---|---|---|---|---|---|")


def sweep_table(workdir: str, values: list[int]) -> tuple[str, list[dict]]:
  lines, points = [HEADER.format("m")], []
  for m in values:
    sub = f"{workdir}/m{m}"
    s, t = run_summaries(sub).get("diffmas"), training_figures(sub)
    if s is None:
      lines.append(f"| {m} | (not finished) |||||||")
      continue
    lines.append(_row(str(m), s, t))
    points.append(dict(m=m, **s, **{f"train_{k}": v for k, v in t.items()}))
  return "\n".join(lines), points


def sweep_plot(points: list[dict], png: str) -> str:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(9, 3.4), dpi=110)
  ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  ms = [p["m"] for p in points]
  acc = [100 * p["accuracy"] for p in points]
  err = [[100 * (p["accuracy"] - p["ci_low"]) for p in points],
         [100 * (p["ci_high"] - p["accuracy"]) for p in points]]
  ax1.errorbar(ms, acc, yerr=err, marker="o", capsize=3)
  ax1.set(xlabel="latent steps m per agent", ylabel="DiffMAS accuracy % (95% CI)")
  ax2.plot(ms, [p.get("answer_ppl") for p in points], marker="o", label="answer PPL (eval)")
  ax2.plot(ms, [p.get("train_probe_last") for p in points], marker="s",
           label="probe loss after training")
  ax2.set(xlabel="latent steps m per agent")
  ax2.legend(fontsize=8)
  for ax in (ax1, ax2):
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ms, [str(m) for m in ms])
  fig.tight_layout()
  return paths.write_png(png, fig)


def compare_table(workdirs: list[str]) -> str:
  lines = [HEADER.format("run: method")]
  for w in workdirs:
    t = training_figures(w)
    for name, s in run_summaries(w).items():
      lines.append(_row(f"{paths.as_path(w).name}: {name}", s, t))
  return "\n".join(lines)


def write_text(path: str, text: str) -> None:
  paths.write_atomic(path, text + "\n")
