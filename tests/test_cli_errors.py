"""One error style across the launchers: checks before any tensor is read, every
problem reported in one run, usage errors for misspelt keys, compile cache, file modes."""

import json
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from diffmas_jax import compile_cache
from diffmas_jax.config import UnsupportedConfigError
from diffmas_jax.errors import InputError, InputErrors
from diffmas_jax.io.safetensors_io import CheckpointFileError, write_hf_dir
from diffmas_jax.loading import ModelNotFoundError, check_source
from launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=16,
                   hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def _model_dir(path, config=None, weights=b"", **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**(config or TINY_CONFIG), **fields}, f)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(weights)
  return str(path)


def _safetensors_bytes(n_floats):
  from safetensors.numpy import save
  return save({"w": np.zeros(n_floats, np.float32)})


def test_config_is_checked_before_any_tensor(tmp_path):
  # The weights file is garbage: only config.json can have produced these errors.
  bad_rope = _model_dir(tmp_path / "rope", rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(UnsupportedConfigError, match="yarn"):
    check_source(bad_rope)
  bad_arch = _model_dir(tmp_path / "arch", model_type="gpt2")
  with pytest.raises(UnsupportedConfigError):
    check_source(bad_arch)


def test_truncated_and_missing_weights(tmp_path):
  whole = _safetensors_bytes(64)
  assert check_source(_model_dir(tmp_path / "ok", weights=whole)).vocab_size == 16
  with pytest.raises(CheckpointFileError, match="truncated"):
    check_source(_model_dir(tmp_path / "cut", weights=whole[:-10]))
  with pytest.raises(CheckpointFileError, match="header"):
    check_source(_model_dir(tmp_path / "junk", weights=b"\x00" * 4))
  no_config = tmp_path / "noconf"
  no_config.mkdir()
  with pytest.raises(CheckpointFileError, match="config.json"):
    check_source(str(no_config))


def test_relative_missing_paths_are_directories_not_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "models").mkdir()
  for source in ("models/Qwen3-8B", "./Qwen3-8B", "Qwen3-8B", "a/b/c", "~/nope-xyz/"):
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
      check_source(source)
    assert "hub" not in str(e.value).split("a hub id")[0]


def test_check_all_reports_every_failure(tmp_path):
  def fail(text):
    raise InputError(text)

  with pytest.raises(InputErrors) as e:
    cli.check_all(lambda: fail("model missing"), lambda: 3, lambda: fail("data missing"))
  assert [str(x) for x in e.value.errors] == ["model missing", "data missing"]
  assert cli.check_all(lambda: 1, lambda: 2) == [1, 2]
  (tmp_path / "file").write_text("")
  with pytest.raises(InputError, match="--workdir"):
    cli.check_writable_dir(str(tmp_path / "file" / "run"))
  assert cli.check_writable_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")


def test_compile_cache_location(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.resolve() == str(tmp_path / "diffmas_jax" / "xla")
  assert compile_cache.resolve("off") is None
  assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c")
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.resolve() is None
  assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c")  # the flag wins


def test_exported_directories_get_umask_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    out = write_hf_dir(str(tmp_path / "export"), TINY_CONFIG, {"w": np.zeros(3, np.float32)})
    write_hf_dir(out, TINY_CONFIG, {"w": np.ones(3, np.float32)})  # replacing keeps it too
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  for name in os.listdir(out):
    assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name


def _launch(*args, rc):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", compile_cache.ENV: "off"}
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == rc, proc.stderr[-3000:]
  return proc.stderr


def test_eval_reports_model_and_data_together_without_traceback(tmp_path):
  err = _launch("launch.eval", "--config=configs/eval_arc.py:quick",
                "--config.model.source=./no_such_model", f"--config.eval.data_path={tmp_path}/x.csv",
                "--config.eval.batch_size=-1", f"--workdir={tmp_path}/run", rc=2)
  lines = err.strip().splitlines()
  assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), err
  assert "no_such_model" in err and "x.csv" in err and "batch_size" in err
  assert "Traceback" not in err
  err = _launch("launch.eval", "--config=configs/eval_arc.py:quick", "--verbose",
                "--config.eval.limit=-1", f"--workdir={tmp_path}/run", rc=2)
  assert "Traceback" in err and "error: eval.limit=-1" in err  # --verbose: traceback too


def test_every_eval_config_passes_its_own_checks():
  """eval.batch_size = 0 (the default: picked from the cache budget) is valid; < 0 is not."""
  import importlib

  for name, arg in (("eval_arc", "quick"), ("eval_gsm8k", None), ("gpqa", "quickstart")):
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    cli.check_eval_config(cfg.eval, cfg.agents)
    cfg.eval.batch_size = 0
    cli.check_eval_config(cfg.eval, cfg.agents)
  cfg.eval.batch_size = -1
  with pytest.raises(InputError, match="batch_size=-1 is negative"):
    cli.check_eval_config(cfg.eval, cfg.agents)


def test_misspelt_config_key_is_a_usage_error():
  err = _launch("launch.eval", "--config=configs/eval_arc.py:quick", "--config.eval.limt=3", rc=1)
  assert "Did you mean" in err and "limit" in err and "Traceback" not in err


def test_generate_convert_bench_share_the_error_style(tmp_path):
  err = _launch("launch.generate", "--source=./models/none", "--top_p=2", rc=2)
  assert err.count("error: ") == 2 and "--top_p=2" in err and "Traceback" not in err
  (tmp_path / "f").write_text("")
  err = _launch("launch.convert", f"--out={tmp_path}/f", "--dtype=int3", rc=2)
  assert "not a directory" in err and "--dtype=int3" in err and "Traceback" not in err
  err = _launch("launch.bench", "--suites=core,fast", rc=2)
  assert "error: --suites: unknown suite(s) ['fast']" in err
  for tool, bad in (("bench.bench_train_layout", "--rounds=0"), ("bench.profile_train",
                                                                   "--steps=0")):
    err = _launch(tool, "--train_hf_dir=./no_such_model", bad, rc=2)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "no_such_model" in err and bad in err, err
    assert "Traceback" not in err
  err = _launch("bench.bench_attention", "--chunks=a,0", "--rounds=0", rc=2)
  lines = err.strip().splitlines()
  assert len(lines) == 2 and "--rounds=0" in lines[0] and "--chunks=a,0" in lines[1], err


@pytest.mark.parametrize("launcher", ["probe", "relay"])
def test_probe_and_relay_check_workdir_and_model_first(launcher, tmp_path):
  (tmp_path / "f").write_text("")
  err = _launch(f"launch.{launcher}", f"--config=configs/{launcher}.py:test",
                "--config.model.source=./no_such_model", f"--workdir={tmp_path}/f/run", rc=2)
  lines = err.strip().splitlines()
  assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), err
  assert "--workdir" in err and "no_such_model" in err and "Traceback" not in err


def test_load_reported_prints_one_line_and_keeps_the_inference_layout(tmp_path, capsys):
  from tests.conftest import make_hf_model
  from tests.test_loading import save_tiny_tokenizer
  path = str(tmp_path / "tiny")
  make_hf_model("qwen3").save_pretrained(path)
  save_tiny_tokenizer(path)
  m = cli.load_reported(path, inference=True)
  assert isinstance(m.weights.layers, tuple) and len(m.weights.layers) == m.cfg.num_layers
  out = capsys.readouterr().out
  assert out.startswith(f"loaded {path} (qwen3, 2 layers) in ") and out.count("\n") == 1, out
  trained = cli.load_config_model(SimpleNamespace(source=path, dtype="float32", remat="full"))
  assert trained.cfg.remat == "full" and not isinstance(trained.weights.layers, tuple)
