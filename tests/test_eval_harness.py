"""The evaluation harness: per-sample records, summary, resume, settings guard, configs."""

import json

import pytest

from configs import eval_arc, eval_gsm8k, eval_task
from diffmas_jax import eval_mesh
from diffmas_jax.evaluation import evaluate
from diffmas_jax.methods import MethodOutput
from test_methods import RECORDS, tiny_model


def _cfg(**eval_overrides):
  cfg = eval_gsm8k.get_config("quick")
  cfg.agents.roles = ("planner", "critic")
  cfg.agents.latent_steps = 2
  cfg.agents.agent_max_new_tokens = 3
  cfg.eval.update({**dict(max_new_tokens=4, batch_size=2, bucket=128), **eval_overrides})
  return cfg


def _rows(model, batch_size):
  """Rows a method receives: the batch padded to a multiple of this process's devices."""
  return eval_mesh.padded_rows(batch_size, eval_mesh.inference_mesh(model.weights))


def _oracle(calls):
  """A fake method that answers every record correctly and logs its batches."""

  def run(ctx, records, seed=0):
    calls.append((len(records), seed))
    gold = lambda r: f"\\boxed{{{r.gold}}}"
    return [MethodOutput(text=f"so {gold(r)}", output_tokens=5, answer_tokens=5, answer_nll=1.0,
                         mean_token_entropy=0.1, trace_len_per_agent=[2, 3]) for r in records]

  return run


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def test_records_summary_and_resume(model, tmp_path):
  cfg, calls = _cfg(), []
  out = evaluate(model, RECORDS, ["latent_mas", "oracle"], cfg.eval, cfg.agents, str(tmp_path),
                 extra_methods={"oracle": _oracle(calls)}, progress=False)
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(lines) == 2 * len(RECORDS) == len(out["records"])
  row = json.loads(lines[0])
  for key in ("question", "gold", "prediction", "raw_output", "correct", "output_tokens",
              "answer_tokens", "trace_len_per_agent", "seconds", "answer_nll",
              "mean_token_entropy", "seed", "sample_index"):
    assert key in row, key
  latent = [r for r in out["records"] if r["method"] == "latent_mas"]
  assert all(len(r["trace_len_per_agent"]) == 2 for r in latent)
  # Fixed batch shapes: the short last batch (3 records, batch 2) is padded to 2.
  assert calls == [(_rows(model, 2), 0), (_rows(model, 2), 1)]
  assert out["methods"]["oracle"]["accuracy"] == 1.0 and out["methods"]["oracle"]["n"] == 3
  md = (tmp_path / "summary.md").read_text()
  assert "| oracle | 3 | 100.0 |" in md and "| latent_mas | 3 |" in md
  assert (tmp_path / "accuracy.png").stat().st_size > 1000

  # Resume after losing one line: only that sample is recomputed, with its original seed.
  (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
  calls.clear()
  boom = lambda *a, **k: pytest.fail("a finished method was recomputed")
  again = evaluate(model, RECORDS, ["latent_mas", "oracle"], cfg.eval, cfg.agents,
                   str(tmp_path), extra_methods={"oracle": _oracle(calls)}, progress=False)
  assert calls == [(_rows(model, 2), 1)] and len(again["records"]) == len(lines)
  evaluate(model, RECORDS, ["oracle"], cfg.eval, cfg.agents, str(tmp_path),
           extra_methods={"oracle": boom}, progress=False)

  # Changed settings: refuse to mix results, and say what changed.
  changed = _cfg(max_new_tokens=9)
  with pytest.raises(ValueError, match="max_new_tokens: 4 -> 9"):
    evaluate(model, RECORDS, ["oracle"], changed.eval, changed.agents, str(tmp_path),
             extra_methods={"oracle": boom}, progress=False)


def test_adapter_methods_need_adapters(model, tmp_path):
  cfg = _cfg()
  with pytest.raises(ValueError, match="trained adapters"):
    evaluate(model, RECORDS, ["diffmas"], cfg.eval, cfg.agents, str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="unknown method"):
    evaluate(model, RECORDS, ["latent"], cfg.eval, cfg.agents, str(tmp_path), progress=False)


def test_self_consistency_with_several_samples(model, tmp_path):
  cfg, calls = _cfg(num_samples=2), []
  out = evaluate(model, RECORDS[:2], ["oracle"], cfg.eval, cfg.agents, str(tmp_path),
                 extra_methods={"oracle": _oracle(calls)}, progress=False)
  assert calls == [(_rows(model, 2), 0), (_rows(model, 2), 1000)]  # one seed per (sample, batch)
  assert out["methods"]["oracle"]["self_consistency"] == 1.0
  assert "self-consistency" in (tmp_path / "summary.md").read_text()


def test_configs():
  gsm, arc = eval_gsm8k.get_config(), eval_arc.get_config()
  assert gsm.eval.task == "gsm8k" and gsm.eval.max_new_tokens == 256
  assert arc.eval.task == "arc_challenge" and "GPQA" in arc.eval.stand_in_for
  assert gsm.eval.temperature == 0.0 and gsm.agents.latent_steps == 10
  hier = eval_task.get_config("task=medqa,hier,shared_start,paper")
  assert hier.agents.topology == "hierarchical" and hier.agents.position_layout == "shared_start"
  assert hier.eval.temperature == 0.6 and "specialist" in hier.agents.roles[0]
  quick = eval_arc.get_config("quick")
  assert quick.eval.limit == 4
  with pytest.raises(ValueError, match="available"):
    eval_task.get_config("fast")
  gsm.lock()  # as launch.eval loads it (lock_config=True): typos fail
  with pytest.raises(AttributeError):
    gsm.eval.max_new_token = 3
