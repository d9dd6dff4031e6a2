"""Learning to communicate: the relay experiment (diffmas_jax/research/relay_run.py).

  python -m launch.relay --config=configs/relay.py            # full grid, offline, CPU
  python -m launch.relay --config=configs/relay.py:test       # tiny smoke run (minutes)

The Reader's prompt holds an ARC-Easy item and its answer key; the Solver's
holds the item only; trace_keep=latent_only makes the Reader's m latent
thoughts the only channel. Compares single (floor), text_mas, latent_mas
(untrained) and DiffMAS trained in final_only / shared / per_agent, plus an
m sweep, on the same held-out items (accuracy and answer NLL with 95% CIs).
"""

import ml_collections as mlc

from configs.common import base_config

OPTIONS = ("test",)


def get_config(arg: str | None = None):
  opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
  if opts - set(OPTIONS):
    raise ValueError(f"unknown configs/relay.py variant(s) {sorted(opts - set(OPTIONS))}; "
                     f"available: {OPTIONS}")
  cfg = base_config()
  cfg.model.remat = "none"
  cfg.relay = mlc.ConfigDict(dict(
      task="arc_easy", split="test",  # real 4-option items, packaged (offline)
      num_train=200, num_heldout=100, seed=0,
      max_prompt_tokens=160,  # items whose Solver prompt is longer are skipped before the split
      latent_steps=4,  # m of the mode comparison
      m_grid=(1, 4, 16),  # m sweep (latent_mas and DiffMAS in sweep_mode)
      modes=("final_only", "shared", "per_agent"),
      sweep_mode="shared",
      eval_batch=10,
      agent_max_new_tokens=24,  # text_mas: the Reader's note
      # Condition names to run (default: all). Lets several processes share the grid:
      # give each its own --workdir and `only`, then concatenate their results.jsonl.
      only=(),
  ))
  tc = cfg.train
  tc.steps = 30  # optimizer updates per trained condition (no accumulation)
  tc.batch_size = 4
  tc.grad_accum = 1
  tc.lr = 2e-3
  tc.warmup_ratio = 0.1
  tc.final_lr_ratio = 0.1
  cfg.lora.rank, cfg.lora.alpha = 8, 16.0
  if "test" in opts:
    cfg.relay.num_train, cfg.relay.num_heldout = 8, 4
    cfg.relay.m_grid = (1, 2)
    cfg.relay.latent_steps = 2
    cfg.relay.eval_batch = 4
    cfg.relay.agent_max_new_tokens = 4
    tc.steps, tc.batch_size = 2, 2
  return cfg
