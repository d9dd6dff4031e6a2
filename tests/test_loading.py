"""Loading HF directories (single and sharded safetensors) and clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model
from diffmas_jax import model as model_lib
from diffmas_jax.loading import ModelNotFoundError, load_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(path, vocab_size=128):
  """A word-level tokenizer with ChatML specials, saved the way transformers expects."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - 3)])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
  fast.chat_template = CHATML
  fast.save_pretrained(path)


@pytest.mark.parametrize("family,shard", [("qwen3", False), ("llama", True), ("qwen2", True)])
def test_hf_directory_loads_with_parity(tmp_path, family, shard):
  hf = make_hf_model(family, seed=4)
  hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
  save_tiny_tokenizer(tmp_path)
  if shard:
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
  m = load_model(str(tmp_path))
  tokens = np.random.RandomState(0).randint(0, 128, (2, 9))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(model_lib.forward_no_cache(m.weights, m.cfg, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert m.tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}]).endswith(
      "<|im_start|>assistant\n")


def test_missing_shard_names_the_file(tmp_path):
  make_hf_model("llama", seed=5).save_pretrained(tmp_path, max_shard_size="40KB")
  save_tiny_tokenizer(tmp_path)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[-1]
  os.remove(tmp_path / victim)
  with pytest.raises(Exception, match=victim):
    load_model(str(tmp_path))


def test_wrong_shapes_are_reported(tmp_path):
  make_hf_model("qwen3", seed=6).save_pretrained(tmp_path)
  save_tiny_tokenizer(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 96  # weights say 64
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"mlp.gate_proj.weight: shape \(64, 32\), expected \(96, 32\)"):
    load_model(str(tmp_path))


def test_unsupported_config_attribute_is_named(tmp_path):
  make_hf_model("qwen3", seed=6).save_pretrained(tmp_path)
  save_tiny_tokenizer(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="dynamic"):
    load_model(str(tmp_path))


def test_missing_sources_explain_what_to_do(tmp_path, monkeypatch):
  from huggingface_hub import constants
  with pytest.raises(ModelNotFoundError, match="does not exist"):
    load_model(str(tmp_path / "nope" / "x"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network retries
  with pytest.raises(ModelNotFoundError, match="hf download NoSuchOrg-xyz/NoSuchModel-0B"):
    load_model("NoSuchOrg-xyz/NoSuchModel-0B")  # offline here; a typo online: same advice
