"""GPQA-Diamond: the paper's math/science adapter (MATH-210, 1 epoch) on Qwen3-8B.

  python -m launch.train --config=configs/gpqa.py --config.model.source=/models/Qwen3-8B \\
      --config.eval.data_path=/data/gpqa_diamond.csv
  python -m launch.train --config=configs/gpqa.py:quickstart    # offline, embedded model

GPQA-Diamond is gated: download gpqa_diamond.csv (official release, columns
Question / Correct Answer / Incorrect Answer 1-3) and point eval.data_path to
it. The quickstart variant evaluates on ARC-Challenge as the offline stand-in.
"""

from configs import ablations, paper


def get_config(arg: str | None = None):
  opts = paper.parse_options(arg)
  cfg = paper.paper_config(data="math", num_examples=210, epochs=1.0, eval_task="gpqa_diamond")
  if "quickstart" in opts:
    paper.quickstart_variant(cfg, eval_task="arc_challenge",
                             stand_in_for="GPQA-Diamond (gated, not bundled)")
  return ablations.apply(cfg, opts)
