"""Answer comparison per task family, and `score(record, output)` for the eval harness.

Math and AIME: a fast path first (a LaTeX-aware normalisation; numbers compare
exactly as fractions, "0.5" == "\\frac{1}{2}" == "1/2", "18.0" == "18", with a
1e-6 relative tolerance for long decimals; AIME compares integers); when it
says "different", math-verify (the verifier the open reasoning-model
evaluations use) decides symbolically: `2\\sqrt{2}` == `\\sqrt{8}`, sets,
intervals, several boxed answers, `\\pm`. Multiple choice compares letters,
case-insensitively. Code runs the task's tests in the sandbox.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from fractions import Fraction
from typing import Any, Mapping

from diffmas_jax.tasks import sandbox
from diffmas_jax.tasks.extract import extract_choice, extract_code, extract_math, last_boxed
from diffmas_jax.tasks.records import Record

_UNIT_WORDS = r"[a-zA-Z][a-zA-Z\s.]*"
_TEXT_COMMANDS = r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)"


def _strip_units(s: str) -> str:
  # "10\text{ cm}^2" / "5 \mbox{inches}" after a number: a unit, not part of the answer.
  s = re.sub(rf"(?<=[\d}}])\s*{_TEXT_COMMANDS}\{{\s*{_UNIT_WORDS}\}}(\^\{{?\d\}}?)?\s*$", "", s)
  # "18 dollars", "5 cm" (plain words after a leading number).
  m = re.fullmatch(rf"(-?[\d.,/]+)\s+{_UNIT_WORDS}", s)
  return m.group(1) if m else s


def normalize_math(answer: Any) -> str:
  """Canonical string form of a math answer.

  Handles: surrounding `$`/`\\(`/`\\[`, a `\\boxed{}` wrapper, `\\left`/`\\right`,
  thin spaces, `\\dfrac`/`\\tfrac`, `\\frac12`, degrees, percent signs, dollar
  signs, `\\text{ cm}` and plain-word units, a leading `x =`, a trailing period,
  thousands separators, and numbers (which become reduced fractions or integers:
  "18.0" -> "18", "0.5" -> "1/2").

  Args:
    answer: a string (or number) taken from model output or a dataset.

  Returns:
    The normalised string ("" for an empty answer).
  """
  s = str(answer).strip()
  boxed = last_boxed(s)
  if boxed is not None:
    s = boxed
  s = s.strip().strip("$").strip()
  s = re.sub(r"^\\[\[\(]|\\[\]\)]$", "", s).strip()
  s = s.replace("\\displaystyle", "").replace("\\left", "").replace("\\right", "")
  s = re.sub(r"\\[!,;: ]|~", "", s)  # LaTeX spacing
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = re.sub(r"\^\s*\{?\\circ\}?|°|\\circ", "", s)
  s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
  s = s.replace("{,}", ",")
  s = _strip_units(s.strip())
  s = re.sub(rf"{_TEXT_COMMANDS}\{{([^{{}}]*)\}}", r"\1", s)  # unwrap remaining \text{...}
  s = re.sub(r"^(?:[a-zA-Z]\w*|\\[a-zA-Z]+)\s*=\s*(?=[^=]+$)", "", s.strip())  # "x = 5"
  s = s.strip().rstrip(".").strip()
  s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
  s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
  s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac1{2}
  s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt2
  if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
    s = s.replace(",", "")
  s = re.sub(r"\s+", "", s)
  number = _to_fraction(s)
  if number is not None:
    return str(number.numerator) if number.denominator == 1 else (
        f"{number.numerator}/{number.denominator}")
  return s


_DECIMAL = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def _to_fraction(s: str) -> Fraction | None:
  """An exact value for "3", "-0.25", "1e-3", "3/4", "\\frac{3}{4}", "-\\frac{3}{4}"."""
  m = re.fullmatch(rf"({_DECIMAL})", s)
  if m:
    return Fraction(m.group(1))
  m = (re.fullmatch(rf"([+-]?)\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}", s) or
       re.fullmatch(rf"([+-]?)\(?({_DECIMAL})\)?/\(?({_DECIMAL})\)?", s))
  if m and Fraction(m.group(3)) != 0:
    value = Fraction(m.group(2)) / Fraction(m.group(3))
    return -value if m.group(1) == "-" else value
  return None


def _split_top_level(s: str) -> list[str]:
  """'(1,\\frac{1}{2})' -> ['1', '\\frac{1}{2}'] (commas inside braces are kept)."""
  parts, depth, current = [], 0, ""
  for ch in s[1:-1]:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += ch
  return parts + [current]


def math_equal(prediction: Any, gold: Any, rel_tol: float = 1e-6, verifier: bool = True) -> bool:
  """Whether two math answers are the same.

  Fast path: equal after `normalize_math`; numbers exactly, then with
  `rel_tol`; tuples and intervals ("(3, \\frac{\\pi}{2})") element by element with
  the same brackets. Otherwise, when `verifier`, math-verify decides (`verify_math`).
  """
  return _normalized_equal(prediction, gold, rel_tol) or (
      verifier and verify_math(prediction, gold))


def _normalized_equal(prediction: Any, gold: Any, rel_tol: float = 1e-6) -> bool:
  a, b = normalize_math(prediction), normalize_math(gold)
  if not a or not b:
    return False
  if a == b:
    return True
  fa, fb = _to_fraction(a), _to_fraction(b)
  if fa is not None and fb is not None:
    return math.isclose(float(fa), float(fb), rel_tol=rel_tol, abs_tol=1e-12)
  if len(a) > 2 and len(b) > 2 and a[0] + a[-1] == b[0] + b[-1] and a[0] in "([" and (
      a[-1] in ")]"):
    pa, pb = _split_top_level(a), _split_top_level(b)
    return len(pa) == len(pb) and len(pa) > 1 and all(map(_normalized_equal, pa, pb))
  return False


def aime_equal(prediction: Any, gold: Any, verifier: bool = True) -> bool:
  """AIME answers are integers 0..999: compare as integers ("033" == "33" == "33.0");
  otherwise math-verify on an integer gold (`\\boxed{2^3}` == 8)."""
  return _integer_equal(prediction, gold) or (verifier and _is_integer(gold) and
                                              verify_math(prediction, gold))


def _integer_equal(prediction: Any, gold: Any) -> bool:
  a, b = _to_fraction(normalize_math(prediction)), _to_fraction(normalize_math(gold))
  return a is not None and b is not None and a.denominator == 1 and a == b


def _is_integer(gold: Any) -> bool:
  value = _to_fraction(normalize_math(gold))
  return value is not None and value.denominator == 1


@functools.lru_cache(maxsize=1)
def _math_verify():
  """The math_verify module, imported on first use (it pulls in sympy: about 2 s)."""
  try:
    import math_verify
  except ImportError as e:
    raise ImportError("math scoring needs math-verify: pip install -r requirements.txt "
                      "(math-verify==0.9.0)") from e
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # its no-timeout warnings
  return math_verify


def _as_latex(text: str) -> str:
  """A bare answer ("2\\sqrt{2}", "x = 5") boxed, so math-verify reads all of it;
  text that already has a box or `$...$` math is passed as it is."""
  return text if ("\\boxed" in text or "$" in text or "\\(" in text) else f"\\boxed{{{text}}}"


def verify_math(prediction: Any, gold: Any, timeout_s: int = 5, whole_output: bool = False) -> bool:
  """math-verify's verdict: `prediction` (an answer, or a whole model output) against `gold`.

  Args:
    prediction: a bare answer, or model output (boxed answers first, all of
      them: "x = \\boxed{2} or \\boxed{-1}" is the set {-1, 2}).
    gold: the reference answer (bare LaTeX).
    whole_output: `prediction` is a model's full output: never box it whole.
    timeout_s: per parse and comparison. math-verify enforces it with
      SIGALRM, which only works on the main thread; elsewhere it runs without
      one (long or pathological inputs could then take long).

  Returns:
    True when math-verify finds them equal; False when not, or when either side
    does not parse.
  """
  prediction, gold = str(prediction).strip(), str(gold).strip()
  if not prediction or not gold:
    return False
  mv = _math_verify()
  timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
  config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
  try:
    gold_parsed = mv.parse(_as_latex(gold), parsing_timeout=timeout)
    pred_parsed = mv.parse(prediction if whole_output else _as_latex(prediction),
                           extraction_config=config,
                           parsing_timeout=timeout)
    return bool(gold_parsed and pred_parsed and
                mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
  except Exception:  # math-verify errors (and its timeouts) mean "not shown equal"
    return False


def mc_equal(prediction: Any, gold: Any) -> bool:
  """Same option letter, ignoring case, spaces and parentheses."""
  clean = lambda x: str(x).strip().strip("()[]. ").upper()
  return bool(clean(prediction)) and clean(prediction) == clean(gold)


def score(record: Record, output_text: str,
          sandbox_cfg: sandbox.SandboxConfig | Mapping | None = None) -> dict[str, Any]:
  """Extracts the answer from `output_text` and checks it against `record`.

  Args:
    record: the benchmark item.
    output_text: the model's full answer.
    sandbox_cfg: limits for running code answers (SandboxConfig or a dict of
      its fields); ignored for math and multiple choice.

  Returns:
    {"correct": bool, "prediction": str, "detail": str}: detail is the sandbox
    outcome for code ("passed", "timeout", ...); for math "math-verify" when
    the verifier, not the fast path, found the answer correct; "" otherwise.
  """
  if record.family == "math":
    prediction = extract_math(output_text)
    integer = record.meta.get("answer_type") == "integer"
    fast = (_integer_equal if integer else _normalized_equal)(prediction, record.gold)
    # With boxes the verifier reads the whole output (all boxed answers: "x = \\boxed{2}
    # or x = \\boxed{-1}"); without, only the extracted answer, since free text holds
    # intermediate expressions ("2 + 2 =" is not the answer 4).
    boxed = last_boxed(output_text) is not None
    correct = fast or (bool(prediction) and (not integer or _is_integer(record.gold)) and
                       verify_math(output_text if boxed else prediction, record.gold,
                                   whole_output=boxed))
    return {"correct": correct, "prediction": prediction,
            "detail": "" if fast or not correct else "math-verify"}
  if record.family == "mc":
    prediction = extract_choice(output_text, record.letters, record.choices)
    return {"correct": mc_equal(prediction, record.gold), "prediction": prediction, "detail": ""}
  code = extract_code(output_text)
  result = sandbox.run_tests(code, record, sandbox_cfg)
  return {"correct": result.passed, "prediction": code, "detail": result.reason}
