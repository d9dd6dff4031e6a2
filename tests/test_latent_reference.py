"""Our latent_mas trace equals a plain transformers (PyTorch) loop, per layer and slot.

The reference is written independently and as plainly as possible: for each
agent, prefill its prompt with `past_key_values`, then m times realign the last
hidden state and feed it back as `inputs_embeds`; then prefill the solver
prompt and decode greedily. Ours runs a left-padded batch of two rows through
the same code latent_mas uses; every row must match its own reference run.
"""

import functools

import jax
import numpy as np
import pytest
import torch

from conftest import make_hf_model, to_ours
from diffmas_jax import agents, sampling, topology
from diffmas_jax import model as model_lib
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.latent_mas import PipelineBatch, pipeline_capacity, solver_prefill

A, M, N_NEW = 3, 4, 6
AGENT_LENS = [(7, 4), (5, 7), (6, 3)]  # [agent][row] true prompt lengths (rows differ)
SOLVER_LENS = (5, 3)


def torch_reference(hf, prompts, solver, lam=1e-5, cut=None):
  """One row: returns per-layer (k, v) [K, S, Dh] after the solver prompt, and greedy tokens.

  cut: None, or LatentMAS's `latent_only` / `sequential_info_only` as its code
  does them: after each agent the cache is cut to its last m slots / to what
  that agent added, and the next positions restart after the kept slots.
  """
  w_in = hf.get_input_embeddings().weight.detach().double()
  w_out = hf.get_output_embeddings().weight.detach().double()
  w_a = torch.linalg.solve(w_out.T @ w_out + lam * torch.eye(w_in.shape[1], dtype=torch.float64),
                           w_out.T @ w_in).float()
  target = w_in.norm(dim=1).mean().float()

  def realign(h):
    e = h @ w_a
    return e * (target / e.norm(dim=-1, keepdim=True).clamp_min(1e-6))

  past = None
  with torch.no_grad():
    for prompt in prompts:
      out = hf(input_ids=torch.tensor([prompt]), past_key_values=past, use_cache=True,
               output_hidden_states=True)
      past, h = out.past_key_values, out.hidden_states[-1][:, -1]
      for _ in range(M):
        out = hf(inputs_embeds=realign(h)[:, None], past_key_values=past, use_cache=True,
                 output_hidden_states=True)
        past, h = out.past_key_values, out.hidden_states[-1][:, -1]
      if cut:
        keep = M if cut == "latent_only" else len(prompt) + M
        for layer in past.layers:
          layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
    out = hf(input_ids=torch.tensor([solver]), past_key_values=past, use_cache=True)
    kv = [(layer.keys[0].numpy().copy(), layer.values[0].numpy().copy())
          for layer in out.past_key_values.layers]
    tokens = []
    for _ in range(N_NEW):
      nxt = out.logits[:, -1].argmax(-1)
      tokens.append(int(nxt[0]))
      out = hf(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
  return kv, tokens


def _left_pad(rows, width):
  tokens = np.zeros((len(rows), width), np.int32)
  valid = np.zeros((len(rows), width), bool)
  for r, row in enumerate(rows):
    tokens[r, width - len(row):], valid[r, width - len(row):] = row, True
  return tokens, valid


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def ours(weights, cfg, cache, batch, realigner, *, spec):
  out = solver_prefill(weights, cfg, cache, batch, realigner, spec)
  last = model_lib.lm_head(weights, out.hidden[:, -1:])[:, 0]
  gen = sampling.decode(weights, cfg, out.cache, last, jax.random.key(0),
                        sampling.SamplingConfig(max_new_tokens=N_NEW))
  return out.cache, gen.tokens


def test_latent_trace_and_solver_match_transformers():
  hf = make_hf_model("qwen3", seed=11)
  cfg, weights = to_ours(hf)
  rng = np.random.RandomState(0)
  prompts = [[rng.randint(3, cfg.vocab_size, n).tolist() for n in lens] for lens in AGENT_LENS]
  solver = [rng.randint(3, cfg.vocab_size, n).tolist() for n in SOLVER_LENS]
  width = max(max(lens) for lens in AGENT_LENS)
  agent = [_left_pad(p, width) for p in prompts]
  batch = PipelineBatch(np.stack([t for t, _ in agent]), np.stack([v for _, v in agent]),
                        *_left_pad(solver, max(SOLVER_LENS)))
  spec = topology.TraceSpec((M,) * A)
  cache = KVCache.init(cfg, 2, pipeline_capacity(batch, spec, N_NEW))
  cache, tokens = ours(weights, cfg, cache, batch.as_jax(), agents.make_realigner(weights, 1e-5),
                       spec=spec)
  end = pipeline_capacity(batch, spec)  # trace + solver prompt
  for r in range(2):
    ref_kv, ref_tokens = torch_reference(hf, [p[r] for p in prompts], solver[r])
    slots = np.flatnonzero(np.asarray(cache.pos[r, :end]) >= 0)
    assert len(slots) == sum(lens[r] + M for lens in AGENT_LENS) + SOLVER_LENS[r]
    np.testing.assert_array_equal(np.asarray(cache.pos[r, slots]), np.arange(len(slots)))
    for layer, (k_ref, v_ref) in enumerate(ref_kv):
      np.testing.assert_allclose(np.asarray(cache.k[layer, r][:, slots]), k_ref, atol=1e-4, rtol=0)
      np.testing.assert_allclose(np.asarray(cache.v[layer, r][:, slots]), v_ref, atol=1e-4, rtol=0)
    assert np.asarray(tokens[r]).tolist() == ref_tokens


@pytest.mark.parametrize("keep", ["latent_only", "own_segment"])
def test_cut_reading_matches_latentmas_truncated_cache(keep):
  """trace_cut="cut": the solver sees what LatentMAS's truncated cache holds, at its positions."""
  hf = make_hf_model("qwen3", seed=12)
  cfg, weights = to_ours(hf)
  rng = np.random.RandomState(1)
  prompts = [[rng.randint(3, cfg.vocab_size, n).tolist() for n in lens] for lens in AGENT_LENS]
  solver = [rng.randint(3, cfg.vocab_size, n).tolist() for n in SOLVER_LENS]
  width = max(max(lens) for lens in AGENT_LENS)
  agent = [_left_pad(p, width) for p in prompts]
  batch = PipelineBatch(np.stack([t for t, _ in agent]), np.stack([v for _, v in agent]),
                        *_left_pad(solver, max(SOLVER_LENS)))
  spec = topology.TraceSpec((M,) * A, trace_keep=keep, trace_cut="cut")
  cache = KVCache.init(cfg, 2, pipeline_capacity(batch, spec, N_NEW))
  cache, tokens = ours(weights, cfg, cache, batch.as_jax(), agents.make_realigner(weights, 1e-5),
                       spec=spec)
  end = pipeline_capacity(batch, spec)
  for r in range(2):
    ref_kv, ref_tokens = torch_reference(hf, [p[r] for p in prompts], solver[r], cut=keep)
    slots = np.flatnonzero(np.asarray(cache.pos[r, :end]) >= 0)
    kept = M if keep == "latent_only" else AGENT_LENS[-1][r] + M
    assert len(slots) == kept + SOLVER_LENS[r]
    np.testing.assert_array_equal(np.asarray(cache.pos[r, slots]), np.arange(len(slots)))
    for layer, (k_ref, v_ref) in enumerate(ref_kv):
      np.testing.assert_allclose(np.asarray(cache.k[layer, r][:, slots]), k_ref, atol=1e-4, rtol=0)
      np.testing.assert_allclose(np.asarray(cache.v[layer, r][:, slots]), v_ref, atol=1e-4, rtol=0)
    assert np.asarray(tokens[r]).tolist() == ref_tokens

