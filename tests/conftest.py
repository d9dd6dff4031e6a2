"""Test setup: 8 fake CPU devices for sharding tests, shared tiny models."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
# Launchers run in subprocesses use JAX's persistent compile cache unless told not to:
# tests must not write to (or be sped up by) the user's cache.
os.environ.setdefault("DIFFMAS_COMPILE_CACHE", "off")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_hf_model(family: str, seed: int = 0, tie: bool = False, **overrides):
  """A tiny random transformers model of the given family (f32, eval mode)."""
  import torch
  import transformers

  cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig,
         "qwen2": transformers.Qwen2Config}[family]
  kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-6)
  if family == "llama":
    kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  kw.update(overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**kw)).eval()
  with torch.no_grad():  # non-trivial norms and biases so their conversion is exercised
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def to_ours(hf_model):
  from diffmas_jax.config import ModelConfig
  from diffmas_jax.params import weights_from_hf_state_dict

  cfg = ModelConfig.from_hf(hf_model.config.to_dict())
  state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  return cfg, weights_from_hf_state_dict(cfg, state)


@pytest.fixture(scope="session", params=["qwen3", "llama", "qwen2"])
def family_model(request):
  """(family, hf_model, cfg, weights) for each supported family."""
  hf = make_hf_model(request.param)
  cfg, weights = to_ours(hf)
  return request.param, hf, cfg, weights


@pytest.fixture(scope="session")
def rng():
  return np.random.RandomState(0)


@pytest.fixture
def fake_gcs(tmp_path):
  """gs://bucket/... served from tmp_path/gcs through epath's own test backend."""
  from etils.epath import testing

  def local(p):
    p = os.fspath(p)
    return str(tmp_path / "gcs" / p[len("gs://"):]) if p.startswith("gs://") else p

  one = lambda orig, p, *a, **k: orig(local(p), *a, **k)
  two = lambda orig, p, dst, *a, **k: orig(local(p), local(dst), *a, **k)
  with testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                          remove=one, rmtree=one, stat=one, glob=one, rename=two, replace=two,
                          copy=two):
    yield tmp_path / "gcs"
