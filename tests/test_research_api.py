"""The research API example of docs/research.md (and the README) runs as written.

The exact code block is executed, with `load_model` swapped for a tiny random
model that keeps the embedded tokenizer (the example's only I/O), and must print
finite, positive gradient norms for every upstream agent.
"""

import math
import os
import re

import jax
import numpy as np

from diffmas_jax import loading
from diffmas_jax.config import tiny_config
from diffmas_jax.io.gguf import GGUFSource, default_gguf_path
from diffmas_jax.params import init_weights
from diffmas_jax.tokenizer import Tokenizer

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "research.md")
HEADING = "### A pure research API"


def example_code(path: str = DOC) -> str:
  """The first ```python block after HEADING."""
  with open(path) as f:
    text = f.read()
  assert HEADING in text, f"{path} lost its section {HEADING!r}"
  match = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.S)
  assert match, f"no python block under {HEADING!r} in {path}"
  return match.group(1)


def _tiny_model(source=loading.EMBEDDED, dtype="float32", **_):
  tokenizer = Tokenizer.from_gguf_metadata(GGUFSource(default_gguf_path()).tokenizer_metadata)
  cfg = tiny_config("llama", vocab_size=tokenizer.vocab_size, dtype=dtype)
  return loading.LoadedModel(cfg, init_weights(cfg, jax.random.key(0)), tokenizer, source)


def test_research_example_prints_positive_norms_per_agent(monkeypatch, capsys):
  code = example_code()
  assert "load_model()" in code and "probes.block_gradients" in code
  monkeypatch.setattr(loading, "load_model", _tiny_model)
  namespace = {}
  exec(compile(code, DOC, "exec"), namespace)  # noqa: S102  (the documented example itself)
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines] == ["planner", "critic", "refiner"], lines
  for line in lines:
    norms = [float(x) for x in re.findall(r"\d[\d.e+-]*", line)]
    assert len(norms) == 4 and all(math.isfinite(x) and x > 0 for x in norms), line
  g = namespace["g"]
  for key in ("adapter_norm", "embed_norm", "k_norm", "v_norm"):
    values = np.asarray(g[key])
    assert values.shape == (3,) and np.all(np.isfinite(values)) and np.all(values > 0), key
