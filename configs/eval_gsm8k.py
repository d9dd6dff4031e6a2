"""GSM8K test: single / text_mas / latent_mas on the embedded SmolLM2-135M-Instruct.

  python -m launch.eval --config=configs/eval_gsm8k.py --config.eval.limit=50 --workdir=runs/gsm8k50
  python -m launch.eval --config=configs/eval_gsm8k.py:quick     # 4 items, short outputs
  python -m launch.eval --config=configs/eval_gsm8k.py:hier      # independent specialists

Options after the colon are those of configs/eval_task.py.
"""

from configs import eval_task


def get_config(arg: str | None = None):
  return eval_task.get_config(",".join(filter(None, ["task=gsm8k", arg])))
