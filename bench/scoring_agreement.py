"""Agreement of `score()` with hand labels on tests/data/math_scoring_cases.jsonl.

  python -m bench.scoring_agreement            # this checkout
  PYTHONPATH=/path/to/old/checkout python -m bench.scoring_agreement   # another version

Each case is a realistic model output, the gold answer and the verdict a human
grader gives. Prints agreement per family and lists every disagreement.
"""

from __future__ import annotations

import collections
import json
import os
import time

from diffmas_jax.tasks.records import Record
from diffmas_jax.tasks.scoring import score

CASES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                     "math_scoring_cases.jsonl")


def load_cases(path: str = CASES) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def case_record(case: dict) -> Record:
  """The benchmark record a case stands for."""
  if case["family"] == "mc":
    return Record(id=str(case["id"]), question="q", family="mc", gold=case["gold"],
                  choices=tuple(case["choices"]))
  meta = {"answer_type": "integer"} if case["family"] == "aime" else {}
  return Record(id=str(case["id"]), question="q", family="math", gold=case["gold"], meta=meta)


def disagreements(cases: list[dict]) -> list[int]:
  """Ids of the cases where score() and the label differ."""
  return [c["id"] for c in cases if score(case_record(c), c["output"])["correct"] != c["correct"]]


def main():
  cases = load_cases()
  start = time.monotonic()
  wrong = set(disagreements(cases))
  elapsed = time.monotonic() - start
  per_family = collections.defaultdict(lambda: [0, 0])
  for c in cases:
    per_family[c["family"]][0] += c["id"] not in wrong
    per_family[c["family"]][1] += 1
  total = len(cases) - len(wrong)
  print(f"agreement {total}/{len(cases)} ({100 * total / len(cases):.1f}%) in {elapsed:.1f} s; "
        + ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(per_family.items())))
  for c in cases:
    if c["id"] in wrong:
      print(f"  #{c['id']} {c['family']}/{c['kind']}: label {c['correct']}, gold {c['gold']!r}, "
            f"output {c['output'][-70:]!r}")


if __name__ == "__main__":
  main()
