"""What every launcher shares: one error style, early input checks, the compile cache.

  if __name__ == "__main__":
    cli.run(main)          # instead of absl's app.run(main)

- Expected failures (`diffmas_jax.errors.InputError` and the older input
  errors listed in `expected_errors`) print `error: <message>` lines on stderr
  and exit with status 2; `--verbose` prints the traceback too. Anything else
  is a bug and keeps its traceback.
- A misspelt config key (`--config.eval.limt=3`) is absl's usage error with
  ml_collections' suggestion (status 1), not a traceback.
- JAX's persistent compilation cache is on (`--compile_cache`, see
  diffmas_jax/compile_cache.py), so a second run skips compilation.
- `check_all` runs independent checks and reports every failure at once;
  `check_writable_dir` probes a workdir before any work.
- Config-driven launchers (train, eval, probe, relay) declare their flags with
  `define_run_flags`, begin with `start_run` and load with `load_config_model`.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import traceback
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from diffmas_jax import compile_cache
from diffmas_jax.errors import InputError, InputErrors, message

flags.DEFINE_bool("verbose", False, "On an error, also print its traceback.")
flags.DEFINE_string("compile_cache", None,
                    "Persistent XLA compilation cache directory; 'off' disables it (default: "
                    f"${compile_cache.ENV}, else ~/.cache/diffmas_jax/xla).")
FLAGS = flags.FLAGS


def expected_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean bad input (imported lazily: launchers start fast)."""
  from diffmas_jax import checkpoint, config, data, params, sharding
  from launch.runtime import MultihostConfigError
  from diffmas_jax.io.safetensors_io import CheckpointFileError
  from diffmas_jax.loading import ModelNotFoundError
  from diffmas_jax.tasks.records import TaskDataError
  from diffmas_jax.trainer import NonFiniteLossError
  return (InputError, ModelNotFoundError, CheckpointFileError, config.UnsupportedConfigError,
          params.CheckpointMismatchError, checkpoint.CheckpointMismatchError, data.TrainDataError,
          TaskDataError, NonFiniteLossError, FileExistsError, sharding.ShardingError,
          MultihostConfigError)


def run(main: Callable[[list[str]], Any]) -> None:
  """absl's app.run with the shared flag parsing, compile cache and error style."""
  app.run(functools.partial(_guarded, main), flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a config override naming no key is a usage error too."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _usage_error(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: unknown key, with "Did you mean"
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
      e = e.args[0]
    _usage_error("unknown config key " + message(e))
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    _usage_error(message(e))


def _usage_error(text: str) -> None:
  sys.stderr.write(f"FATAL Flags parsing error: {text}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def _guarded(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  compile_cache.enable(FLAGS.compile_cache)
  try:
    if os.environ.get("DIFFMAS_CPU_KERNELS"):  # checked before weights load (imports jax)
      from diffmas_jax import kernels
      kernels.check_setting()
    return main(argv)
  except expected_errors() as e:
    if FLAGS.verbose:
      traceback.print_exc()
    for err in (e.errors if isinstance(e, InputErrors) else [e]):
      print(f"error: {message(err)}", file=sys.stderr)
    sys.exit(2)


def check_all(*checks: Callable[[], Any]) -> list[Any]:
  """Runs every check; returns their results, or raises all expected failures together."""
  results, failures = [], []
  for check in checks:
    try:
      results.append(check())
    except expected_errors() as e:
      failures.extend(e.errors if isinstance(e, InputErrors) else [e])
      results.append(None)
  if failures:
    raise InputErrors(failures) if len(failures) > 1 else failures[0]
  return results


def check_writable_dir(path: str, flag: str = "--workdir") -> str:
  """Creates `path` if needed and writes a probe file in it; remote URLs are left alone."""
  if "://" in path:
    return path
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise InputError(f"cannot write to {path!r} ({e.strerror or type(e).__name__}); pass a "
                     f"directory you can write with {flag}=DIR") from e
  return path


def check_value(ok: bool, text: str) -> None:
  """Raises InputError(text) unless `ok` (a setting out of range, with its fix)."""
  if not ok:
    raise InputError(text)


def as_input_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls fn; a ValueError or KeyError it raises (a bad setting) becomes an InputError."""
  try:
    return fn(*args, **kwargs)
  except expected_errors():
    raise
  except (KeyError, ValueError) as e:
    raise InputError(message(e)) from e


def load_records(eval_cfg: Any, exclude_ids: Any = ()) -> list:
  """The evaluation records of `eval_cfg` (unknown task/split and a negative limit
  are input errors naming their flag)."""
  from diffmas_jax.tasks import load_task

  check_value(int(eval_cfg.limit) >= 0, f"eval.limit={eval_cfg.limit} is negative; use >= 0 "
              "(--config.eval.limit=N; 0 = all items)")
  return as_input_error(load_task, eval_cfg.task, split=eval_cfg.split or None,
                        path=eval_cfg.data_path or None, limit=eval_cfg.limit or None,
                        seed=eval_cfg.seed, exclude_ids=exclude_ids)


def check_eval_config(eval_cfg: Any, agents_cfg: Any) -> None:
  """Eval and agent settings that would otherwise fail late (or deep inside jit)."""
  from diffmas_jax import agents, topology

  positive = lambda key: lambda: check_value(
      int(eval_cfg.get(key, 1)) >= 1,
      f"eval.{key}={eval_cfg.get(key)} must be >= 1 (--config.eval.{key}=...)")
  check_all(lambda: check_value(int(eval_cfg.get("batch_size", 0)) >= 0, f"eval.batch_size="
                                f"{eval_cfg.get('batch_size')} is negative; 0 = picked from "
                                "eval.cache_budget_mb (--config.eval.batch_size=...)"),
            *(positive(k) for k in ("num_samples", "max_new_tokens", "bucket")),
            lambda: check_value(float(eval_cfg.temperature) >= 0, f"eval.temperature="
                                f"{eval_cfg.temperature} is negative; 0 = greedy "
                                "(--config.eval.temperature=...)"),
            lambda: check_value(len(tuple(eval_cfg.methods)) > 0, "no methods to evaluate; set "
                                "--config.eval.methods='(\"single\",\"latent_mas\")'"),
            lambda: check_value(int(agents_cfg.latent_steps) >= 0, "agents.latent_steps="
                                f"{agents_cfg.latent_steps} is negative "
                                "(--config.agents.latent_steps=...)"),
            lambda: as_input_error(topology.TraceSpec, steps=(max(int(agents_cfg.latent_steps), 0),),
                                   topology=agents_cfg.topology, trace_keep=agents_cfg.trace_keep,
                                   position_layout=agents_cfg.position_layout,
                                   trace_cut=agents_cfg.get("trace_cut", "hide")),
            lambda: as_input_error(agents.realign_row_count,
                                   agents_cfg.get("realign_rows", "tokenizer"), 1, 1))


# --- what the config-driven launchers share ---

def define_run_flags(config_help: str, default_workdir: str) -> None:
  """--config (an ml_collections file, locked: a misspelt key fails) and --workdir."""
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", "", f"Run directory (default {default_workdir}).")
  flags.mark_flags_as_required(["config"])


def start_run(default_name: str, *checks: Callable[[], Any], multihost: bool = False
              ) -> tuple[str, list[Any]]:
  """A launcher's start, before any long work; returns (workdir, the checks' results).

  Quiet absl logging; the workdir's writability, the model source and `checks`,
  every failure reported at once (`check_all`); then, with `multihost` (launchers
  that import launch.runtime), the multi-process runtime; then the workdir
  (runs/<default_name> unless --workdir or the config's workdir names one).
  """
  from diffmas_jax.loading import check_source
  from launch import runtime

  logging.set_verbosity(logging.WARNING)
  cfg = FLAGS.config
  workdir = FLAGS.workdir or cfg.workdir
  results = check_all(lambda: check_writable_dir(workdir or f"runs/{default_name}"),
                      lambda: check_source(cfg.model.source), *checks)[2:]
  if multihost:
    runtime.init_runtime(FLAGS.multihost)
  return runtime.make_workdir(workdir, default_name), results


def load_config_model(model_cfg: Any, mesh: Any = None) -> Any:
  """The model of a config's `model` section (source, dtype, remat), optionally onto `mesh`."""
  return load_reported(model_cfg.source, dtype=model_cfg.dtype, remat=model_cfg.remat, mesh=mesh)


def load_reported(source: str, inference: bool = False, **kwargs: Any) -> Any:
  """loading.load_model(source, **kwargs), timed; process 0 prints one line about it.

  `inference`: keep only the per-layer inference layout (model.per_layer), built once.
  """
  import time

  import jax

  from diffmas_jax.loading import load_model
  from diffmas_jax.model import per_layer
  t0 = time.time()
  m = load_model(source, **kwargs)
  if inference:
    m.weights = per_layer(m.weights)
  if jax.process_index() == 0:
    print(f"loaded {source} ({m.cfg.family}, {m.cfg.num_layers} layers) in "
          f"{time.time() - t0:.1f}s", flush=True)
  return m
