"""The embedded SmolLM2-135M-Instruct learns through the trace on real MATH data."""

import jax
import ml_collections as mlc
import numpy as np

from diffmas_jax import agents, data, lora as lora_lib, topology, train
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.loading import load_model
from diffmas_jax.methods.latent_mas import trace_capacity
from diffmas_jax.prompts import AgentRole
from diffmas_jax.tasks.training_data import math_train


def test_embedded_model_loss_on_16_math_items_falls_over_20_steps():
  m = load_model()
  roles = [AgentRole("planner", latent_steps=2)]
  spec = topology.TraceSpec((2,))
  # 16 MATH train problems whose prompts fit 128 tokens; targets cut to 48 tokens.
  enc = data.encode_examples(m.tokenizer, math_train(60, seed=1), roles, max_prompt_tokens=128,
                             max_target_tokens=48)
  keep = np.arange(16)
  assert len(enc) >= 16
  everything = enc.take(keep)
  realigner = agents.make_realigner(m.weights)

  @jax.jit
  def mean_loss(params, batch, cache):
    return train.loss_fn(params, m.weights, m.cfg, cache, batch, realigner, spec, "shared")[0]

  tc = mlc.ConfigDict(dict(lr=1e-3, warmup_ratio=0.0, final_lr_ratio=1.0, max_grad_norm=1.0,
                           b1=0.9, b2=0.999, weight_decay=0.0, grad_accum=1))
  opt, sched = train.make_optimizer(tc, 20)
  params = train.init_params(m.cfg, lora_lib.LoraConfig(rank=8, alpha=16.0), "shared", 1,
                             jax.random.key(0))
  state = train.init_state(params, opt, 0)
  step = train.make_train_step(opt, sched, train.StepConfig(m.cfg, spec, "shared", remat=False))
  big_cache = lambda: KVCache.init(m.cfg, 16, trace_capacity(everything, spec))
  before = float(mean_loss(state.params, everything.as_jax(), big_cache()))
  one = enc.take(keep[:1])
  capacity = trace_capacity(one, spec)
  for i in range(20):
    batch = enc.take(keep[data.micro_batch_indices(16, 1, i, seed=0)])
    state, _ = step(state, m.weights, KVCache.init(m.cfg, 1, capacity), batch.as_jax(), realigner)
  after = float(mean_loss(state.params, everything.as_jax(), big_cache()))
  assert np.isfinite(before) and after < before - 0.05, (before, after)
