"""C2C at evaluation: the solver decodes on its prompt cache fused with the trace-conditioned one.

`ctx.lora` holds the trained fuser (diffmas_jax/c2c.py; the harness hands a
method's trained parameters over in that slot). Gates are hard. The upstream
trace is built without adapters, as in training.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from diffmas_jax import c2c
from diffmas_jax.methods.base import MethodOutput, RunContext, split_generation
from diffmas_jax.methods.latent_mas import encode_pipeline
from diffmas_jax.tasks import Record


def run(ctx: RunContext, records: Sequence[Record], seed: int = 0) -> list[MethodOutput]:
  if not isinstance(ctx.lora, dict) or set(ctx.lora) != {"k", "v"}:
    raise ValueError("method 'c2c' needs a trained C2C fuser (c2c.load_fuser(path)) as its "
                     "trained parameters; train one with "
                     "`python -m launch.train --config=configs/gpqa.py:quickstart,c2c`")
  m, spec = ctx.model, ctx.spec
  batch = encode_pipeline(m.tokenizer, records, ctx.roles, solver_text=ctx.solver_text,
                          bucket=ctx.bucket, template_kwargs=ctx.template_kwargs)
  sc = ctx.sampling_config(ctx.max_new_tokens)
  cache = ctx.new_cache(len(records), c2c.capacity(batch, spec))
  gen = c2c.fuse_and_decode(ctx.lora, m.weights, m.cfg, cache, ctx.put_pipeline(batch), ctx.realigner,
                            jax.random.key(seed), sc=sc, spec=spec)
  per_agent = (batch.agent_valid.sum(axis=2) + np.asarray(spec.steps)[:, None]).T
  return [MethodOutput(text=r["text"], output_tokens=r["tokens"], answer_tokens=r["tokens"],
                       answer_nll=r["nll"], mean_token_entropy=r["entropy"],
                       trace_len_per_agent=per_agent[i].tolist())
          for i, r in enumerate(split_generation(gen, m.tokenizer, sc.stop_ids))]
