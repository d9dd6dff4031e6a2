"""OpenBookQA with the commonsense adapter (700 CommonsenseQA rationales, 1 epoch).

The paper's targets are model-written rationales, which are not published: the
offline recipe uses templated rationales ending in the gold letter (see
diffmas_jax.tasks.training_data.commonsenseqa_train), or your own jsonl via
--config.train.data=jsonl --config.train.data_path=FILE.

  python -m launch.train --config=configs/openbookqa.py --config.model.source=/models/Qwen3-8B
  python -m launch.train --config=configs/openbookqa.py:quickstart
"""

from configs import ablations, paper


def get_config(arg: str | None = None):
  opts = paper.parse_options(arg)
  cfg = paper.paper_config(data="commonsenseqa", num_examples=700, epochs=1.0,
                           eval_task="openbookqa", max_new_tokens=2048)
  if "quickstart" in opts:
    paper.quickstart_variant(cfg, eval_task="openbookqa", stand_in_for="", num_examples=32)
  return ablations.apply(cfg, opts)
