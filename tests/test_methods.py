"""Methods: prompts, batched == unbatched (greedy), m = 0 keeps the trace, adapters,
teacher forcing."""

import zlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from diffmas_jax import prompts, topology
from diffmas_jax.config import tiny_config
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.loading import LoadedModel
from diffmas_jax.methods import RunContext, get_method, latent_mas, resolve
from diffmas_jax.model import LoRA
from diffmas_jax.params import init_weights
from diffmas_jax.tasks import Record

VOCAB = 128


class FakeTokenizer:
  """Word-level stand-in with the interface of diffmas_jax.tokenizer.Tokenizer.

  Words hash to ids 3..VOCAB-1; ids 1..STOPS-1 are stop tokens, so a random
  model's greedy answers end at different lengths per row.
  """

  pad_id, eos_id, stops = 0, 1, 20
  chat_template = "{{ messages }} {% if enable_thinking %}{% endif %}"

  @property
  def stop_ids(self):
    return tuple(range(1, self.stops))

  def encode(self, text, add_bos=False):
    return [self._id(w) for w in text.split()]

  @staticmethod
  def _id(word):  # "w57" -> 57, so decode/encode round-trips generated text
    if word[:1] == "w" and word[1:].isdigit() and 3 <= int(word[1:]) < VOCAB:
      return int(word[1:])
    return 3 + zlib.crc32(word.encode()) % (VOCAB - 3)

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(f"w{i}" for i in ids if i >= 3)

  def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
    text = " ".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in messages)
    return text + (" <assistant>" if add_generation_prompt else "")

  def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
    return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def tiny_model(family="qwen3", seed=0) -> LoadedModel:
  cfg = tiny_config(family, vocab_size=VOCAB)
  # std 0.3 keeps greedy choices far from ties, so batched == unbatched is exact.
  return LoadedModel(cfg, init_weights(cfg, jax.random.key(seed), std=0.3), FakeTokenizer(), "tiny")


def tiny_context(**kw) -> RunContext:
  roles = tuple(prompts.AgentRole(name, latent_steps=2) for name in ("planner", "critic"))
  # One bucket wider than every prompt: one compile per batch size (rows still differ in padding).
  base = dict(model=tiny_model(), roles=roles, max_new_tokens=8, agent_max_new_tokens=4, bucket=128)
  return RunContext(**{**base, **kw})


RECORDS = [Record(id=str(i), question=" ".join(f"q{j}" for j in range(n)), family=fam, gold=gold,
                  choices=choices)
           for i, (n, fam, gold, choices) in enumerate([
               (3, "math", "1", ()), (40, "math", "2", ()), (12, "mc", "B", ("x y", "z", "w"))])]


@pytest.fixture(scope="module")
def ctx():
  return tiny_context()


def _lora(key, scale=0.5):
  cfg = tiny_config("qwen3", vocab_size=VOCAB)
  ka, kb = jax.random.split(key)
  return LoRA(a={"q": jax.random.normal(ka, (cfg.num_layers, cfg.hidden_size, 2))},
              b={"q": jax.random.normal(kb, (cfg.num_layers, 2, cfg.num_heads, cfg.head_dim))},
              scale=scale)


# -- prompts ---------------------------------------------------------------------------------

def test_prompts_per_family_and_roles_from_config():
  math, mc = RECORDS[0], RECORDS[2]
  assert prompts.role_text("planner", "math") != prompts.role_text("planner", "code")
  assert prompts.role_text("refiner", "code") == prompts.role_text("refiner", "default")
  solver = prompts.solver_messages(mc)
  assert solver[0]["role"] == "system" and solver[-1]["role"] == "user"
  assert "B. z" in solver[-1]["content"] and "\\boxed{" in solver[-1]["content"]
  assert "\\boxed{}" in prompts.single_messages(math)[-1]["content"]
  text = prompts.upstream_messages(prompts.AgentRole("critic"), math, [("planner", "do x")])
  assert "[planner]\ndo x" in text[-1]["content"]

  cfg = mlc.ConfigDict(dict(roles=("planner", "checker"), role_text={"checker": "Check it."},
                            role_latent_steps={"planner": 0}, latent_steps=7))
  roles = prompts.roles_from_config(cfg)
  assert [(r.name, r.latent_steps) for r in roles] == [("planner", 0), ("checker", 7)]
  assert roles[1].instruction("math") == "Check it."
  with pytest.raises(ValueError, match="role_text"):  # a new role needs its text
    prompts.roles_from_config(mlc.ConfigDict(dict(roles="planner,judge", latent_steps=1)))
  with pytest.raises(ValueError, match="not in agents.roles"):
    prompts.roles_from_config(mlc.ConfigDict(dict(roles=("planner",), latent_steps=1,
                                                  role_latent_steps={"critic": 3})))


def test_enable_thinking_reaches_only_templates_that_use_it():
  class Plain:
    chat_template = "{{ messages }}"

  assert prompts.template_kwargs(FakeTokenizer(), False) == {"enable_thinking": False}
  assert prompts.template_kwargs(Plain(), False) == {}
  assert prompts.template_kwargs(FakeTokenizer(), None) == {}


def test_method_registry():
  assert resolve("latent_mas") == (latent_mas.run, False)
  assert resolve("diffmas") == (latent_mas.run, True)
  assert resolve("text_mas+lora")[1]
  assert resolve("c2c")[1] and resolve("textmas_sft") == (resolve("text_mas")[0], True)
  with pytest.raises(ValueError, match="available"):
    resolve("telepathy")


# -- batching --------------------------------------------------------------------------------

def test_encode_pipeline_shapes_and_padding(ctx):
  tok = ctx.model.tokenizer
  batch = latent_mas.encode_pipeline(tok, RECORDS, ctx.roles, bucket=32,
                                     targets=["a b", "c d e f g", "h i"])
  a, b, t = batch.agent_tokens.shape
  assert (a, b) == (2, 3) and t % 32 == 0 and batch.solver_tokens.shape[1] % 32 == 0
  for j, role in enumerate(ctx.roles):  # left padded: each row's prompt ends in the last column
    for r, rec in enumerate(RECORDS):
      ids = tok.encode_chat(prompts.upstream_messages(role, rec))
      assert batch.agent_tokens[j, r, t - len(ids):].tolist() == ids
      assert batch.agent_valid[j, r].sum() == len(ids) and batch.agent_valid[j, r, -1]
  assert batch.target_tokens[1, :6].tolist() == tok.encode("c d e f g") + [tok.eos_id]
  assert batch.target_valid.sum(1).tolist() == [3, 6, 3]  # right padded, eos appended


@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas"])
def test_batched_equals_unbatched(ctx, name):
  run = get_method(name)
  batched = run(ctx, RECORDS)
  if name != "single":  # (single's rows all run to the budget with this model)
    assert len({o.answer_tokens for o in batched}) > 1  # rows stop at different steps
  for rec, out in zip(RECORDS, batched):
    [alone] = run(ctx, [rec])
    assert alone.text == out.text and alone.output_tokens == out.output_tokens
    assert alone.trace_len_per_agent == out.trace_len_per_agent
    assert alone.agent_texts == out.agent_texts
    assert abs(alone.answer_nll - out.answer_nll) < 1e-3


# -- the trace reaches the solver ------------------------------------------------------------

solver_prefill = jax.jit(latent_mas.solver_prefill, static_argnums=(1, 5))
teacher_forced_logits = jax.jit(latent_mas.teacher_forced_logits, static_argnums=(1, 5))


def _solver_state(ctx, records, lora=None):
  """Solver's last hidden state [B, D] on top of the trace, its cache, and the batch."""
  m = ctx.model
  batch = latent_mas.encode_pipeline(m.tokenizer, records, ctx.roles, bucket=ctx.bucket)
  cache = KVCache.init(m.cfg, len(records), latent_mas.pipeline_capacity(batch, ctx.spec))
  out = solver_prefill(m.weights, m.cfg, cache, batch.as_jax(), ctx.realigner, ctx.spec, lora)
  return np.asarray(out.hidden[:, -1]), out.cache, batch


def test_zero_latent_steps_still_hand_the_prompt_trace_to_the_solver(ctx):
  m0 = ctx.replace(roles=tuple(prompts.AgentRole(r.name, latent_steps=0) for r in ctx.roles))
  h, cache, batch = _solver_state(m0, RECORDS[:1])
  visible = int(jnp.sum(cache.pos >= 0))
  assert visible == batch.agent_valid.sum() + batch.solver_valid.sum()
  out = latent_mas.run(m0, RECORDS[:1])[0]
  assert out.trace_len_per_agent == batch.agent_valid[:, 0].sum(-1).tolist()
  # The solver's state depends on the agents' prompts: change one word of the planner's role.
  other = m0.replace(roles=(prompts.AgentRole("planner", "Plan carefully.", 0), m0.roles[1]))
  assert np.abs(_solver_state(other, RECORDS[:1])[0] - h).max() > 1e-3


def test_adapters_shared_per_role_and_diffmas(ctx):
  plain = _solver_state(ctx, RECORDS[:2])[0]
  shared = _lora(jax.random.key(1))
  zero = LoRA(shared.a, jax.tree.map(jnp.zeros_like, shared.b), shared.scale)  # B = 0: a no-op
  np.testing.assert_allclose(_solver_state(ctx, RECORDS[:2], zero)[0], plain, atol=1e-5)
  assert np.abs(_solver_state(ctx, RECORDS[:2], shared)[0] - plain).max() > 1e-3
  # Solver-only adapter: the trace is the frozen model's; only the solver changes.
  solver_only = topology.AgentLoRA(upstream=None, solver=shared)
  h_a, cache_a, batch = _solver_state(ctx, RECORDS[:2], solver_only)
  _, cache_b, _ = _solver_state(ctx, RECORDS[:2])
  trace = ctx.spec.length(batch.prompt_width)
  np.testing.assert_array_equal(np.asarray(cache_a.k[..., :trace, :]),
                                np.asarray(cache_b.k[..., :trace, :]))
  assert np.abs(h_a - plain).max() > 1e-3
  # Per-role adapters stacked on [A], run end to end through latent_mas.
  stacked = jax.tree.map(lambda x: jnp.stack([x, -x]), shared)
  per_role = ctx.replace(lora=topology.AgentLoRA(upstream=stacked, solver=shared))
  out = latent_mas.run(per_role, RECORDS[:1])
  assert out[0].text != latent_mas.run(ctx, RECORDS[:1])[0].text


def test_teacher_forcing_reproduces_greedy_decoding(ctx):
  """Feeding the greedy answer back as targets: argmax of the teacher-forced logits is it."""
  m, recs = ctx.model, RECORDS[1:2]  # batch 1: reuses the compiled pipeline
  outs = latent_mas.run(ctx, recs)
  batch = latent_mas.encode_pipeline(m.tokenizer, recs, ctx.roles, bucket=ctx.bucket,
                                     targets=[o.text for o in outs])
  cache = KVCache.init(m.cfg, len(recs), latent_mas.trace_capacity(batch, ctx.spec))
  logits = teacher_forced_logits(m.weights, m.cfg, cache, batch.as_jax(),
                                            ctx.realigner, ctx.spec)
  pred = np.asarray(jnp.argmax(logits, -1))
  for r, o in enumerate(outs):
    n = int(batch.target_valid[r].sum()) - 1  # the answer's tokens (eos appended after them)
    assert n == len(o.text.split()) > 0
    assert pred[r, :n].tolist() == batch.target_tokens[r, :n].tolist()
