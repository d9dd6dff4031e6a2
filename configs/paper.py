"""The paper's training settings (SPEC section 2), shared by gpqa/aime/humaneval/openbookqa.

`paper_config` builds the full-size setting (Qwen3-8B from a local path or hub
id, r 8 / alpha 16, AdamW lr 5e-5 cosine, accumulation 64, m = 10, the paper's
sampling). `quickstart_variant` shrinks any of them to a job that runs offline
on the embedded SmolLM2-135M-Instruct within ~15 minutes on a 2-core CPU.
"""

from __future__ import annotations

from configs import ablations
from configs.common import base_config

PAPER_MODEL = "Qwen/Qwen3-8B"  # or a local HF directory: --config.model.source=/models/Qwen3-8B
QUICKSTART_OPTIONS = ("quickstart",)


def paper_config(*, data: str, num_examples: int, epochs: float, eval_task: str,
                 max_new_tokens: int = 8192):
  cfg = base_config()
  cfg.model.source = PAPER_MODEL
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = "full"  # per-layer remat: memory stays bounded as the trace grows
  cfg.train.data = data
  cfg.train.num_examples = num_examples
  cfg.train.epochs = epochs
  cfg.train.lr = 5e-5
  cfg.train.grad_accum = 64
  cfg.train.batch_size = 1
  cfg.train.max_prompt_tokens = 512
  cfg.train.max_target_tokens = 1024
  cfg.lora.rank, cfg.lora.alpha = 8, 16.0
  cfg.agents.latent_steps = 10
  cfg.eval.task = eval_task
  cfg.eval.methods = ("single", "text_mas", "latent_mas", "diffmas")
  cfg.eval.temperature, cfg.eval.top_p = 0.6, 0.95
  cfg.eval.max_new_tokens = max_new_tokens
  cfg.agents.agent_max_new_tokens = 2048
  cfg.checkpoint.every_updates = 1
  return cfg


def quickstart_variant(cfg, *, eval_task: str, stand_in_for: str, eval_limit: int = 20,
                       max_new_tokens: int = 96, num_examples: int = 32):
  """The offline CPU job: embedded model, real data, small budgets."""
  cfg.model.source = "embedded:smollm2-135m-instruct"
  cfg.model.dtype = "float32"
  # A 135M model's activations fit easily in RAM: recomputing them would only cost
  # time (python -m bench.bench_train compares the remat settings).
  cfg.model.remat = "none"
  cfg.train.remat_stages = False
  cfg.train.num_examples = num_examples
  cfg.train.epochs = 1.0
  cfg.train.grad_accum = 4
  cfg.train.lr = 5e-4  # few updates: a larger step than the paper's 5e-5 so the adapter moves
  cfg.train.warmup_ratio = 0.0
  cfg.train.probe_examples = 4  # one epoch of new examples per update: loss alone is noisy
  cfg.train.max_prompt_tokens = 192
  cfg.train.max_target_tokens = 192
  cfg.agents.latent_steps = 4
  cfg.eval.task = eval_task
  cfg.eval.data_path = ""
  cfg.eval.stand_in_for = stand_in_for
  cfg.eval.limit = eval_limit
  cfg.eval.temperature = 0.0
  cfg.eval.max_new_tokens = max_new_tokens
  cfg.agents.agent_max_new_tokens = 64
  cfg.eval.batch_size = 10
  return cfg


def parse_options(arg: str | None, allowed=QUICKSTART_OPTIONS) -> set[str]:
  """Variant names after the colon; the ablations (configs/ablations.py) are always allowed."""
  opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = {o for o in opts if o not in allowed and not ablations.is_option(o)}
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; available: {allowed} + "
                     f"{ablations.OPTIONS} + m<N> (latent steps)")
  return opts
