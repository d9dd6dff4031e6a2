"""Gradient probes through the trace vs agent depth (diffmas_jax/research/probes.py).

  python -m launch.probe --config=configs/probe.py              # embedded SmolLM2-135M + tiny random
  python -m launch.probe --config=configs/probe.py:tiny         # tiny random model only (fast)
  python -m launch.probe --config=configs/probe.py:test         # smoke run

For K = 2..8 agents and trace_keep "all" (appended trace, Eq. 6) vs
"own_segment" (overwriting carrier, Eq. 5): per upstream block the solver
loss's gradient norm (K/V per layer, latent input embeddings), per-agent
adapter gradient norms (fresh shared adapters: the first update's gradient),
JVP sensitivities, per-hop decay ratios. Items: MATH train problems with their
reference solutions (the DiffMAS training data), target cut to
max_target_tokens.
"""

import ml_collections as mlc

from configs.common import base_config

OPTIONS = ("tiny", "test")


def get_config(arg: str | None = None):
  opts = {a.strip() for a in (arg or "").split(",") if a.strip()}
  if opts - set(OPTIONS):
    raise ValueError(f"unknown configs/probe.py variant(s) {sorted(opts - set(OPTIONS))}; "
                     f"available: {OPTIONS}")
  cfg = base_config()
  cfg.probe = mlc.ConfigDict(dict(
      models=("embedded", "tiny"),  # "embedded" = model.source; "tiny" = a random 4-layer
                                    # Llama with the same tokenizer (same items)
      depths=(2, 3, 4, 5, 6, 7, 8),  # K agents, solver included
      modes=("all", "own_segment"),
      latent_steps=4,
      grad_mode="shared",  # adapters at init (B = 0): the first update's gradient
      num_examples=16,  # MATH train problems drawn (data_seed), the first batch_size that fit
      batch_size=1,
      max_prompt_tokens=160,
      max_target_tokens=32,
      jvp_agents=(2, 4, 8),  # K values that also get the JVP sensitivity
      tiny_layers=4, tiny_hidden=64, tiny_std=0.02,
      seed=0,
  ))
  if "tiny" in opts:
    cfg.probe.models = ("tiny",)
    cfg.probe.jvp_agents = tuple(range(2, 9))
  if "test" in opts:
    cfg.probe.models = ("tiny",)
    cfg.probe.depths = (2, 3)
    cfg.probe.jvp_agents = (3,)
    cfg.probe.max_target_tokens = 8
  return cfg
