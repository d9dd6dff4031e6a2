"""Communication methods with one interface: `run(ctx, records, seed) -> [MethodOutput]`.

single: one chain-of-thought prompt. text_mas: the roles decode text for each
other. latent_mas: the roles share one KV trace with latent thoughts.

Adapters: baselines run on the frozen model. A name ending in "+lora" runs the
base method with the trained adapters (`ctx.lora`); "diffmas" is
"latent_mas+lora" (DiffMAS = LatentMAS + LoRA trained through the trace);
"textmas_sft" is "text_mas+lora" (the TextMAS+SFT ablation: a solver adapter on
fixed upstream text); "c2c" runs the trained C2C cache fuser (methods/c2c.py).
"""

from __future__ import annotations

from typing import Mapping

from diffmas_jax.methods import c2c, latent_mas, single, text_mas
from diffmas_jax.methods.base import Method, MethodOutput, RunContext, encode_chats
from diffmas_jax.methods.latent_mas import PipelineBatch, encode_pipeline, teacher_forced_logits

METHODS: dict[str, Method] = {"single": single.run, "text_mas": text_mas.run,
                              "latent_mas": latent_mas.run, "c2c": c2c.run}
ALIASES = {"diffmas": "latent_mas+lora", "textmas_sft": "text_mas+lora", "c2c": "c2c+lora"}
LORA_SUFFIX = "+lora"


def resolve(name: str, extra: Mapping[str, Method] | None = None) -> tuple[Method, bool]:
  """Method name -> (run function, whether it gets the trained adapters).

  `extra` maps further names to run functions (e.g. methods defined by the
  training code); they always receive the adapters, if any were given.
  """
  if extra and name in extra:
    return extra[name], True
  full = ALIASES.get(name, name)
  uses_lora = full.endswith(LORA_SUFFIX)
  base = full[:-len(LORA_SUFFIX)] if uses_lora else full
  if base not in METHODS:
    known = sorted(METHODS) + sorted(ALIASES) + [f"{m}{LORA_SUFFIX}" for m in sorted(METHODS)]
    raise ValueError(f"unknown method {name!r}; available: {known}"
                     + (f" and {sorted(extra)}" if extra else ""))
  return METHODS[base], uses_lora


def get_method(name: str) -> Method:
  return resolve(name)[0]


__all__ = ["METHODS", "ALIASES", "resolve", "get_method", "Method", "MethodOutput", "RunContext",
           "PipelineBatch", "encode_pipeline", "encode_chats", "teacher_forced_logits"]
