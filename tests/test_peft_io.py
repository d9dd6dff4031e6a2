"""PEFT interop: adapters we save load in peft with the same logits, and vice versa;
merged exports load in transformers; per-agent sets round-trip; clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from conftest import make_hf_model, to_ours
from diffmas_jax import lora as lora_lib
from diffmas_jax import model as model_lib
from diffmas_jax import peft_io
from diffmas_jax.config import tiny_config
from diffmas_jax.loading import LoadedModel
from diffmas_jax.topology import AgentLoRA

ALL = lora_lib.TARGETS
ROLES = ["planner", "critic", "refiner"]
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 9))


def random_lora(cfg, targets=ALL, rank=4, alpha=8.0, seed=0, lead=()):
  """A LoRA with random non-zero A and B (a zero B would hide layout mistakes)."""
  rs = np.random.RandomState(seed)
  a, b = {}, {}
  for name in targets:
    ins, outs = lora_lib._io_shapes(cfg, name)
    a[name] = jnp.asarray(0.1 * rs.randn(*lead, cfg.num_layers, *ins, rank), jnp.float32)
    b[name] = jnp.asarray(0.1 * rs.randn(*lead, cfg.num_layers, rank, *outs), jnp.float32)
  return model_lib.LoRA(a=a, b=b, scale=alpha / rank)


def ours_logits(cfg, weights, lora=None):
  return np.asarray(model_lib.forward_no_cache(weights, cfg, jnp.asarray(TOKENS), lora=lora))


def torch_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


def assert_lora_equal(x, y):
  assert x.scale == y.scale
  assert set(x.a) == set(y.a) and set(x.b) == set(y.b)
  for name in x.a:
    np.testing.assert_array_equal(np.asarray(x.a[name]), np.asarray(y.a[name]))
    np.testing.assert_array_equal(np.asarray(x.b[name]), np.asarray(y.b[name]))


# ---------------------------------------------------------------------------
# ours -> peft
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,targets", [("qwen3", ALL), ("qwen3", ("q", "v")),
                                            ("llama", ALL), ("llama", ("q", "v")),
                                            ("qwen2", ("o", "gate", "down"))])
def test_saved_adapter_loads_in_peft_with_same_logits(tmp_path, family, targets):
  hf = make_hf_model(family, seed=1)
  cfg, weights = to_ours(hf)
  base = torch_logits(hf)
  lora = random_lora(cfg, targets, rank=4, alpha=8.0, seed=2)
  out = str(tmp_path / "adapter")
  peft_io.save_peft_adapter(out, cfg, lora, alpha=8, dropout=0.05)
  assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert conf["target_modules"] == [lora_lib.HF_NAMES[n] for n in targets]
  assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (4, 8, 0.05)

  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  ref = torch_logits(pm)
  ours = ours_logits(cfg, weights, lora)
  assert np.abs(ref - base).max() > 1e-2  # the adapter really changes the model
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # Tensor names and values are exactly what peft itself would save.
  ours_state = peft_io.lora_to_peft_state_dict(cfg, lora)
  peft_state = peft.get_peft_model_state_dict(pm)
  assert sorted(ours_state) == sorted(peft_state)
  for key, value in peft_state.items():
    np.testing.assert_array_equal(ours_state[key], value.numpy())


# ---------------------------------------------------------------------------
# peft -> ours
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,targets,expected", [
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ALL),
    ("llama", "all-linear", ALL),  # peft saves this as full per-layer module names
    ("qwen3", r".*\.(q_proj|up_proj)", ("q", "up")),  # a regex string is saved as is
])
def test_peft_saved_adapter_loads_with_same_logits(tmp_path, family, targets, expected):
  hf = make_hf_model(family, seed=3)
  cfg, weights = to_ours(hf)
  torch.manual_seed(0)
  pm = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=12, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM"))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:  # peft initialises B to zero
        p.normal_(0.0, 0.1)
  pm.eval()
  pm.save_pretrained(tmp_path)
  lora = peft_io.load_peft_adapter(str(tmp_path), cfg)
  assert lora.scale == 3.0
  assert set(lora.a) == set(expected)
  np.testing.assert_allclose(ours_logits(cfg, weights, lora), torch_logits(pm), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,targets,as_loaded", [("qwen3", ALL, False),
                                                      ("llama", ("q", "v"), True)])
def test_merge_and_merged_hf_export(tmp_path, family, targets, as_loaded):
  hf = make_hf_model(family, seed=5)
  cfg, weights = to_ours(hf)
  lora = random_lora(cfg, targets, seed=6)
  merged = peft_io.merge_lora(weights, lora)
  for name in ALL:
    same = getattr(merged.layers, name) is getattr(weights.layers, name)
    assert same == (name not in targets)
  unmerged = ours_logits(cfg, weights, lora)
  assert np.abs(unmerged - ours_logits(cfg, weights)).max() > 1e-2
  np.testing.assert_allclose(ours_logits(cfg, merged), unmerged, atol=1e-5, rtol=0)

  model = LoadedModel(cfg, weights, None, "test") if as_loaded else (cfg, weights)
  out = tmp_path / "merged"
  peft_io.save_merged_hf_dir(str(out), model, lora)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(torch_logits(reloaded), unmerged, atol=1e-4, rtol=0)


def test_merge_keeps_weight_dtype_and_refuses_stacked():
  cfg, weights = to_ours(make_hf_model("qwen3"))
  weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights)
  merged = peft_io.merge_lora(weights, random_lora(cfg, ("q", "down")))
  assert merged.layers.q.dtype == jnp.bfloat16 and merged.layers.down.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="per-agent"):
    peft_io.merge_lora(weights, random_lora(cfg, ("q",), lead=(3,)))


# ---------------------------------------------------------------------------
# per-agent sets and atomic writes
# ---------------------------------------------------------------------------


def test_agent_adapters_round_trip_exactly(tmp_path):
  cfg = tiny_config("qwen3")
  upstream = random_lora(cfg, ("q", "v", "down"), rank=4, alpha=8.0, seed=7, lead=(3,))
  solver = random_lora(cfg, ALL, rank=4, alpha=8.0, seed=8)
  out = str(tmp_path / "agents")
  peft_io.save_agent_adapters(out, cfg, AgentLoRA(upstream=upstream, solver=solver), ROLES,
                              alpha=8.0)
  for sub in ROLES + ["solver"]:
    assert os.path.isfile(os.path.join(out, sub, "adapter_config.json"))
  back = peft_io.load_agent_adapters(out, cfg, ROLES)
  assert_lora_equal(back.upstream, upstream)
  assert_lora_equal(back.solver, solver)
  # Each role directory is a standalone adapter holding that agent's slice.
  one = peft_io.load_peft_adapter(os.path.join(out, "critic"), cfg)
  assert_lora_equal(one, jax.tree.map(lambda x: x[1], upstream))
  with pytest.raises(ValueError, match="roles"):
    peft_io.load_agent_adapters(out, cfg, ["planner", "refiner", "critic"])

  # final_only: no upstream adapters; and the shared-LoRA path of save_trained_adapters.
  peft_io.save_trained_adapters(out, cfg, AgentLoRA(upstream=None, solver=solver), ROLES,
                                alpha=8.0)
  assert not os.path.exists(os.path.join(out, "planner"))  # the old set was replaced
  back = peft_io.load_trained_adapters(out, cfg, ROLES)
  assert back.upstream is None
  assert_lora_equal(back.solver, solver)
  shared = str(tmp_path / "shared")
  peft_io.save_trained_adapters(shared, cfg, solver, ROLES, alpha=8.0)
  assert_lora_equal(peft_io.load_trained_adapters(shared, cfg, ROLES), solver)


def test_failed_save_keeps_the_old_adapter(tmp_path):
  cfg = tiny_config("llama")
  old = random_lora(cfg, ("q",), seed=9)
  out = str(tmp_path / "adapter")
  peft_io.save_peft_adapter(out, cfg, old, alpha=8.0, base_model="org/base")
  conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert conf["base_model_name_or_path"] == "org/base"
  with pytest.raises(ValueError, match="alpha"):  # alpha / r disagrees with the scale
    peft_io.save_peft_adapter(out, cfg, random_lora(cfg, ("k",), seed=10), alpha=4.0)
  assert os.listdir(tmp_path) == ["adapter"]  # no temp directories left behind
  assert_lora_equal(peft_io.load_peft_adapter(out, cfg), old)
  new = random_lora(cfg, ("k",), seed=10)
  peft_io.save_peft_adapter(out, cfg, new)  # alpha derived from the scale
  assert os.listdir(tmp_path) == ["adapter"]
  assert_lora_equal(peft_io.load_peft_adapter(out, cfg), new)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  """(cfg, adapter dir, function to edit its adapter_config.json)."""
  cfg = tiny_config("qwen3")
  out = tmp_path / "adapter"
  peft_io.save_peft_adapter(str(out), cfg, random_lora(cfg, ("q", "v"), rank=4), alpha=8.0)

  def edit(**changes):
    conf = json.loads((out / "adapter_config.json").read_text())
    conf.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(conf))

  return cfg, out, edit


def test_missing_directory_and_files_are_named(tmp_path, saved):
  cfg, out, _ = saved
  with pytest.raises(FileNotFoundError, match="nowhere.*adapter_config.json"):
    peft_io.load_peft_adapter(str(tmp_path / "nowhere"), cfg)
  with pytest.raises(FileNotFoundError, match="per-agent adapter directory not found"):
    peft_io.load_agent_adapters(str(tmp_path / "nowhere"), cfg, ROLES)
  os.remove(out / "adapter_model.safetensors")
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
    peft_io.load_peft_adapter(str(out), cfg)
  os.remove(out / "adapter_config.json")
  with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
    peft_io.load_peft_adapter(str(out), cfg)


@pytest.mark.parametrize("changes,message", [
    (dict(r=8), r"r=8 in adapter_config.json but the tensor has rank 4"),
    (dict(use_dora=True), "use_dora=True"),
    (dict(use_rslora=True), "use_rslora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
    (dict(target_modules=["q_proj", "v_proj", "lm_head"]),
     r"target_modules has unknown module\(s\) \['lm_head'\]"),
    (dict(target_modules=["q_proj"]), "v_proj is not in target_modules"),
    (dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"]),
     "only some layers"),
    (dict(peft_type="IA3"), "peft_type"),
])
def test_bad_adapter_configs_name_the_field(saved, changes, message):
  cfg, out, edit = saved
  edit(**changes)
  with pytest.raises(ValueError, match=message):
    peft_io.load_peft_adapter(str(out), cfg)


def test_adapter_for_another_model_is_refused(saved):
  cfg, out, _ = saved
  with pytest.raises(ValueError, match=r"q_proj.lora_B.weight: shape \(32, 4\), expected \(48, 4\)"):
    peft_io.load_peft_adapter(str(out), cfg.replace(num_heads=6, num_kv_heads=2))
  with pytest.raises(ValueError, match="missing tensors"):
    peft_io.load_peft_adapter(str(out), cfg.replace(num_layers=3))
  with pytest.raises(ValueError, match="layer 1, but the model has 1 layers"):
    peft_io.load_peft_adapter(str(out), cfg.replace(num_layers=1))
