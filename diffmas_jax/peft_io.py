"""PEFT interop for our LoRA adapters: adapter directories, merged exports, per-agent sets.

A PEFT LoRA adapter is a directory holding `adapter_config.json` and
`adapter_model.safetensors`, with tensors named
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (A: [r, in],
B: [out, r], torch layout, heads flattened the way HF flattens them). Ours are
`model.LoRA` (a: [L, *in, r], b: [L, r, *out], scale = alpha / r). The files
written here load with `peft.PeftModel.from_pretrained(hf_model, dir)`, and
adapters saved by peft's `save_pretrained` load with `load_peft_adapter`; any
option our forward pass does not reproduce (DoRA, rsLoRA, biases, per-layer
ranks, ...) is refused instead of silently changing the model.

Per-agent adapters (`topology.AgentLoRA`) are saved as one PEFT adapter per
upstream role (`<dir>/<role>/`) plus `<dir>/solver/`, so each loads on its own
in peft. Every directory is written atomically (temp dir beside it, then rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import lora as lora_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.io.safetensors_io import _replace_dir
from diffmas_jax.loading import LoadedModel, export_hf_dir
from diffmas_jax.model import PROJ_EQ, LoRA, _num_contracted
from diffmas_jax.params import Weights, layer_specs
from diffmas_jax.topology import AgentLoRA

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOLVER = "solver"  # sub-directory of the solver's adapter in a per-agent set
AGENTS_MANIFEST = "diffmas_agents.json"  # which parts a per-agent set holds

# Our projection -> its module path inside an HF decoder layer.
MODULES = {n: f"{'mlp' if n in ('gate', 'up', 'down') else 'self_attn'}.{lora_lib.HF_NAMES[n]}"
           for n in PROJ_EQ}
_PREFIX = "base_model.model.model.layers"  # what peft writes for *ForCausalLM models
# Also accept adapters made on a bare decoder (no `model.`) or saved without the peft prefix.
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\."
                     r"((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$")
_MODULE_TO_NAME = {m: n for n, m in MODULES.items()}


class AdapterError(ValueError):
  """An adapter does not match the model, or uses a PEFT option we do not implement."""


# ---------------------------------------------------------------------------
# Shapes and checks
# ---------------------------------------------------------------------------


def _io_shapes(cfg: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Input and output dims of projection `name` (per layer), from the weight declarations."""
  shape = layer_specs(cfg)[name].shape
  n_in = _num_contracted(PROJ_EQ[name])
  return shape[:n_in], shape[n_in:]


def _check_lora(cfg: ModelConfig, lora: LoRA, lead: tuple[int, ...] = ()) -> int:
  """Checks targets and shapes against `cfg` (after `lead` extra leading dims); returns r."""
  if not isinstance(lora, LoRA):
    raise AdapterError(f"expected a model.LoRA, got {type(lora).__name__}")
  if set(lora.a) != set(lora.b):
    raise AdapterError(f"LoRA a and b target different projections: {sorted(lora.a)} vs "
                       f"{sorted(lora.b)}")
  if not lora.a:
    raise AdapterError("the LoRA targets no projection; nothing to save")
  unknown = sorted(set(lora.a) - set(PROJ_EQ))
  if unknown:
    raise AdapterError(f"unknown LoRA targets {unknown}; expected names from {tuple(PROJ_EQ)}")
  ranks = {n: lora.a[n].shape[-1] for n in lora.a}
  if len(set(ranks.values())) != 1:
    raise AdapterError(f"PEFT files hold one rank per adapter, but the ranks differ: {ranks}")
  r = next(iter(ranks.values()))
  for n in lora.a:
    ins, outs = _io_shapes(cfg, n)
    want_a, want_b = (*lead, cfg.num_layers, *ins, r), (*lead, cfg.num_layers, r, *outs)
    if tuple(lora.a[n].shape) != want_a or tuple(lora.b[n].shape) != want_b:
      raise AdapterError(f"LoRA {n!r}: a {tuple(lora.a[n].shape)}, b {tuple(lora.b[n].shape)}; "
                         f"expected a {want_a}, b {want_b} for this model config")
  return r


def _resolve_alpha(lora: LoRA, rank: int, alpha: float | None) -> float:
  """alpha from the caller, checked against the adapter's scale (alpha / r), or derived."""
  if alpha is None:
    alpha = lora.scale * rank
    # scale * r is often a float a few ulps off an integer alpha; write the integer.
    return int(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-9) else alpha
  if not math.isclose(alpha / rank, lora.scale, rel_tol=1e-6):
    raise AdapterError(f"alpha={alpha} with r={rank} gives scale {alpha / rank}, but the LoRA "
                       f"was trained with scale {lora.scale} (alpha {lora.scale * rank}); pass "
                       "the alpha it was trained with (--config.lora.alpha)")
  return alpha


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------
# Single adapters
# ---------------------------------------------------------------------------


def lora_to_peft_state_dict(cfg: ModelConfig, lora: LoRA) -> dict[str, np.ndarray]:
  """Our LoRA as PEFT's tensors: {`base_model.model.model.layers.{i}.<module>.lora_A.weight`:
  [r, in], `...lora_B.weight`: [out, r]} (numpy, the adapter's dtype)."""
  r = _check_lora(cfg, lora)
  out: dict[str, np.ndarray] = {}
  for name in PROJ_EQ:
    if name not in lora.a:
      continue
    a, b = _np(lora.a[name]), _np(lora.b[name])
    for i in range(cfg.num_layers):
      key = f"{_PREFIX}.{i}.{MODULES[name]}"
      # Row-major flattening of (H, Dh) matches HF's q/k/v outputs and o_proj input.
      out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  return out


def peft_adapter_config(cfg: ModelConfig, lora: LoRA, rank: int, alpha: float,
                        dropout: float = 0.0, base_model_name_or_path: str = "") -> dict[str, Any]:
  """The adapter_config.json that makes peft rebuild exactly this adapter.

  Every option that changes the computation is written explicitly (rather than
  left to peft's defaults), so a future default change cannot alter the model.
  """
  r = _check_lora(cfg, lora)
  if rank != r:
    raise AdapterError(f"rank={rank}, but the LoRA tensors have rank {r}")
  alpha = _resolve_alpha(lora, r, alpha)
  if not 0.0 <= dropout < 1.0:
    raise AdapterError(f"lora dropout must be in [0, 1), got {dropout}")
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "revision": None,
      "r": r,
      "lora_alpha": alpha,
      "lora_dropout": float(dropout),
      "target_modules": [lora_lib.HF_NAMES[n] for n in PROJ_EQ if n in lora.a],
      "exclude_modules": None,
      "bias": "none",
      "lora_bias": False,
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "init_lora_weights": True,
      "inference_mode": True,
  }


@contextlib.contextmanager
def _atomic_dir(path: str) -> Iterator[str]:
  """Yields a temp directory beside `path` that replaces `path` once the block succeeds.

  Same scheme as `safetensors_io.write_hf_dir` (whose `_replace_dir` does the
  swap): readers see the old directory or the complete new one, never a mix,
  and a failure leaves the old one untouched.
  """
  target = os.path.abspath(path)
  if os.path.lexists(target) and (os.path.islink(target) or not os.path.isdir(target)):
    raise FileExistsError(f"{target} exists and is not a directory; choose another output path.")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
  try:
    yield tmp
    _replace_dir(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_adapter(path: str, cfg: ModelConfig, lora: LoRA, alpha: float | None, dropout: float,
                   base_model: str) -> None:
  from safetensors.numpy import save_file

  r = _check_lora(cfg, lora)
  config = peft_adapter_config(cfg, lora, r, alpha, dropout, base_model)
  os.makedirs(path, exist_ok=True)
  save_file(lora_to_peft_state_dict(cfg, lora), os.path.join(path, ADAPTER_WEIGHTS),
            metadata={"format": "pt"})  # peft/transformers expect torch-format metadata
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)


def save_peft_adapter(directory: str, cfg: ModelConfig, lora: LoRA, *, alpha: float | None = None,
                      dropout: float = 0.0, base_model: str = "") -> str:
  """Writes `lora` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

  Args:
    directory: created, or replaced atomically once the new one is complete.
    cfg: the base model's config (shapes are checked against it).
    lora: the adapter (no leading agent axis).
    alpha: lora_alpha to record; must satisfy alpha / r == lora.scale. None
      derives it from the scale.
    dropout: lora_dropout to record (training metadata; inference ignores it).
    base_model: base_model_name_or_path to record (hub id or path).

  Returns:
    `directory`.
  """
  with _atomic_dir(directory) as tmp:
    _write_adapter(tmp, cfg, lora, alpha, dropout, base_model)
  return directory


def _is_empty(value) -> bool:
  return not value  # None, False, "", [] and {} are all peft's "option off"


# Options whose non-default value changes what the adapter computes.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not implemented",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r)) is not implemented",
    "lora_bias": "LoRA biases are not implemented",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts) does not apply to these models",
    "modules_to_save": "fully trained extra modules cannot be represented by a LoRA",
    "layers_to_transform": "adapters on a subset of layers are not supported",
    "rank_pattern": "per-module ranks are not supported",
    "alpha_pattern": "per-module alphas are not supported",
    "exclude_modules": "excluded modules are not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "parameter (non-module) targets are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "use_qalora": "QALoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values that are forward-changing variants rather than initialisations.
_VARIANT_INITS = ("mica",)


def _targets_from_config(conf: Mapping[str, Any], cfg: ModelConfig, where: str) -> set[str]:
  """Our projection names selected by target_modules, matched the way peft matches them.

  peft matches a string as a regex against each full module name, and a list
  entry as the full name or a dotted suffix of it; peft itself may save the
  list as full per-layer names (e.g. after target_modules="all-linear").
  """
  spec = conf.get("target_modules")
  full = {(n, i): f"model.layers.{i}.{m}" for n, m in MODULES.items()
          for i in range(cfg.num_layers)}
  if isinstance(spec, str):
    if spec == "all-linear":
      return set(PROJ_EQ)
    hits = {key for key, module in full.items() if re.fullmatch(spec, module)}
    if not hits:
      raise AdapterError(f"{where}: target_modules={spec!r} matches none of "
                         f"{sorted(lora_lib.HF_NAMES.values())}")
  elif isinstance(spec, (list, tuple)) and spec:
    hits, unknown = set(), []
    for entry in spec:
      matched = {key for key, module in full.items()
                 if module == entry or module.endswith(f".{entry}")}
      if not matched:
        unknown.append(entry)
      hits |= matched
    if unknown:
      raise AdapterError(f"{where}: target_modules has unknown module(s) {unknown}; only "
                         f"{list(lora_lib.HF_NAMES.values())} of this model's "
                         f"{cfg.num_layers} layers can be represented")
  else:
    raise AdapterError(f"{where}: target_modules={spec!r}; expected a list of module names "
                       f"from {list(lora_lib.HF_NAMES.values())}")
  chosen = {n for n, _ in hits}
  partial = sorted(MODULES[n] for n in chosen
                   if any((n, i) not in hits for i in range(cfg.num_layers)))
  if partial:
    raise AdapterError(f"{where}: target_modules={spec!r} selects {partial} in only some "
                       "layers; adapters on a subset of layers are not supported")
  return chosen


def read_adapter_config(directory: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT adapter directory, or FileNotFoundError saying what is missing."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"PEFT adapter directory not found: {directory}; expected a directory holding "
        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (written by save_peft_adapter or peft's "
        "save_pretrained)")
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: a PEFT adapter directory needs {ADAPTER_CONFIG} "
                            f"next to {ADAPTER_WEIGHTS}")
  with open(path) as f:
    return json.load(f)


def load_peft_adapter(directory: str, cfg: ModelConfig, dtype: Any = jnp.float32) -> LoRA:
  """Reads a PEFT LoRA adapter (ours or peft's own) for a model with config `cfg`.

  Args:
    directory: holds adapter_config.json and adapter_model.safetensors.
    cfg: the base model's config; every tensor's shape is checked against it.
    dtype: dtype of the returned arrays.

  Returns:
    LoRA with scale = lora_alpha / r (dropout left at 0: inference).

  Raises:
    FileNotFoundError: the directory or one of its two files is missing.
    AdapterError (a ValueError): an unsupported option, target module or tensor,
      or ranks / shapes / layer counts that do not match the config.
  """
  conf = read_adapter_config(directory)
  where = os.path.join(directory, ADAPTER_CONFIG)
  weights_file = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights_file):
    hint = (" (found adapter_model.bin: re-save it with peft's save_pretrained("
            "..., safe_serialization=True))"
            if os.path.isfile(os.path.join(directory, "adapter_model.bin")) else "")
    raise FileNotFoundError(f"{weights_file} is missing: a PEFT adapter directory needs "
                            f"{ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}{hint}")

  if conf.get("peft_type", "LORA") != "LORA":
    raise AdapterError(f"{where}: peft_type={conf.get('peft_type')!r}; only LORA is supported")
  problems = [f"{k}={conf[k]!r} ({why})" for k, why in _UNSUPPORTED.items()
              if not _is_empty(conf.get(k))]
  if conf.get("init_lora_weights") in _VARIANT_INITS:
    problems.append(f"init_lora_weights={conf['init_lora_weights']!r} (a LoRA variant that is "
                    "not implemented)")
  if conf.get("bias", "none") != "none":
    problems.append(f"bias={conf['bias']!r} (only 'none' is supported)")
  if problems:
    raise AdapterError(f"{where}: unsupported adapter options: " + "; ".join(problems))
  r, alpha = conf.get("r"), conf.get("lora_alpha")
  if not isinstance(r, int) or r < 1:
    raise AdapterError(f"{where}: r={r!r}; expected a positive integer")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise AdapterError(f"{where}: lora_alpha={alpha!r}; expected a number")
  targets = _targets_from_config(conf, cfg, where)

  from safetensors.numpy import load_file
  try:
    state = load_file(weights_file)
  except Exception as e:  # safetensors raises its own error types
    raise AdapterError(f"could not read {weights_file} ({type(e).__name__}: {e}); the file is "
                       "truncated or not safetensors") from e

  found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  errors = []
  for key, value in state.items():
    m = _KEY_RE.match(key)
    name = _MODULE_TO_NAME.get(m.group(2)) if m else None
    if name is None:
      errors.append(f"{key}: not a LoRA A/B weight of {sorted(MODULES.values())}")
      continue
    layer = int(m.group(1))
    if layer >= cfg.num_layers:
      errors.append(f"{key}: layer {layer}, but the model has {cfg.num_layers} layers")
      continue
    if name not in targets:
      errors.append(f"{key}: {MODULES[name]} is not in target_modules")
      continue
    ins, outs = _io_shapes(cfg, name)
    want = (r, math.prod(ins)) if m.group(3) == "A" else (math.prod(outs), r)
    if tuple(value.shape) != want:
      rank_dim = value.shape[0 if m.group(3) == "A" else -1] if value.ndim == 2 else None
      cause = (f"r={r} in {ADAPTER_CONFIG} but the tensor has rank {rank_dim}"
               if value.ndim == 2 and rank_dim != r else "the model config has other sizes")
      errors.append(f"{key}: shape {tuple(value.shape)}, expected {want} ({cause})")
      continue
    found.setdefault((name, m.group(3)), {})[layer] = value
  missing = [f"{_PREFIX}.{i}.{MODULES[n]}.lora_{ab}.weight" for n in sorted(targets)
             for ab in "AB" for i in range(cfg.num_layers) if i not in found.get((n, ab), {})]
  if missing:
    errors.append(f"missing tensors ({len(missing)}): {missing[:6]}"
                  f"{' ...' if len(missing) > 6 else ''}")
  if errors:
    raise AdapterError(f"{weights_file} does not match {where} and the model config:\n  "
                       + "\n  ".join(errors))

  a, b = {}, {}
  for name in PROJ_EQ:
    if name not in targets:
      continue
    ins, outs = _io_shapes(cfg, name)
    layers = range(cfg.num_layers)
    a[name] = jnp.asarray(np.stack([found[name, "A"][i].T.reshape(*ins, r) for i in layers]),
                          dtype)
    b[name] = jnp.asarray(np.stack([found[name, "B"][i].T.reshape(r, *outs) for i in layers]),
                          dtype)
  return LoRA(a=a, b=b, scale=alpha / r)


# ---------------------------------------------------------------------------
# Merged exports
# ---------------------------------------------------------------------------


def merge_lora(weights: Weights, lora: LoRA) -> Weights:
  """Base weights with W + scale * A @ B folded in (f32 math, cast back to W's dtype).

  Projections the LoRA does not target are returned unchanged (same arrays).
  """
  for name, a in lora.a.items():
    if name not in PROJ_EQ:
      raise AdapterError(f"unknown LoRA target {name!r}; expected names from {tuple(PROJ_EQ)}")
    w = getattr(weights.layers, name)
    if a.ndim != _num_contracted(PROJ_EQ[name]) + 2:
      raise AdapterError(f"LoRA {name!r} has shape {tuple(a.shape)}: a per-agent stacked "
                         "adapter cannot be merged into one set of weights; merge one agent's "
                         "slice (jax.tree.map(lambda x: x[i], lora))")
    if a.shape[:-1] != w.shape[:a.ndim - 1]:
      raise AdapterError(f"LoRA {name!r} a {tuple(a.shape)} does not fit weight {tuple(w.shape)}")
  return lora_lib.merge(weights, lora)


def save_merged_hf_dir(directory: str, model: LoadedModel | tuple, lora: LoRA,
                       max_shard_bytes: int | None = None) -> str:
  """Exports base weights with `lora` merged in as an HF safetensors directory.

  Args:
    directory: output (written atomically by `safetensors_io.write_hf_dir`).
    model: a LoadedModel, or (cfg, weights) / (cfg, weights, tokenizer or None).
    lora: the adapter to fold in.
    max_shard_bytes: shard the weights (see `write_hf_dir`).
  """
  if isinstance(model, LoadedModel):
    m = model
  else:
    cfg, weights, *rest = model
    m = LoadedModel(cfg, weights, rest[0] if rest else None, source="")
  _check_lora(m.cfg, lora)
  merged = dataclasses.replace(m, weights=merge_lora(m.weights, lora))
  return export_hf_dir(merged, directory, max_shard_bytes)


# ---------------------------------------------------------------------------
# Per-agent adapter sets
# ---------------------------------------------------------------------------


def _check_roles(role_names: Sequence[str]) -> list[str]:
  roles = [str(r) for r in role_names]
  bad = [r for r in roles if not r or r.startswith(".") or "/" in r or "\\" in r or r == SOLVER]
  if bad:
    raise AdapterError(f"role names {bad} cannot be adapter directory names (empty, hidden, "
                       f"containing a path separator, or the reserved {SOLVER!r})")
  if len(set(roles)) != len(roles):
    raise AdapterError(f"role names must be unique to get one directory each: {roles}")
  return roles


def save_agent_adapters(directory: str, cfg: ModelConfig, agent_lora: AgentLoRA,
                        role_names: Sequence[str], *, alpha: float | None = None,
                        dropout: float = 0.0, base_model: str = "") -> str:
  """Writes per-agent adapters: `<dir>/<role>/` per upstream agent, `<dir>/solver/`.

  Each sub-directory is a standalone PEFT adapter. A manifest records which
  parts exist (upstream may be None, e.g. DiffMAS final_only). The whole set is
  written atomically.

  Args:
    agent_lora: upstream leaves [A, L, ...] (or None) and the solver's LoRA (or None).
    role_names: the A upstream roles, in agent order.
    alpha, dropout, base_model: as in `save_peft_adapter` (alpha None: from each scale).
  """
  if not isinstance(agent_lora, AgentLoRA):
    raise AdapterError(f"expected a topology.AgentLoRA, got {type(agent_lora).__name__}")
  if agent_lora.upstream is None and agent_lora.solver is None:
    raise AdapterError("the AgentLoRA has neither upstream nor solver adapters; nothing to save")
  # Role names only become directory names when there are upstream adapters to write.
  roles = _check_roles(role_names) if agent_lora.upstream is not None else list(role_names)
  if agent_lora.upstream is not None:
    num = jax.tree.leaves(agent_lora.upstream.a)[0].shape[0]
    if num != len(roles):
      raise AdapterError(f"{num} upstream adapters but {len(roles)} role names {roles}")
    _check_lora(cfg, agent_lora.upstream, lead=(num,))
  if agent_lora.solver is not None:
    _check_lora(cfg, agent_lora.solver)
  with _atomic_dir(directory) as tmp:
    if agent_lora.upstream is not None:
      for i, role in enumerate(roles):
        one = jax.tree.map(lambda x: x[i], agent_lora.upstream)
        _write_adapter(os.path.join(tmp, role), cfg, one, alpha, dropout, base_model)
    if agent_lora.solver is not None:
      _write_adapter(os.path.join(tmp, SOLVER), cfg, agent_lora.solver, alpha, dropout, base_model)
    manifest = {"roles": roles, "upstream": agent_lora.upstream is not None,
                "solver": agent_lora.solver is not None}
    with open(os.path.join(tmp, AGENTS_MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return directory


def _stack(loras: Sequence[LoRA], roles: Sequence[str], directory: str) -> LoRA:
  """One LoRA with a leading agent axis; every role must share targets, rank and alpha."""
  first = loras[0]
  for role, lo in zip(roles[1:], loras[1:]):
    if set(lo.a) != set(first.a):
      raise AdapterError(f"{directory}: role {role!r} targets {sorted(lo.a)} but {roles[0]!r} "
                         f"targets {sorted(first.a)}; per-agent adapters must share targets")
    r0, r = next(iter(first.a.values())).shape[-1], next(iter(lo.a.values())).shape[-1]
    if r != r0 or lo.scale != first.scale:
      raise AdapterError(f"{directory}: role {role!r} has r={r}, scale={lo.scale} but "
                         f"{roles[0]!r} has r={r0}, scale={first.scale}; per-agent adapters "
                         "must share rank and lora_alpha")
  stack = lambda *xs: jnp.stack(xs)
  return LoRA(a=jax.tree.map(stack, *[lo.a for lo in loras]),
              b=jax.tree.map(stack, *[lo.b for lo in loras]), scale=first.scale)


def load_agent_adapters(directory: str, cfg: ModelConfig, role_names: Sequence[str],
                        dtype: Any = jnp.float32) -> AgentLoRA:
  """Reads a set written by `save_agent_adapters` (or assembled by hand from PEFT adapters).

  Without the manifest, the upstream part is present when every role has a
  sub-directory (None when none has), and the solver part when `solver/` exists.
  """
  roles = [str(r) for r in role_names]
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"per-agent adapter directory not found: {directory}; expected "
                            f"one PEFT adapter sub-directory per role ({roles}) and/or {SOLVER}/")
  manifest_file = os.path.join(directory, AGENTS_MANIFEST)
  if os.path.isfile(manifest_file):
    with open(manifest_file) as f:
      manifest = json.load(f)
    if manifest.get("upstream") and list(manifest.get("roles", [])) != roles:
      raise AdapterError(f"{manifest_file}: adapters were saved for roles "
                         f"{manifest.get('roles')}, but roles {roles} were requested")
    has_up, has_solver = bool(manifest.get("upstream")), bool(manifest.get("solver"))
  else:
    present = [r for r in _check_roles(roles) if os.path.isdir(os.path.join(directory, r))]
    if present and len(present) != len(roles):
      missing = [os.path.join(directory, r) for r in roles if r not in present]
      raise FileNotFoundError(f"per-agent adapters missing for role(s): {missing}")
    has_up, has_solver = bool(present), os.path.isdir(os.path.join(directory, SOLVER))
    if not has_up and not has_solver:
      raise FileNotFoundError(f"{directory} holds no adapters: expected sub-directories "
                              f"{roles} and/or {SOLVER}/ (each a PEFT adapter)")
  upstream = None
  if has_up:
    _check_roles(roles)
    loras = [load_peft_adapter(os.path.join(directory, r), cfg, dtype) for r in roles]
    upstream = _stack(loras, roles, directory)
  solver = load_peft_adapter(os.path.join(directory, SOLVER), cfg, dtype) if has_solver else None
  return AgentLoRA(upstream=upstream, solver=solver)


def save_trained_adapters(directory: str, cfg: ModelConfig, adapters: LoRA | AgentLoRA,
                          role_names: Sequence[str], *, alpha: float | None = None,
                          dropout: float = 0.0, base_model: str = "") -> str:
  """Saves what training produced: a shared LoRA as one PEFT adapter in `directory`,
  an AgentLoRA as a per-agent set (see `save_agent_adapters`)."""
  if isinstance(adapters, AgentLoRA):
    return save_agent_adapters(directory, cfg, adapters, role_names, alpha=alpha,
                               dropout=dropout, base_model=base_model)
  if isinstance(adapters, LoRA):
    return save_peft_adapter(directory, cfg, adapters, alpha=alpha, dropout=dropout,
                             base_model=base_model)
  raise AdapterError(f"expected a LoRA or an AgentLoRA, got {type(adapters).__name__}")


def load_trained_adapters(directory: str, cfg: ModelConfig, role_names: Sequence[str],
                          dtype: Any = jnp.float32) -> LoRA | AgentLoRA:
  """Inverse of `save_trained_adapters`: a single adapter directory gives a LoRA."""
  if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
    return load_peft_adapter(directory, cfg, dtype)
  return load_agent_adapters(directory, cfg, role_names, dtype)
