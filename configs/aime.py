"""AIME 2024/2025 with the math adapter (MATH-210, 1 epoch) on Qwen3-8B.

  python -m launch.train --config=configs/aime.py --config.model.source=/models/Qwen3-8B \\
      --config.eval.task=aime2025 --config.eval.data_path=/data/aime2025.jsonl
  python -m launch.train --config=configs/aime.py:quickstart    # MATH-500 stand-in, offline

AIME files are jsonl/parquet with "problem" and "answer"; eval.data_path points to one.
"""

from configs import ablations, paper


def get_config(arg: str | None = None):
  opts = paper.parse_options(arg)
  cfg = paper.paper_config(data="math", num_examples=210, epochs=1.0, eval_task="aime2024")
  if "quickstart" in opts:
    paper.quickstart_variant(cfg, eval_task="math500", stand_in_for="AIME 2024/2025 (not bundled)",
                             eval_limit=10, max_new_tokens=256)
  return ablations.apply(cfg, opts)
