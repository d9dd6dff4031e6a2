"""Answer extraction from model output text, one rule set per task family.

LatentMAS conventions, made robust: the last `\\boxed{...}` with nested braces
(its public code cut at the first `}`), then family specific fallbacks.
"""

from __future__ import annotations

import re

from diffmas_jax.tasks.records import LETTERS

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b\s*")
# A signed integer/decimal with optional thousands separators, or a simple fraction.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def last_boxed_span(text: str) -> tuple[int, int, int, int] | None:
  """Where the last `\\boxed`/`\\fbox` is: (command start, content start, content end, box end).

  `text[content start:content end]` is the content; `box end` is just past the
  closing brace (or the content's end when the box is unterminated or brace-less).
  """
  matches = list(_BOX_COMMAND.finditer(text))
  if not matches:
    return None
  begin, start = matches[-1].start(), matches[-1].end()
  if start < len(text) and text[start] == "{":
    depth = 0
    for i in range(start, len(text)):
      if text[i] == "{" and text[i - 1] != "\\":
        depth += 1
      elif text[i] == "}" and text[i - 1] != "\\":
        depth -= 1
        if depth == 0:
          return begin, start + 1, i, i + 1
    return begin, start + 1, len(text), len(text)
  bare = re.match(r"[^\s$]+", text[start:])  # "\\boxed 18$" -> "18"
  return (begin, start, start + bare.end(), start + bare.end()) if bare else None


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces kept).

  Also accepts a space before the brace (`\\boxed {18}`) and the brace-less
  form `\\boxed 18` used in some MATH solutions. An unterminated last box
  (generation cut off) yields its partial content.

  Args:
    text: model output.

  Returns:
    The stripped content, or None when there is no box.
  """
  span = last_boxed_span(text)
  return None if span is None else text[span[1]:span[2]].strip()


def last_number(text: str) -> str | None:
  """The last number in `text` ("1,000", "-3.5", "3/4"), or None."""
  numbers = _NUMBER.findall(text)
  return numbers[-1].replace(" ", "") if numbers else None


def extract_math(text: str) -> str:
  """Last boxed answer, else the last number, else ""."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  return last_number(text) or ""


# Explicit answer statements, most specific first. "<L>" stands for the letter group.
_MC_PATTERNS = [
    r"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\**\s*[\(\[]?<L>[\)\]]?(?![A-Za-z])",
    r"(?:correct|best|right)\s+(?:answer|option|choice)\s*(?:is|:)?\s*[:\s]*\**\s*[\(\[]?<L>"
    r"[\)\]]?(?![A-Za-z])",
    r"(?:option|choice)\s*[\(\[]?<L>[\)\]]?(?![A-Za-z])\s*(?:is\s+(?:correct|right|the\s+best))",
]


# "the answer is (c)", "Answer: c." : a lower-case letter only where it cannot be a word.
_MC_LOWER = (r"answer\s*(?:is|:)\s*\**\s*(?:option\s*)?"
             r"(?:[\(\[](<l>)[\)\]]|(<l>)\)|(<l>)\.?\**\s*$)")
_MC_TEXT = r"answer\s*(?:is|:)\s*\**\s*([^\n]+)"


def _normalize_option(text: str) -> str:
  text = re.sub(r"\\text(?:bf|it)?\{([^{}]*)\}", r"\1", text)
  return re.sub(r"[\s*_`$.,:;!?\"']+", " ", text).strip().lower()


def _choice_by_text(answer: str, letters: str, choices) -> str:
  """The letter whose option text is exactly `answer` (case and punctuation aside)."""
  wanted = _normalize_option(answer)
  hits = [letters[i] for i, c in enumerate(choices[:len(letters)])
          if wanted and _normalize_option(c) == wanted]
  return hits[0] if len(hits) == 1 else ""


def extract_choice(text: str, letters: str = LETTERS, choices=()) -> str:
  """A multiple-choice letter.

  Order: the last boxed content (a letter in any case, or an option's text);
  explicit statements ("the answer is (B)", "**Answer: C**", "correct option
  is D", lower case where it cannot be a word: "answer is (c)", "Answer: c.");
  an answer stated as an option's text ("The answer is Paris."); finally the
  last standalone letter, preferring marked forms like "(B)" or "B." over a
  bare "B", after dropping lines that merely restate the options ("A. ...",
  "B. ...", "C. ...", in order), whose last label would otherwise read as an
  answer. Letters outside `letters` are ignored, so the pronoun "I" is not
  read as option I when there are only four options.

  Args:
    text: model output.
    letters: valid letters, e.g. "ABCD".
    choices: the option texts in letter order (optional; enables answers given as text).

  Returns:
    An upper-case letter, or "" when none is found.
  """
  cls = "[" + re.escape(letters) + "]"
  lower = "[" + re.escape(letters.lower()) + "]"
  boxed = last_boxed(text)
  if boxed is not None:
    inner = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed).strip()
    m = (re.match(rf"^[\(\[]?({cls})(?![A-Za-z])", inner) or
         re.fullmatch(rf"[\(\[]?({lower})[\)\]]?\.?", inner) or re.search(rf"\b({cls})\b", inner))
    if m:
      return m.group(1).upper()
    by_text = _choice_by_text(inner, letters, choices)
    if by_text:
      return by_text
  for pattern in _MC_PATTERNS:
    hits = re.findall(pattern.replace("<L>", f"({cls})"), text, flags=re.IGNORECASE)
    hits = [h for h in hits if h in letters]  # IGNORECASE must not turn "a" into "A"
    if hits:
      return hits[-1]
  lowered = re.findall(_MC_LOWER.replace("<l>", lower), text, flags=re.IGNORECASE | re.MULTILINE)
  lowered = ["".join(groups) for groups in lowered if "".join(groups).upper() in letters]
  if lowered:
    return lowered[-1].upper()
  if choices:
    stated = re.findall(_MC_TEXT, text, flags=re.IGNORECASE)
    by_text = _choice_by_text(stated[-1], letters, choices) if stated else ""
    if by_text:
      return by_text
  text = _without_option_echo(text, letters)
  marked = re.findall(rf"(?:\(({cls})\)|\b({cls})[\.\):](?!\w))", text)
  if marked:
    return "".join(marked[-1])
  bare = re.findall(rf"\b({cls})\b", text)
  return bare[-1] if bare else ""


def _without_option_echo(text: str, letters: str) -> str:
  """Drops runs of >= 3 lines labelled with consecutive letters from the first one."""
  lines = text.split("\n")
  labels = []
  for line in lines:
    m = re.match(r"\s*\(?([A-Z])[\.\):]\s", line)
    labels.append(letters.find(m.group(1)) if m else -1)  # option index, -1 = not a label
  keep, i = [], 0
  while i < len(lines):
    j = i + 1
    while labels[i] == 0 and j < len(lines) and labels[j] == labels[j - 1] + 1:
      j += 1
    if labels[i] == 0 and j - i >= 3:
      i = j
      continue
    keep.append(lines[i])
    i += 1
  return "\n".join(keep)


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
  """The program in a model's answer.

  The last fenced ```python block; else the last fenced block of any language
  (an unterminated fence, from a cut-off generation, runs to the end); else the
  raw text from its first code-looking line when it defines a function; else "".
  """
  blocks = _FENCE.findall(text)
  python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
  if python:
    return python[-1].strip("\n")
  if blocks:
    return blocks[-1][1].strip("\n")
  if re.search(r"^\s*def\s+\w+\s*\(", text, flags=re.MULTILINE):
    start = re.search(r"^(?:def|class|import|from|@)\b", text, flags=re.MULTILINE)
    return text[start.start() if start else 0:].strip("\n")
  return ""


def extract_answer(text: str, family: str, letters: str = LETTERS) -> str:
  """Dispatches to the family's extractor.

  Args:
    text: model output.
    family: "math", "mc" or "code".
    letters: valid letters for multiple choice (ignored otherwise).

  Returns:
    The extracted answer ("" when nothing usable is found).
  """
  if family == "math":
    return extract_math(text)
  if family == "mc":
    return extract_choice(text, letters)
  if family == "code":
    return extract_code(text)
  raise ValueError(f"unknown task family {family!r}; expected 'math', 'mc' or 'code'")
