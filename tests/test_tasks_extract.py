"""Answer extraction on tricky, real-world-shaped model outputs."""

import pytest

from diffmas_jax.tasks.extract import (extract_answer, extract_choice, extract_code,
                                       extract_math, last_boxed, last_boxed_span, last_number)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
    (r"The answer is $\boxed{18.0}$.", "18.0"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"nested \boxed{\sqrt{\frac{1}{\{2\}}}} done", r"\sqrt{\frac{1}{\{2\}}}"),
    (r"\boxed {42}", "42"),
    (r"\fbox{7}", "7"),
    (r"so the count is \boxed 5$.", "5"),
    (r"cut off \boxed{\frac{1}{2", r"\frac{1}{2"),
    ("no box here", None),
])
def test_last_boxed(text, expected):
  assert last_boxed(text) == expected


def test_last_boxed_span_points_past_closing_brace():
  text = r"x $\boxed{\frac{1}{2}}$ y"
  begin, start, end, after = last_boxed_span(text)
  assert text[begin:after] == r"\boxed{\frac{1}{2}}"
  assert text[start:end] == r"\frac{1}{2}"


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.", "18"),
    ("Total: 1,000 apples and then 3.5", "3.5"),
    ("It costs 1,000 dollars", "1,000"),
    ("a ratio of 3/4", "3/4"),
    ("the temperature fell to -7", "-7"),
    ("nothing numeric", None),
])
def test_last_number(text, expected):
  assert last_number(text) == expected


def test_extract_math_prefers_box_then_number():
  assert extract_math(r"we get 12, so \boxed{13}") == "13"
  assert extract_math("we get 12 and finally 14.") == "14"
  assert extract_math("I cannot solve this") == ""


@pytest.mark.parametrize("text, letters, expected", [
    (r"Reasoning... so the answer is \boxed{B}.", "ABCD", "B"),
    (r"\boxed{(C)}", "ABCD", "C"),
    (r"\boxed{\text{D}}", "ABCD", "D"),
    (r"\boxed{A. Paris}", "ABCD", "A"),
    ("**Answer: (C)**", "ABCD", "C"),
    ("Answer: B", "ABCD", "B"),
    ("The correct answer is (D) because...", "ABCD", "D"),
    ("I think option B is correct.", "ABCD", "B"),
    ("A is wrong and C is wrong. The answer is: B", "ABCD", "B"),
    ("Looking at (A) and (C), I pick (C).", "ABCD", "C"),
    ("I believe it is D", "ABCD", "D"),  # "I" is not a valid letter with four options
    ("the answer is a tricky one", "ABCD", ""),  # lower-case "a" is an article
    ("The answer is E", "ABCDE", "E"),
    ("no letter here", "ABCD", ""),
    # Restating the options is not answering with the last one.
    ("A. the control\nB. the hypothesis\nC. the dependent variable\nD. the independent variable",
     "ABCD", ""),
    ("Options:\nA. red\nB. blue\nC. green\nD. pink\nI pick B.", "ABCD", "B"),
    ("A. red\nB. blue\nC. green\nD. pink\nThe correct answer is D. pink", "ABCD", "D"),
    ("B. blue is right, C. is not", "ABCD", "C"),  # no A-first listing: kept
])
def test_extract_choice(text, letters, expected):
  assert extract_choice(text, letters) == expected


def test_extract_code_prefers_last_python_block():
  text = ("Here is a draft:\n```python\ndef f():\n    return 1\n```\nBetter:\n"
          "```python\ndef f():\n    return 2\n```\nDone.")
  assert extract_code(text) == "def f():\n    return 2"


def test_extract_code_other_fences_unterminated_and_raw():
  assert extract_code("```\ndef g(x):\n    return x\n```") == "def g(x):\n    return x"
  assert extract_code("```py\ndef h(): pass\n```") == "def h(): pass"
  assert extract_code("```python\ndef cut(x):\n    return x +") == "def cut(x):\n    return x +"
  assert extract_code("def raw(a, b):\n    return a + b\n") == "def raw(a, b):\n    return a + b"
  assert extract_code("Sure:\nimport math\ndef r(x):\n    return math.sqrt(x)") == (
      "import math\ndef r(x):\n    return math.sqrt(x)")
  assert extract_code("I don't know how to do this.") == ""


def test_extract_answer_dispatch_and_bad_family():
  assert extract_answer(r"\boxed{5}", "math") == "5"
  assert extract_answer(r"\boxed{B}", "mc", "ABCD") == "B"
  assert extract_answer("```python\nx = 1\n```", "code") == "x = 1"
  with pytest.raises(ValueError, match="unknown task family 'poetry'"):
    extract_answer("x", "poetry")
