"""ARC-Challenge test (multiple choice), the offline stand-in for GPQA-Diamond.

  python -m launch.eval --config=configs/eval_arc.py --config.eval.limit=50 --workdir=runs/arc50
  python -m launch.eval --config=configs/eval_arc.py:quick

Options after the colon are those of configs/eval_task.py.
"""

from configs import eval_task


def get_config(arg: str | None = None):
  return eval_task.get_config(",".join(filter(None, ["task=arc_challenge", arg])))
