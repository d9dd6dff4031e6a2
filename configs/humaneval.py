"""HumanEval+ / MBPP+ with the code adapter (50 HumanEval problems, 10 epochs).

The 50 training problems are excluded from evaluation automatically.

  python -m launch.train --config=configs/humaneval.py --config.model.source=/models/Qwen3-8B \\
      --config.eval.data_path=/data/HumanEvalPlus.jsonl
  python -m launch.train --config=configs/humaneval.py:quickstart   # HumanEval (bundled)
"""

from configs import ablations, paper


def get_config(arg: str | None = None):
  opts = paper.parse_options(arg)
  cfg = paper.paper_config(data="humaneval", num_examples=50, epochs=10.0,
                           eval_task="humaneval_plus")
  if "quickstart" in opts:
    paper.quickstart_variant(cfg, eval_task="humaneval", stand_in_for="HumanEval+ (evalplus, "
                             "not bundled)", eval_limit=10, max_new_tokens=192, num_examples=16)
    cfg.train.epochs = 2.0
    cfg.train.max_target_tokens = 256
  return ablations.apply(cfg, opts)
