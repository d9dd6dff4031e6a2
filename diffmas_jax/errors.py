"""Errors that are the user's input, not a bug: the launchers print them as one line.

Library code raises a subclass of `InputError` (or one of the older classes
listed in `launch/cli.py`) when a file is missing, a setting is out of range or
a checkpoint does not fit; the message names the problem and the fix. The
launchers print `error: <message>` and exit with status 2 (`--verbose` adds
the traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Sequence


class InputError(Exception):
  """A bad input or environment, found before (or instead of) long work."""


class InputErrors(InputError):
  """Several independent input problems found in one pass (all are reported)."""

  def __init__(self, errors: Sequence[BaseException]):
    self.errors = list(errors)
    super().__init__("; ".join(message(e) for e in self.errors))


def message(e: BaseException) -> str:
  """An exception's message on one line (KeyError's quoting removed)."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split()) or type(e).__name__
