"""Benchmark suites (`python -m launch.bench --suites=...`) and their shared pieces."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def model_dir(hf_dir: str = ""):
  """Yields `hf_dir`, or the embedded model exported to a temporary HF directory."""
  if hf_dir:
    yield hf_dir
    return
  from diffmas_jax.loading import export_hf_dir, load_model
  with tempfile.TemporaryDirectory() as tmp:
    yield export_hf_dir(load_model(), os.path.join(tmp, "hf"))
