"""The relay task builder: deterministic, no held-out question in training; letter scoring."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.research import relay
from diffmas_jax.tasks import Record


def _records(n=60):
  out = [Record(id=f"q{i}", question=f"Question number {i % 50}?", family="mc", gold="ABCD"[i % 4],
                choices=("w", "x", "y", "z")) for i in range(n)]  # ids 50..59 repeat questions
  out.append(Record(id="three", question="Three options?", family="mc", gold="A",
                    choices=("a", "b", "c")))
  return out


def _question_key(r):
  return " ".join(r.question.lower().split())


def test_split_is_deterministic_and_disjoint_on_packaged_arc_easy():
  a = relay.relay_items(200, 100)
  b = relay.relay_items(200, 100)
  assert [r.id for r in a.train] == [r.id for r in b.train]
  assert [r.id for r in a.heldout] == [r.id for r in b.heldout]
  assert len(a.train) == 200 and len(a.heldout) == 100
  assert not {r.id for r in a.train} & {r.id for r in a.heldout}
  assert not {_question_key(r) for r in a.train} & {_question_key(r) for r in a.heldout}
  # More training items never change the held-out set.
  c = relay.relay_items(300, 100)
  assert [r.id for r in c.heldout] == [r.id for r in a.heldout]
  assert relay.relay_items(200, 100, seed=1).heldout != a.heldout


def test_duplicate_questions_never_cross_the_split():
  split = relay.relay_items(40, 10, records=_records())
  held = {_question_key(r) for r in split.heldout}
  assert not held & {_question_key(r) for r in split.train}
  assert all(len(r.choices) == 4 for r in split.train + split.heldout)
  with pytest.raises(ValueError, match="usable 4-option items"):
    relay.relay_items(45, 10, records=_records())  # only 50 distinct 4-option questions
  kept = relay.relay_items(5, 5, records=_records(), keep=lambda r: r.gold == "B")
  assert all(r.gold == "B" for r in kept.train + kept.heldout)


def test_prompts_put_the_fact_only_upstream():
  r = _records()[2]
  reader = " ".join(m["content"] for m in relay.reader_messages(r))
  solver = " ".join(m["content"] for m in relay.solver_messages(r))
  assert relay.fact(r) in reader and relay.fact(r) not in solver
  assert "Question number 2?" in solver
  assert relay.fact(r) in " ".join(m["content"] for m in relay.solver_messages(r, with_fact=True))


def test_letter_scores():
  letters = relay.LetterSpec(column=1, ids=(10, 11, 12, 13))
  targets = np.array([[5, 12, 6], [5, 10, 6]])
  logits = np.zeros((2, 3, 16), np.float32)
  logits[0, 1, 12] = 3.0  # row 0: the gold letter wins
  logits[1, 1, 13] = 3.0  # row 1: a wrong letter wins
  logits[1, 1, 4] = 9.0  # ...and a non-letter token is ignored by the prediction
  batch = PipelineBatch(None, None, None, None, jnp.asarray(targets), None)
  pred, gold, nll = relay.letter_scores(jnp.asarray(logits), batch, letters)
  assert pred.tolist() == [2, 3] and gold.tolist() == [2, 0]
  expected = -np.log(np.exp(3.0) / (np.exp(3.0) + 15))
  np.testing.assert_allclose(float(nll[0]), expected, rtol=1e-5)
