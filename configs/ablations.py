"""The paper's ablations and the C2C baseline as config variants of any task config.

  python -m launch.train --config=configs/gpqa.py:quickstart,textmas_sft
  python -m launch.train --config=configs/gpqa.py:quickstart,stitchmas
  python -m launch.train --config=configs/gpqa.py:quickstart,c2c
  python -m launch.train --config=configs/gpqa.py:quickstart,m40     # one point of the m-sweep
  python -m launch.sweep --config=configs/gpqa.py:quickstart --values=0,4,10,40   # the m-sweep

textmas_sft  TextMAS + the same SFT: the upstream agents decode text once with the
             frozen model (fixed), the solver's LoRA learns on top of those notes.
stitchmas    each agent builds its segment from an empty trace, the segments are
             concatenated for the solver, and the adapters train through that
             stitched trace (the hierarchical topology, in training and evaluation).
c2c          the Cache-to-Cache fuser (diffmas_jax/c2c.py): only the fuser trains.
m<N>         N latent steps per upstream agent.

Each variant evaluates only the method it trains (the untouched baselines are the
task config's own run), so a quickstart variant takes minutes.
"""

from __future__ import annotations

import re

OPTIONS = ("textmas_sft", "stitchmas", "c2c")
_STEPS = re.compile(r"^m(\d+)$")


def is_option(name: str) -> bool:
  return name in OPTIONS or bool(_STEPS.match(name))


def apply(cfg, opts: set[str]):
  """Applies every ablation option in `opts` (others are ignored) to a task config."""
  trained = [o for o in OPTIONS if o in opts]
  if len(trained) > 1:
    raise ValueError(f"config variants {trained} are exclusive; pick one")
  for o in opts:
    match = _STEPS.match(o)
    if match:
      cfg.agents.latent_steps = int(match.group(1))
      cfg.eval.methods = ("diffmas",)
      cfg.workdir = cfg.workdir or f"runs/train_{cfg.train.data}_{o}"
  if "textmas_sft" in opts:
    cfg.train.method = "textmas_sft"
    cfg.train.grad_mode = "final_only"  # only the solver carries an adapter
    # The solver's prompt holds the upstream notes: room for three of them.
    cfg.train.max_prompt_tokens = max(cfg.train.max_prompt_tokens,
                                      cfg.train.max_prompt_tokens
                                      + 3 * (cfg.agents.agent_max_new_tokens + 16))
    cfg.eval.methods = ("textmas_sft",)
  if "stitchmas" in opts:
    cfg.agents.topology = "hierarchical"
    cfg.agents.position_layout = "continue"
    cfg.eval.methods = ("diffmas",)
  if "c2c" in opts:
    cfg.train.method = "c2c"
    cfg.eval.methods = ("c2c",)
  if trained:
    cfg.workdir = cfg.workdir or f"runs/train_{cfg.train.data}_{trained[0]}"
  return cfg
