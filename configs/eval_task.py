"""Evaluate single / text_mas / latent_mas on any registered task.

  python -m launch.eval --config=configs/eval_task.py:task=medqa --config.eval.limit=100
  python -m launch.eval --config=configs/eval_task.py:task=humaneval,quick
  python -m launch.eval --config=configs/eval_task.py:task=gpqa_diamond \\
      --config.eval.data_path=/data/gpqa_diamond.csv

Variant options (comma separated after the colon):
  task=NAME     any name in diffmas_jax.tasks.TASKS (default gsm8k)
  quick         4 items, short outputs, m = 4: a smoke test
  hier          hierarchical topology with independent math/science/code specialists
  shared_start  hierarchical segments all start at the same position
  paper         the paper's decoding: temperature 0.6, top-p 0.95
"""

from configs.common import base_config, quick_variant

# Per-family answer budgets that fit a 2-core CPU with the embedded 135M model;
# raise them (--config.eval.max_new_tokens=...) for real models.
BUDGETS = {"math": (256, 192), "mc": (192, 128), "code": (384, 192)}
STAND_INS = {
    "arc_challenge": "GPQA-Diamond (gated, not bundled)",
    "math500": "AIME 2024/2025 (not bundled)",
    "mbpp": "MBPP+ (evalplus, not bundled)",
    "humaneval": "HumanEval+ (evalplus, not bundled)",
}
OPTIONS = ("task", "quick", "hier", "shared_start", "paper")


def parse_variant(arg: str | None) -> dict:
  opts = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in OPTIONS:
      raise ValueError(f"unknown config option {key!r} in {arg!r}; available: {OPTIONS}")
    opts[key] = value or True
  return opts


def get_config(arg: str | None = None):
  from diffmas_jax.tasks import task_family

  opts = parse_variant(arg)
  cfg = base_config()
  cfg.eval.task = opts.get("task", "gsm8k")
  cfg.eval.max_new_tokens, cfg.agents.agent_max_new_tokens = BUDGETS[task_family(cfg.eval.task)]
  cfg.eval.stand_in_for = STAND_INS.get(cfg.eval.task, "")
  if "hier" in opts or "shared_start" in opts:
    cfg.agents.topology = "hierarchical"
    cfg.agents.roles = ("math_specialist", "science_specialist", "code_specialist")
  if "shared_start" in opts:
    cfg.agents.position_layout = "shared_start"
  if "paper" in opts:
    cfg.eval.temperature, cfg.eval.top_p = 0.6, 0.95
  if "quick" in opts:
    quick_variant(cfg)
  return cfg
