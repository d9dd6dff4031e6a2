"""Real-Qwen3 fidelity switches: realignment rows (LatentMAS resizes the embeddings to
len(tokenizer) first) and Qwen3 thinking mode from the config to the rendered prompt.
The trace-cut reading of latent_only / own_segment is checked against a truncated
transformers cache in test_latent_reference.py."""

import numpy as np
import pytest
import torch
import transformers

from configs.common import agents_config, eval_config
from diffmas_jax import agents
from diffmas_jax.loading import LoadedModel, load_model
from diffmas_jax.methods import RunContext, latent_mas
from diffmas_jax.tasks import Record
from tests.conftest import make_hf_model
from tests.test_loading import save_tiny_tokenizer
from tests.test_tokenizer import qwen_style_dir  # noqa: F401 (fixture)

TOKENIZER_SIZE = 100  # the model has 128 embedding rows: 28 padding rows, as on Qwen3


def _latentmas_realigner(hf, lam=1e-5):
  """W_a and target_norm the way LatentMAS builds them, in f64 (reference)."""
  w_in = hf.get_input_embeddings().weight.detach().double()
  w_out = hf.get_output_embeddings().weight.detach().double()
  gram = w_out.T @ w_out + lam * torch.eye(w_in.shape[1], dtype=torch.float64)
  return torch.linalg.solve(gram, w_out.T @ w_in).numpy(), float(w_in.norm(dim=1).mean())


@pytest.mark.parametrize("tie", [False, True])
def test_realign_rows_follow_latentmas_resize(tmp_path, tie):
  hf = make_hf_model("qwen3", seed=3, tie=tie)
  with torch.no_grad():  # padding rows far from the rest, so dropping them shows in target_norm
    hf.get_input_embeddings().weight[TOKENIZER_SIZE:] *= 5.0
    if not tie:
      hf.get_output_embeddings().weight[TOKENIZER_SIZE:] *= 5.0
  hf.save_pretrained(tmp_path)
  save_tiny_tokenizer(tmp_path, vocab_size=TOKENIZER_SIZE)
  m = load_model(str(tmp_path))
  assert m.tokenizer.vocab_size == len(transformers.AutoTokenizer.from_pretrained(tmp_path))
  assert (m.tokenizer.vocab_size, m.cfg.vocab_size) == (TOKENIZER_SIZE, 128)

  full_w_a, full_norm = _latentmas_realigner(hf)
  hf.resize_token_embeddings(TOKENIZER_SIZE)  # what LatentMAS does before building W_a
  w_a, norm = _latentmas_realigner(hf)
  assert abs(norm - full_norm) > 0.1 * full_norm  # the test can tell the two apart

  cfg = agents_config()
  assert cfg.realign_rows == "tokenizer"  # the default follows LatentMAS
  ours = RunContext.from_config(m, cfg, eval_config()).realigner
  np.testing.assert_allclose(float(ours.target_norm), norm, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.w_a), w_a, atol=2e-4, rtol=1e-3)
  cfg.realign_rows = "all"
  every = RunContext.from_config(m, cfg, eval_config()).realigner
  np.testing.assert_allclose(float(every.target_norm), full_norm, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(every.w_a), full_w_a, atol=2e-4, rtol=1e-3)


def test_realign_row_count():
  assert agents.realign_row_count("tokenizer", 151669, 151936) == 151669  # Qwen3
  assert agents.realign_row_count("all", 151669, 151936) == 151936
  assert agents.realign_row_count("tokenizer", 49152, 49152) == 49152  # SmolLM2: no change
  assert agents.realign_row_count("tokenizer", 130, 128) == 128  # cannot add rows
  with pytest.raises(ValueError, match="--config.agents.realign_rows"):
    agents.realign_row_count("some", 1, 1)


@pytest.mark.parametrize("thinking", [True, False])
def test_enable_thinking_reaches_every_agent_prompt(qwen_style_dir, thinking):  # noqa: F811
  from diffmas_jax.tokenizer import Tokenizer
  tok = Tokenizer.from_pretrained(qwen_style_dir)
  cfg = agents_config()
  assert cfg.enable_thinking is True  # documented default: Qwen3's and LatentMAS's
  cfg.enable_thinking = thinking
  ctx = RunContext.from_config(LoadedModel(None, None, tok, "tokenizer only"), cfg, eval_config())
  record = Record(id="1", question="What is 2 + 3?", gold="5", family="math")
  batch = latent_mas.encode_pipeline(tok, [record], ctx.roles, template_kwargs=ctx.template_kwargs)
  texts = [tok.decode(row[valid].tolist(), skip_special_tokens=False)
           for row, valid in [*zip(batch.agent_tokens[:, 0], batch.agent_valid[:, 0]),
                              (batch.solver_tokens[0], batch.solver_valid[0])]]
  empty_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  assert all(t.endswith(empty_think) != thinking for t in texts), texts
