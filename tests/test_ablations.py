"""Ablations and the C2C baseline: each trains on a tiny model; C2C's fuser and its export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax import ablations, c2c, data, layers, topology, train
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.prompts import AgentRole
from tests.test_methods import FakeTokenizer
from tests.test_train import CFG, LORA_CFG, REALIGNER, WEIGHTS, _batch, _examples, _train_cfg

FC = c2c.FuserConfig(hidden=32, gate_init=3.0, tau_start=1.0, tau_end=0.1, anneal_steps=40)


def _random_fuser(gate):
  """A fuser whose projection is non-zero, so an open gate changes the cache."""
  f = c2c.init_fuser(CFG, FC, jax.random.key(5))
  for i, half in enumerate(("k", "v")):
    w = f[half]["w_proj"]
    f[half]["w_proj"] = 0.5 * jax.random.normal(jax.random.key(10 + i), w.shape)
    f[half]["gate"] = jnp.full_like(f[half]["gate"], gate)
  return f


def _c2c_logits(fuser, batch, spec, key=None):
  cache = KVCache.init(CFG, batch.solver_tokens.shape[0], c2c.capacity(batch, spec))
  return c2c.target_logits(fuser, WEIGHTS, CFG, cache, batch.as_jax(), REALIGNER, spec, key)


def test_c2c_with_a_closed_gate_equals_the_solver_without_trace():
  enc, spec = _batch(num_agents=2, steps=2, n=2)
  batch = enc.take(np.arange(2))
  alone = ablations.solver_only_logits(None, WEIGHTS, CFG, batch.as_jax())
  closed = _c2c_logits(_random_fuser(gate=-3.0), batch, spec)  # hard gate: 0
  np.testing.assert_allclose(closed, alone, atol=2e-5, rtol=1e-5)
  opened = _c2c_logits(_random_fuser(gate=3.0), batch, spec)
  assert float(jnp.max(jnp.abs(opened - alone))) > 1e-2
  # A fresh fuser (zero projection) starts at the solver alone, gates open or not.
  fresh = _c2c_logits(c2c.init_fuser(CFG, FC, jax.random.key(0)), batch, spec)
  np.testing.assert_allclose(fresh, alone, atol=2e-5, rtol=1e-5)


def test_sharer_keys_are_rotated_into_the_receivers_positions():
  k = jax.random.normal(jax.random.key(0), (2, 5, 3, CFG.head_dim))  # [B, T, K, Dh]
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  offset = jnp.array([7, 19])
  inv = layers.rope_inv_freq(CFG)
  shifted = layers.apply_rope(k, pos + offset[:, None], inv)
  back = c2c._unrotate(jnp.swapaxes(shifted, 1, 2)[None], offset, CFG)[0]  # [B, K, T, Dh]
  np.testing.assert_allclose(back, jnp.swapaxes(layers.apply_rope(k, pos, inv), 1, 2),
                             atol=1e-5)


def test_gate_is_gumbel_in_training_and_hard_at_evaluation():
  logits = jnp.array([-2.0, 0.5, 3.0])
  np.testing.assert_array_equal(c2c.gate_values(logits, None, 1.0), [0.0, 1.0, 1.0])
  soft = c2c.gate_values(logits, jax.random.key(0), 1.0)
  assert bool(jnp.all((soft > 0) & (soft < 1)))
  cold = c2c.gate_values(logits, jax.random.key(0), 1e-4)  # annealed: nearly binary
  assert bool(jnp.all((cold < 1e-3) | (cold > 1 - 1e-3)))
  assert float(FC.tau(0)) == pytest.approx(1.0) and float(FC.tau(39)) == pytest.approx(0.1)


def _overfit(method, enc, spec, steps, lr, grad_mode="shared"):
  tc = _train_cfg(lr=lr)
  opt, sched = train.make_optimizer(tc, steps)
  fc = dataclasses.replace(FC, anneal_steps=steps)
  params = ablations.init_params(method, CFG, LORA_CFG, grad_mode, spec.num_agents,
                                 jax.random.key(0), fc)
  sc = train.StepConfig(CFG, spec, grad_mode, remat=False)
  if method != "diffmas":
    sc = dataclasses.replace(sc, objective=ablations.objective(method, sc, fc))
  step = train.make_train_step(opt, sched, sc)
  state = train.init_state(params, opt, 0)
  batch = enc.take(np.arange(4)).as_jax()
  capacity = ablations.capacity(method, batch, spec)
  losses = []
  for _ in range(steps):
    state, m = step(state, WEIGHTS, KVCache.init(CFG, 4, capacity), batch, REALIGNER)
    losses.append(float(m["loss"]))
  return state, losses


def test_c2c_fuser_overfits_four_examples_and_only_the_fuser_trains():
  enc, spec = _batch(num_agents=2, steps=2, n=4)
  state, losses = _overfit("c2c", enc, spec, 40, 3e-2)
  assert set(state.params) == {"k", "v"}  # the base weights are an argument, never trained
  # Judged at evaluation behaviour (hard gates, no Gumbel noise): from the solver alone
  # (a fresh fuser) to the trained fuser on the same 4 examples.
  batch = enc.take(np.arange(4))
  loss = lambda f: float(train.loss_and_metrics(_c2c_logits(f, batch, spec), batch.target_tokens,
                                                batch.target_valid)[0])
  before, after = loss(c2c.init_fuser(CFG, FC, jax.random.key(0))), loss(state.params)
  assert after < 0.3 * before, (before, after, losses[::8])


def test_textmas_sft_overfits_four_examples_on_fixed_notes():
  roles = [AgentRole("planner", latent_steps=0), AgentRole("critic", latent_steps=0)]
  examples = _examples(4)
  notes = [[("planner", f"w{5 + i} w{9 + i}"), ("critic", f"w{40 + i}")] for i in range(4)]
  enc = data.encode_examples(FakeTokenizer(), examples, roles, max_prompt_tokens=128,
                             max_target_tokens=8, solver_previous=notes)
  plain = data.encode_examples(FakeTokenizer(), examples, roles, max_prompt_tokens=128,
                               max_target_tokens=8)
  assert enc.solver_valid.sum() > plain.solver_valid.sum()  # the notes are in the prompt
  spec = topology.TraceSpec((0, 0))
  state, losses = _overfit("textmas_sft", enc, spec, 40, 3e-2, grad_mode="final_only")
  assert losses[-1] < 0.1 * losses[0], losses[::8]
  assert state.params.upstream is None  # only the solver's adapter exists


def test_stitchmas_trains_through_the_stitched_trace():
  enc, _ = _batch(num_agents=2, steps=2, n=4)
  spec = topology.TraceSpec((2, 2), topology="hierarchical")
  _, losses = _overfit("diffmas", enc, spec, 40, 3e-2)
  assert losses[-1] < 0.1 * losses[0], losses[::8]


@pytest.mark.parametrize("where", ["local", "gs"])
def test_fuser_export_round_trips_and_checks_shapes(where, tmp_path, request, monkeypatch):
  root = "gs://bucket/run" if where == "gs" else str(tmp_path)
  gcs = request.getfixturevalue("fake_gcs") if where == "gs" else None
  monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here
  fuser = _random_fuser(gate=2.0)
  path = c2c.save_fuser(f"{root}/c2c_fuser.safetensors", fuser, FC, base_model="tiny")
  assert path == f"{root}/c2c_fuser.safetensors" and not (tmp_path / "gs:").exists()
  if gcs is not None:
    assert (gcs / "bucket/run/c2c_fuser.safetensors").is_file()
  back = c2c.load_fuser(path, CFG)
  for a, b in zip(jax.tree.leaves(fuser), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  other = dataclasses.replace(CFG, num_layers=CFG.num_layers + 1)
  with pytest.raises(ValueError, match="layers"):
    c2c.load_fuser(path, other)
  with pytest.raises(FileNotFoundError, match="train one"):
    c2c.load_fuser(f"{root}/missing.safetensors")


def test_only_process_zero_writes_the_fuser(tmp_path, monkeypatch):
  from diffmas_jax import multihost
  waited = []
  monkeypatch.setattr(multihost, "is_main", lambda: False)
  monkeypatch.setattr(multihost, "barrier", waited.append)
  path = c2c.save_fuser(str(tmp_path / "f.safetensors"), _random_fuser(gate=2.0), FC)
  assert not (tmp_path / "f.safetensors").exists() and waited == ["c2c_fuser_saved"]
  assert path == str(tmp_path / "f.safetensors")


def test_textmas_notes_are_written_once_and_read_back_from_a_url(fake_gcs, monkeypatch):
  from types import SimpleNamespace

  from diffmas_jax.methods import RunContext, text_mas
  calls = []

  def decode(ctx, records, seed):  # the frozen model's TextMAS decode, stubbed
    calls.append(len(records))
    return [SimpleNamespace(agent_texts=[f"{r.id}: plan", f"{r.id}: critique"]) for r in records]

  ctx = SimpleNamespace(roles=[AgentRole("planner"), AgentRole("critic")],
                        replace=lambda **kw: ctx)
  monkeypatch.setattr(text_mas, "run", decode)
  monkeypatch.setattr(RunContext, "from_config", lambda *args: ctx)
  eval_cfg, path = SimpleNamespace(batch_size=2, seed=0), "gs://bucket/run/textmas_notes.jsonl"
  notes = ablations.textmas_notes(None, _examples(3), None, eval_cfg, path)
  assert calls == [2, 2] and (fake_gcs / "bucket/run/textmas_notes.jsonl").exists()
  assert notes[1] == [("planner", "1: plan"), ("critic", "1: critique")]
  assert ablations.textmas_notes(None, _examples(3), None, eval_cfg, path) == notes
  assert calls == [2, 2]  # read back, not decoded again
  ablations.textmas_notes(None, _examples(4), None, eval_cfg, path)  # one the file lacks
  assert calls == [2, 2, 2, 2]


def test_method_and_variant_errors_are_clear():
  with pytest.raises(ValueError, match="train.method"):
    ablations.check_method("c3c", "shared")
  with pytest.raises(ValueError, match="final_only"):
    ablations.check_method("textmas_sft", "shared")
  from configs import gpqa
  with pytest.raises(ValueError, match="exclusive"):
    gpqa.get_config("quickstart,c2c,stitchmas")
  with pytest.raises(ValueError, match="unknown config variant"):
    gpqa.get_config("quickstart,c3c")
  cfg = gpqa.get_config("quickstart,m40")
  assert cfg.agents.latent_steps == 40 and cfg.eval.methods == ("diffmas",)


def test_c2c_method_with_a_closed_gate_answers_like_the_solver_alone():
  from diffmas_jax import sampling
  from diffmas_jax.methods import c2c as c2c_method, encode_pipeline
  from tests.test_methods import RECORDS, tiny_context
  ctx = tiny_context()
  with pytest.raises(ValueError, match="fuser"):
    c2c_method.run(ctx, RECORDS)
  m = ctx.model
  fuser = c2c.init_fuser(m.cfg, FC, jax.random.key(5))
  for half in ("k", "v"):
    fuser[half]["w_proj"] = 0.5 * jax.random.normal(jax.random.key(1), fuser[half]["w_proj"].shape)
    fuser[half]["gate"] = jnp.full_like(fuser[half]["gate"], -1.0)
  outs = c2c_method.run(ctx.replace(lora=fuser), RECORDS)
  batch = encode_pipeline(m.tokenizer, RECORDS, ctx.roles, bucket=ctx.bucket)
  sc = ctx.sampling_config(ctx.max_new_tokens)
  gen = sampling.prefill_and_decode(m.weights, m.cfg, jnp.asarray(batch.solver_tokens),
                                    jnp.asarray(batch.solver_valid), jax.random.key(0), sc,
                                    batch.solver_tokens.shape[1] + sc.max_new_tokens)
  alone = [m.tokenizer.decode([t for t in row[:n] if t not in sc.stop_ids])
           for row, n in zip(np.asarray(gen.tokens).tolist(), np.asarray(gen.lengths))]
  assert [o.text for o in outs] == alone
