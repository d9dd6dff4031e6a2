"""Compile-time plan: will this run fit, and what does it communicate?

Builds the training micro-step and the evaluation pipeline from abstract shapes
(`jax.ShapeDtypeStruct`, no weights read), AOT-compiles them for a mesh and
reads back from XLA, per device: argument / temporary / output bytes
(`memory_analysis`), FLOPs (`cost_analysis`) and the bytes every collective
moves per call (parsed from the compiled HLO, loop bodies multiplied by their
trip counts). `python -m launch.plan` is the front end.

Caveat: XLA:CPU computes bf16 in f32, so its temporaries (and collectives of
converted values) overstate what a TPU/GPU needs; argument bytes are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffmas_jax import agents, data, eval_mesh, lora as lora_lib, sampling, sharding, topology
from diffmas_jax import train as train_lib
from diffmas_jax.config import ModelConfig
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods import latent_mas
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.params import abstract_weights

GiB = 2**30
# Memory per chip (GiB) as sold; the verdict compares the per-device peak with it.
CHIPS: dict[str, float] = {"v5e": 16, "v4": 32, "v5p": 95, "H100": 80, "H200": 141}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass
class CompiledStats:
  """What XLA reports for one compiled program, per device."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float  # matmul FLOPs per call, loop bodies once per trip (from the HLO)
  xla_flops: float  # cost_analysis()["flops"]: loop bodies counted once
  collective_bytes: dict[str, int]  # op kind -> bytes per call (loop trips included)
  collective_count: dict[str, int]  # op kind -> executions per call
  compile_s: float
  unknown_trip_loops: int = 0  # while loops whose trip count XLA did not annotate

  @property
  def peak_bytes(self) -> int:
    """Live at once: inputs + outputs (donated ones counted once) + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def total_collective_bytes(self) -> int:
    return sum(self.collective_bytes.values())

  def fits(self, chip_gib: float) -> bool:
    return self.peak_bytes <= chip_gib * GiB


# ---------------------------------------------------------------- HLO parsing

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LHS_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")


@dataclasses.dataclass
class _Instr:
  name: str
  type: str  # result type text, e.g. "f32[4,8]{1,0}" or "(s32[], f32[4,8])"
  opcode: str
  operands: list[str]  # "%name", or "f32[4,8]{1,0} %name" where HLO prints operand types
  attrs: str  # everything after the operand list


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):
    end = _balanced(rest, 0)
    rtype, rest = rest[:end], rest[end:].lstrip()
  else:
    rtype, _, rest = rest.partition(" ")
  op = rest.find("(")
  if op < 0:
    return None
  end = _balanced(rest, op)
  operands = [o.strip() for o in re.split(r",\s*(?![^\[{(]*[\]})])", rest[op + 1:end - 1])
              if o.strip()]
  return _Instr(name, rtype, rest[:op].strip(), operands, rest[end:])


def _shapes(text: str) -> list[list[int]]:
  return [[int(x) for x in dims.split(",") if x] for _, dims in _SHAPE.findall(text)]


def _shape_bytes(text: str) -> int:
  return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
             for d, dims in _SHAPE.findall(text))


def _split_computations(hlo: str) -> tuple[dict[str, list[_Instr]], str | None]:
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith(" "):
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
    elif line.startswith("}"):
      current = None
    else:
      instr = _parse_instr(line)
      if instr is not None:
        comps[current].append(instr)
  return comps, entry


def _operand_type(operand: str, types: Mapping[str, str]) -> str:
  return types.get(operand.split()[-1].lstrip("%"), operand) if operand else ""


def _dot_flops(ins: _Instr, types: Mapping[str, str]) -> int:
  """2 * |result| * |contracted dims of lhs| for a dot."""
  c = _LHS_CONTRACT.search(ins.attrs)
  result = _shapes(ins.type)
  lhs = _shapes(_operand_type(ins.operands[0], types)) if ins.operands else []
  if not c or not result or not lhs:
    return 0
  contracted = math.prod(lhs[0][int(i)] for i in c.group(1).split(",") if i)
  return 2 * math.prod(result[0]) * contracted


def collective_stats(hlo: str) -> tuple[dict[str, int], dict[str, int], int]:
  """Bytes and executions per collective kind for one call of the HLO module.

  Each op counts the larger of its operand and result sizes (the gathered
  size for all-gather, the input for reduce-scatter), i.e. the data volume
  one device handles; ops inside `while` bodies count once per trip
  (XLA's `known_trip_count`). Also, under the key "dot_flops", the FLOPs of
  every matmul (XLA's cost_analysis counts a loop body once; this counts it
  per trip). Returns (bytes, counts, loops without a trip count).
  """
  comps, entry = _split_computations(hlo)
  types = {ins.name: ins.type for body in comps.values() for ins in body}
  unknown = 0

  @functools.lru_cache(maxsize=None)
  def total(name: str) -> tuple[tuple[str, int, int], ...]:
    nonlocal unknown
    acc: dict[str, list[int]] = {}

    def add(kind, nbytes, count):
      a = acc.setdefault(kind, [0, 0])
      a[0] += nbytes
      a[1] += count

    for ins in comps.get(name, ()):
      op = ins.opcode
      if op == "dot":
        add("dot_flops", _dot_flops(ins, types), 1)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind in COLLECTIVES:
        ob = sum(_shape_bytes(_operand_type(o, types)) for o in ins.operands)
        rb = _shape_bytes(ins.type)
        add(kind, max(ob, rb - ob) if op.endswith("-start") else max(ob, rb), 1)
      trips = 1
      if op == "while":
        m = _TRIP.search(ins.attrs)
        if m:
          trips = int(m.group(1))
        else:
          unknown += 1
      callees = _CALLEE.findall(ins.attrs)
      for b in _BRANCHES.findall(ins.attrs):
        callees += [("branch", c.strip().lstrip("%")) for c in b.split(",") if c.strip()]
      for key, callee in callees:
        factor = trips if key == "body" else 1
        for k, nbytes, count in total(callee):
          add(k, factor * nbytes, factor * count)
    return tuple((k, v[0], v[1]) for k, v in acc.items())

  rows = total(entry) if entry else ()
  return ({k: b for k, b, _ in rows}, {k: c for k, _, c in rows}, unknown)


def compile_stats(name: str, lower: Callable[[], Any]) -> CompiledStats:
  """Compiles `lower()` (a jax Lowered of abstract args); XLA's numbers per device."""
  t0 = time.perf_counter()
  compiled = lower().compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  nbytes, counts, unknown = collective_stats(compiled.as_text())
  dot_flops = nbytes.pop("dot_flops", 0)
  counts.pop("dot_flops", None)
  return CompiledStats(name=name, argument_bytes=int(mem.argument_size_in_bytes),
                       output_bytes=int(mem.output_size_in_bytes),
                       alias_bytes=int(mem.alias_size_in_bytes),
                       temp_bytes=int(mem.temp_size_in_bytes),
                       flops=float(dot_flops),
                       xla_flops=float((cost or {}).get("flops", float("nan"))),
                       collective_bytes=nbytes, collective_count=counts, compile_s=seconds,
                       unknown_trip_loops=unknown)


# ----------------------------------------------------------- abstract inputs

def model_shapes(source: str, dtype: str = "bfloat16", remat: str = "none"
                 ) -> ModelConfig | None:
  """ModelConfig without weights: a preset name (or a hub id / embedded model
  named like one), a config.json, or an HF directory; None if unknown."""
  from diffmas_jax.config import PRESETS
  name = "smollm2-135m" if source.startswith("embedded:") else source.split("/")[-1].lower()
  if name in PRESETS:
    return PRESETS[name].replace(dtype=dtype, remat=remat)
  path = os.path.join(source, "config.json") if os.path.isdir(source) else source
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return ModelConfig.from_hf(json.load(f), dtype=dtype, remat=remat)


@dataclasses.dataclass(frozen=True)
class Workload:
  """The shapes a run compiles for (from the config; no data read)."""

  steps: tuple[int, ...]  # latent steps per upstream agent
  prompt_tokens: int  # every agent's and the solver's prompt width
  target_tokens: int
  batch_size: int  # examples per micro-step (per call, global)
  grad_accum: int
  grad_mode: str = "shared"
  remat_stages: bool = True
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
  eval_batch: int = 8
  eval_new_tokens: int = 512
  topology: str = "sequential"

  @classmethod
  def from_config(cls, cfg: Any, model_cfg: ModelConfig | None = None) -> "Workload":
    """`model_cfg` resolves `eval.batch_size = 0` (picked from the cache budget, as
    evaluation does, for prompts train.max_prompt_tokens wide); without it, 8."""
    from diffmas_jax import eval_batch, prompts
    roles = prompts.roles_from_config(cfg.agents)
    batch = int(cfg.eval.batch_size)
    if batch == 0:
      batch = 8 if model_cfg is None else eval_batch.budget_batch_size(
          model_cfg, int(cfg.train.max_prompt_tokens), cfg.eval, cfg.agents)
    return cls(steps=tuple(r.latent_steps for r in roles),
               prompt_tokens=int(cfg.train.max_prompt_tokens),
               target_tokens=int(cfg.train.max_target_tokens),
               batch_size=int(cfg.train.batch_size), grad_accum=int(cfg.train.grad_accum),
               grad_mode=cfg.train.grad_mode, remat_stages=bool(cfg.train.remat_stages),
               lora=lora_lib.LoraConfig.from_config(cfg.lora),
               eval_batch=batch, eval_new_tokens=int(cfg.eval.max_new_tokens),
               topology=cfg.agents.topology)

  @property
  def spec(self) -> topology.TraceSpec:
    return topology.TraceSpec(steps=self.steps, topology=self.topology)


def _sds(shape, dtype, sh):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sh)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)


def abstract_batch(w: Workload, batch: int, targets: bool = True) -> PipelineBatch:
  a, t = len(w.steps), w.prompt_tokens
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  b8 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)
  return PipelineBatch(i32(a, batch, t), b8(a, batch, t), i32(batch, t), b8(batch, t),
                       i32(batch, w.target_tokens) if targets else None,
                       b8(batch, w.target_tokens) if targets else None)


def train_program(cfg: ModelConfig, w: Workload, mesh, rules, batch: int):
  """`lower()` of the jitted micro-step on abstract args, built as the trainer builds it."""
  spec = w.spec
  replicated = NamedSharding(mesh, P())
  optimizer, schedule = train_lib.make_optimizer(_OptCfg(w.grad_accum), 16)
  weights = _with_shardings(abstract_weights(cfg), sharding.weight_shardings(cfg, mesh, rules))
  params = jax.eval_shape(lambda: train_lib.init_params(cfg, w.lora, w.grad_mode, spec.num_agents,
                                                        jax.random.key(0)))
  state = jax.eval_shape(lambda p: train_lib.init_state(p, optimizer, 0), params)
  state_sh = jax.tree.map(lambda _: replicated, state)
  b = abstract_batch(w, batch)
  batch_sh = sharding.batch_shardings(mesh, b, rules)
  cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, spec.length(w.prompt_tokens)))
  cache_sh = sharding.cache_shardings(cache, mesh, rules)
  realigner = jax.eval_shape(lambda: agents.Realigner(jnp.zeros((cfg.hidden_size,) * 2),
                                                      jnp.zeros(())))
  sc = train_lib.StepConfig(cfg, spec, w.grad_mode, w.remat_stages, w.lora.dropout, mesh=mesh,
                            rules=sharding.rule_pairs(rules))
  fn = train_lib.make_train_step(
      optimizer, schedule, sc,
      shardings=dict(state=state_sh, weights=sharding.weight_shardings(cfg, mesh, rules),
                     cache=cache_sh, batch=batch_sh, realigner=replicated, replicated=replicated))
  args = (_with_shardings(state, state_sh), weights, _with_shardings(cache, cache_sh),
          _with_shardings(b, batch_sh), _with_shardings(realigner, jax.tree.map(
              lambda _: replicated, realigner)))
  return functools.partial(fn.lower, *args)


@dataclasses.dataclass(frozen=True)
class _OptCfg:
  """The optimizer fields make_optimizer reads (values do not change shapes)."""

  grad_accum: int
  lr: float = 5e-5
  warmup_ratio: float = 0.03
  final_lr_ratio: float = 0.0
  max_grad_norm: float = 1.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999


def eval_program(cfg: ModelConfig, w: Workload, mesh, rules, batch: int):
  """`lower()` of the jitted latent pipeline (trace + solver prefill + decode)."""
  spec = w.spec
  replicated = NamedSharding(mesh, P())
  sc = sampling.SamplingConfig(max_new_tokens=w.eval_new_tokens, temperature=0.6, top_p=0.95,
                               stop_ids=(0,))
  weights = _with_shardings(abstract_weights(cfg), sharding.weight_shardings(cfg, mesh, rules))
  b = abstract_batch(w, batch, targets=False)
  b = _with_shardings(b, sharding.batch_shardings(mesh, b, rules))
  capacity = spec.length(w.prompt_tokens) + w.prompt_tokens + w.eval_new_tokens
  cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, capacity))
  cache = _with_shardings(cache, sharding.cache_shardings(cache, mesh, rules))
  lora = jax.eval_shape(lambda: lora_lib.init_lora(cfg, w.lora, jax.random.key(0)))
  rep = lambda tree: jax.tree.map(lambda x: _sds(x.shape, x.dtype, replicated), tree)
  realigner = rep(jax.eval_shape(lambda: agents.Realigner(jnp.zeros((cfg.hidden_size,) * 2),
                                                          jnp.zeros(()))))
  key = jax.eval_shape(lambda: jax.random.key(0))
  return functools.partial(latent_mas.trace_and_decode.lower, weights, cfg, cache, b, realigner,
                           key, rep(lora), sc=sc, spec=spec)


# ------------------------------------------------------------------ planning

@dataclasses.dataclass
class MeshPlan:
  mesh: dict[str, int]
  parallelism: str
  batch: int  # per-call global batch
  grad_accum: int
  train: CompiledStats | None = None
  eval: CompiledStats | None = None
  error: str | None = None
  eval_mesh: dict[str, int] | None = None  # one host's block of `mesh` (eval_mesh.host_block)


def plan_mesh(cfg: ModelConfig, w: Workload, sizes: Mapping[str, int], parallelism: str,
              devices=None, with_eval: bool = True, rules=sharding.DEFAULT_RULES,
              local_devices: int | None = None) -> MeshPlan:
  """Compiles the micro-step for one mesh, and the eval pipeline for the block of it that
  one host of `local_devices` devices evaluates on (None: the whole mesh)."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    mesh = sharding.make_mesh(**sizes, devices=devices)
    host = eval_mesh.host_block(mesh, local_devices) if with_eval else None
    shards, axes = sharding.batch_shards(mesh, rules)
    # The trainer's own rule, so the plan compiles the batch training would run.
    batch_plan = data.plan_batches(w.batch_size, w.grad_accum, shards, axes)
    batch, accum = batch_plan.per_call, batch_plan.grad_accum
    out = MeshPlan(dict(mesh.shape), parallelism, batch, accum)
    out.train = compile_stats("train", train_program(cfg, w, mesh, rules, batch))
    if with_eval:
      out.eval_mesh = dict(host.shape)
      eval_batch = eval_mesh.padded_rows(w.eval_batch, host)  # as evaluation pads it
      out.eval = compile_stats("eval", eval_program(cfg, w, host, rules, eval_batch))
    return out
  except (sharding.ShardingError, data.TrainDataError) as e:
    return MeshPlan(dict(sizes), parallelism, w.batch_size, w.grad_accum, error=str(e))


def candidate_meshes(n: int, cfg: ModelConfig, local_devices: int = 8) -> list[dict[str, int]]:
  """(data, fsdp, tensor) factorisations of n worth compiling.

  Tensor parallelism stays inside a host (at most `local_devices`) and must
  divide the KV heads; FSDP and data take the rest.
  """
  out = []
  for t in range(1, min(n, local_devices) + 1):
    if n % t or cfg.num_kv_heads % t or cfg.num_heads % t or cfg.intermediate_size % t:
      continue
    rest = n // t
    for f in range(1, rest + 1):
      if rest % f == 0:
        out.append(dict(data=rest // f, fsdp=f, tensor=t))
  return out


def best(plans: list[MeshPlan], chip_gib: float) -> MeshPlan | None:
  """The mesh that fits the chip with the least collective bytes per micro-step."""
  ok = [p for p in plans if p.train and p.train.fits(chip_gib)
        and (p.eval is None or p.eval.fits(chip_gib))]
  return min(ok, key=lambda p: (p.train.total_collective_bytes, p.train.peak_bytes),
             default=None)


def gib(x: float) -> str:
  return f"{x / GiB:.2f}"


def fits_text(stats: list[CompiledStats]) -> str:
  ok = [c for c, g in CHIPS.items() if all(s.fits(g) for s in stats)]
  return ", ".join(ok) if ok else "none"


def report(p: MeshPlan) -> str:
  """Human-readable lines for one mesh."""
  mesh = "x".join(f"{k}={v}" for k, v in p.mesh.items())
  head = f"mesh {mesh} ({p.parallelism}), per-call batch {p.batch} x accumulation {p.grad_accum}"
  if p.error:
    return f"{head}\n  does not compile: {p.error}"
  lines = [head]
  if p.eval and p.eval_mesh != p.mesh:
    lines.append("  eval on one host's block " + "x".join(f"{k}={v}" for k, v in p.eval_mesh.items()))
  for s in (p.train, p.eval):
    if s is None:
      continue
    coll = ", ".join(f"{k} {gib(v)} ({s.collective_count[k]}x)"
                     for k, v in sorted(s.collective_bytes.items())) or "none"
    lines.append(
        f"  {s.name}: per device arguments {gib(s.argument_bytes)} GiB, temporaries "
        f"{gib(s.temp_bytes)} GiB, outputs {gib(s.output_bytes)} GiB (aliased "
        f"{gib(s.alias_bytes)}), peak {gib(s.peak_bytes)} GiB; {s.flops / 1e12:.2f} TFLOP (matmuls); "
        f"collectives {gib(s.total_collective_bytes)} GiB per call [{coll}]; "
        f"compile {s.compile_s:.1f} s")
    if s.unknown_trip_loops:
      lines.append(f"    ({s.unknown_trip_loops} loop(s) without a known trip count counted once)")
    fits = {c: s.fits(g) for c, g in CHIPS.items()}
    lines.append("    fits: " + ", ".join(f"{c} {g:g} GiB {'yes' if fits[c] else 'no'}"
                                           for c, g in CHIPS.items()))
  return "\n".join(lines)
