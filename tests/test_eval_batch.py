"""Automatic evaluation batch size from the KV-cache budget (eval.batch_size = 0)."""

import pytest

from diffmas_jax import eval_batch
from diffmas_jax.evaluation import evaluate
from test_eval_harness import _cfg, _oracle, _rows
from test_methods import RECORDS, tiny_model


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _row_bytes(model, cfg):
  roles = eval_batch.prompts.roles_from_config(cfg.agents)
  width = eval_batch.prompt_width(model.tokenizer, RECORDS, roles, cfg.eval.bucket)
  slots = eval_batch.slots_per_row(width, len(roles), cfg.agents.latent_steps,
                                   cfg.agents.agent_max_new_tokens, cfg.eval.max_new_tokens)
  return slots * eval_batch.cache_bytes_per_slot(model.cfg)


def test_batch_is_what_the_budget_holds(model):
  cfg = _cfg(batch_size=0)
  row = _row_bytes(model, cfg)
  many = RECORDS * 20  # 60 records: the cap, not the list, bounds the batch
  for rows, want in ((2, 2), (2.5, 2), (0.3, 1), (1000, eval_batch.MAX_AUTO_BATCH)):
    cfg.eval.cache_budget_mb = rows * row / 2**20
    assert eval_batch.auto_batch_size(model.cfg, model.tokenizer, many, cfg.eval,
                                      cfg.agents) == want
  # Never more rows than records (no padding a short list up to a big batch).
  cfg.eval.cache_budget_mb = 1000 * row / 2**20
  assert eval_batch.auto_batch_size(model.cfg, model.tokenizer, RECORDS, cfg.eval,
                                    cfg.agents) == len(RECORDS)
  cfg.eval.cache_budget_mb = 0
  with pytest.raises(ValueError, match="cache_budget_mb must be > 0"):
    eval_batch.auto_batch_size(model.cfg, model.tokenizer, RECORDS, cfg.eval, cfg.agents)


def test_harness_uses_the_automatic_batch(model, tmp_path):
  cfg, calls = _cfg(batch_size=0), []
  cfg.eval.cache_budget_mb = 2 * _row_bytes(model, cfg) / 2**20  # two rows
  evaluate(model, RECORDS, ["oracle"], cfg.eval, cfg.agents, str(tmp_path),
           extra_methods={"oracle": _oracle(calls)}, progress=False)
  # 3 records in batches of 2 (the last one padded), each padded to the device count
  assert calls == [(_rows(model, 2), 0), (_rows(model, 2), 1)]
  assert "batch auto" in (tmp_path / "summary.md").read_text()
