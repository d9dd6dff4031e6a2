"""The DiffMAS training job: data -> jitted, sharded steps -> checkpoints -> adapters.

`run_training(cfg, model, workdir)` is what `python -m launch.train` calls
after loading the model. Re-running it with the same config and workdir resumes
from the latest finished checkpoint and ends with the same adapters as an
uninterrupted run; a finished run returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from diffmas_jax import ablations, agents, c2c, checkpoint, data, lora as lora_lib, multihost
from diffmas_jax import model as model_lib, paths, prompts
from diffmas_jax import sharding, topology
from diffmas_jax import train as train_lib
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.loading import LoadedModel
from diffmas_jax.logging_utils import MetricsLogger, plot_loss_curve
from diffmas_jax.tasks import training_data

log = logging.getLogger(__name__)

# Test hook: SIGKILL ourselves right after starting the save of this micro-step
# (the save is asynchronous, so the kill lands mid-save).
KILL_AFTER_SAVE_ENV = "DIFFMAS_TEST_KILL_AFTER_SAVE"


class NonFiniteLossError(RuntimeError):
  """Training stopped on a NaN/inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  params: Any  # trained adapters (train.Params)
  updates: int
  micro_steps: int
  excluded_eval_ids: frozenset[str]
  metrics_path: str
  loss_png: str | None


def training_examples(train_cfg: Any) -> tuple[list[training_data.TrainExample], frozenset[str]]:
  """The configured recipe's examples, and ids to exclude from evaluation."""
  kind, n, seed = train_cfg.data, train_cfg.num_examples, train_cfg.data_seed
  if kind == "math":
    return training_data.math_train(n, seed), frozenset()
  if kind == "humaneval":
    return training_data.humaneval_train(n, seed)
  if kind == "commonsenseqa":
    return training_data.commonsenseqa_train(n, seed), frozenset()
  if kind == "jsonl":
    if not train_cfg.data_path:
      raise data.TrainDataError("train.data='jsonl' needs --config.train.data_path=FILE.jsonl")
    examples = training_data.jsonl_pairs(train_cfg.data_path)
    return (examples[:n] if n else examples), frozenset()
  raise data.TrainDataError(f"train.data={kind!r}; expected math, humaneval, commonsenseqa or "
                            "jsonl")


def fingerprint(cfg: Any, model: LoadedModel, plan: data.BatchPlan | None = None) -> dict:
  """What must not change between a run and its resumption; also the batch split
  when the mesh changed it (a checkpoint's micro-step counts calls of
  `plan.per_call` examples), so runs on unchanged splits keep their fingerprint."""
  # method=diffmas is left out so workdirs from before the ablations still resume.
  keep = {k: cfg.train[k] for k in cfg.train if not (k == "method" and cfg.train[k] == "diffmas")}
  split = None
  if plan is not None and (plan.per_call, plan.grad_accum) != plan.configured:
    split = dict(per_call=plan.per_call, grad_accum=plan.grad_accum)
  return json.loads(json.dumps(dict(model=model.source, dtype=model.cfg.dtype, train=keep,
                                    lora=cfg.lora.to_dict(), agents=cfg.agents.to_dict(),
                                    mesh=cfg.mesh.to_dict(), **ablations.fingerprint_extra(cfg),
                                    **({"batch_split": split} if split else {})), default=str))


@dataclasses.dataclass(frozen=True)
class _AccumView:
  """The train config as the optimizer sees it, with the plan's accumulation."""

  cfg: Any
  grad_accum: int = 0

  def __getattr__(self, name):
    return getattr(self.cfg, name)


def _batch_axis(ndim: int) -> int:
  return 1 if ndim == 3 else 0  # agents' arrays are [A, B, T]


def _global_batch(encoded: data.EncodedExamples, idx: np.ndarray, shardings: Any) -> Any:
  """Global batch of examples `idx` on the mesh; each process builds (and
  tokenises into arrays) only the rows its own devices hold."""
  built: dict[tuple, list] = {}

  def rows(sl: slice) -> list:
    key = (sl.start, sl.stop, sl.step)
    if key not in built:
      built[key] = jax.tree.leaves(encoded.take(idx[sl]))
    return built[key]

  template = encoded.take(idx[:1])
  leaves, treedef = jax.tree.flatten(template)
  out = []
  for i, (leaf, sh) in enumerate(zip(leaves, jax.tree.leaves(shardings))):
    b = _batch_axis(leaf.ndim)
    shape = leaf.shape[:b] + (len(idx),) + leaf.shape[b + 1:]

    def one_shard(index, i=i, b=b):
      rest = tuple(slice(None) if d == b else s for d, s in enumerate(index))
      return rows(index[b])[i][rest]
    out.append(jax.make_array_from_callback(shape, sh, one_shard))
  return jax.tree.unflatten(treedef, out)


def _rows_per_process(shardings: Any, per_call: int) -> int:
  """Batch rows this process's devices hold (what `_global_batch` builds here)."""
  sh = jax.tree.leaves(shardings)[-1]  # a [B, U] target array
  rows = set()
  for index in sh.addressable_devices_indices_map((per_call, 1)).values():
    rows.update(range(*index[0].indices(per_call)))
  return len(rows)


def _probe_loss_fn(tc, cfg, spec, encoded, batch_sh, weights, make_cache, realigner, per_call,
                   objective=None):
  """params -> mean loss on the first `tc.probe_examples` examples, or None.

  Runs in micro-batches of the training shape (same shardings; the last one
  wraps around to fill it), without dropout.
  """
  n = min(int(tc.probe_examples), len(encoded))
  if n <= 0:
    return None
  chunks = [_global_batch(encoded, np.arange(i, i + per_call) % n, batch_sh)
            for i in range(0, n, per_call)]
  # Weights and realigner are arguments, not closed over: jit would bake them
  # into the program as constants.
  if objective is not None:  # evaluation behaviour: no dropout, hard C2C gates
    loss = jax.jit(lambda params, weights, batch, cache, realigner: objective(
        params, weights, cache, batch, realigner, None, None)[0])
  else:
    loss = jax.jit(lambda params, weights, batch, cache, realigner: train_lib.loss_fn(
        params, weights, cfg, cache, batch, realigner, spec, tc.grad_mode, remat=False)[0])
  compiled = []

  def probe(params):
    if not compiled:
      compiled.append(_compiled(loss, params, weights, chunks[0], make_cache(), realigner))
    return float(np.mean([compiled[0](params, weights, c, make_cache(), realigner)
                          for c in chunks]))
  return probe


def _compiled(fn, *args):
  """`fn` compiled ahead of time for these arguments, once every process has
  compiled it: a first device collective waits only ~30 s for its peers
  (gloo on CPU), while compile times may differ by minutes between hosts."""
  out = fn.lower(*args).compile()
  multihost.barrier("compiled")
  return out


def train_layout(weights, shardings, replicated: NamedSharding):
  """(weights, their shardings) for the train step: per-layer buffers
  (model.per_layer) when no weight is split over devices, else unchanged.

  The latent steps' matrix-vector products (forward, recomputed and backward)
  then read each layer's weights where they lie instead of XLA:CPU copying the
  layer's slice out of the stack first (docs/performance.md). Weights split over
  devices (tensor parallel, FSDP) keep the stacked layout their shardings describe.
  """
  if not all(a.sharding.is_fully_replicated for a in jax.tree.leaves(weights)):
    return weights, shardings
  # Not packed (kernels.PackedMatrix): the kernel is forward-only and its backward runs as
  # XLA products over the panels; training keeps the layout its benchmarks measured.
  weights = jax.device_put(model_lib.per_layer(weights, packed=False), replicated)
  return weights, jax.tree.map(lambda _: replicated, weights)


def run_training(cfg: Any, model: LoadedModel, workdir: str, mesh: jax.sharding.Mesh,
                 show_progress: bool = True) -> TrainResult:
  """Trains the configured adapters; resumable (see module docstring)."""
  tc = cfg.train
  train_lib.check_grad_mode(tc.grad_mode)
  method = ablations.check_method(tc.get("method", "diffmas"), tc.grad_mode)
  lora_cfg = lora_lib.LoraConfig.from_config(cfg.lora)
  roles = prompts.roles_from_config(cfg.agents)
  spec = topology.TraceSpec(steps=tuple(r.latent_steps for r in roles),
                            topology=cfg.agents.topology, trace_keep=cfg.agents.trace_keep,
                            position_layout=cfg.agents.position_layout,
                            trace_cut=cfg.agents.get("trace_cut", "hide"))
  examples, excluded = training_examples(tc)
  notes = None
  if method == "textmas_sft":  # the upstream agents' text, decoded once by the frozen model
    notes = ablations.textmas_notes(model, examples, cfg.agents, cfg.eval,
                                    f"{workdir}/textmas_notes.jsonl")
  encoded = data.encode_examples(
      model.tokenizer, examples, roles, max_prompt_tokens=tc.max_prompt_tokens,
      max_target_tokens=tc.max_target_tokens, on_overlong=tc.on_overlong,
      solver_text=prompts.solver_text(cfg.agents),
      template_kwargs=prompts.template_kwargs(model.tokenizer, cfg.agents.enable_thinking),
      solver_previous=notes)
  shards, shard_axes = sharding.batch_shards(mesh)
  plan = data.plan_batches(tc.batch_size, tc.grad_accum, shards, shard_axes)
  total_micro = data.num_micro_steps(len(encoded), tc.epochs, plan.per_call, plan.grad_accum)
  total_updates = total_micro // plan.grad_accum
  optimizer, schedule = train_lib.make_optimizer(_AccumView(tc, plan.grad_accum), total_updates)

  # Shardings: weights by their logical axes, batch over (data, fsdp), the rest replicated.
  replicated = NamedSharding(mesh, P())
  sample = encoded.take(np.arange(plan.per_call) % len(encoded))
  batch_sh = sharding.batch_shardings(mesh, sample)
  capacity = ablations.capacity(method, sample, spec)
  cache_sh = sharding.cache_shardings(KVCache.init(model.cfg, plan.per_call, 1), mesh)
  multihost.barrier("weights_loaded")  # the first cross-process transfers follow
  # A no-op (same arrays) when the model was loaded with load_model(..., mesh=mesh), as the
  # launcher does; otherwise a copy the caller holds elsewhere stays alive beside this one.
  weights_sh = sharding.weight_shardings(model.cfg, mesh)
  weights = sharding.shard(model.weights, weights_sh)
  weights, weights_sh = train_layout(weights, weights_sh, replicated)
  model.weights = weights  # keep one copy: every later consumer takes either layout
  rows = agents.realign_row_count(cfg.agents.get("realign_rows", "tokenizer"),
                                  getattr(model.tokenizer, "vocab_size", None),
                                  model.cfg.vocab_size)
  realigner = jax.device_put(agents.make_realigner(weights, cfg.agents.realign_lambda,
                                                   cfg.agents.realign, rows), replicated)
  fuser_cfg = c2c.FuserConfig.from_config(cfg.c2c, total_micro) if method == "c2c" else None
  params = ablations.init_params(method, model.cfg, lora_cfg, tc.grad_mode, spec.num_agents,
                                 jax.random.key(tc.seed), fuser_cfg)
  state = jax.device_put(train_lib.init_state(params, optimizer, tc.seed), replicated)
  state_sh = jax.tree.map(lambda _: replicated, state)
  step_cfg = train_lib.StepConfig(model.cfg, spec, tc.grad_mode, tc.remat_stages,
                                  lora_cfg.dropout, mesh=mesh)
  objective = None
  if method != "diffmas":
    objective = ablations.objective(method, step_cfg, fuser_cfg)
    step_cfg = dataclasses.replace(step_cfg, objective=objective)
  step_fn = train_lib.make_train_step(
      optimizer, schedule, step_cfg,
      shardings=dict(state=state_sh, weights=weights_sh,
                     cache=cache_sh, batch=batch_sh, realigner=replicated,
                     replicated=replicated))
  make_cache = jax.jit(lambda: KVCache.init(model.cfg, plan.per_call, capacity,
                                            weights.embed.dtype), out_shardings=cache_sh)
  probe = _probe_loss_fn(tc, model.cfg, spec, encoded, batch_sh, weights, make_cache, realigner,
                         plan.per_call, objective)

  ckpt = checkpoint.Checkpointer(str(paths.as_path(workdir) / "checkpoints"),
                                 cfg.checkpoint.every_updates * plan.grad_accum,
                                 cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save)
  fp = fingerprint(cfg, model, plan)
  restored = ckpt.restore(checkpoint.abstract_like(state), fp)
  if restored is not None:
    state, _ = restored
    log.info("resuming at micro-step %d of %d", int(state.step), total_micro)
  start = int(state.step)
  metrics_log = MetricsLogger(workdir)
  kill_at = int(os.environ.get(KILL_AFTER_SAVE_ENV, "-1"))
  if multihost.is_main():
    print(plan.describe(shard_axes, _rows_per_process(batch_sh, plan.per_call)
                        if jax.process_count() > 1 else None))
    what = (f"the C2C fuser (hidden {fuser_cfg.hidden}" if method == "c2c" else
            f"{method if method != 'diffmas' else tc.grad_mode} adapters (r={lora_cfg.rank}, "
            f"alpha={lora_cfg.alpha}")
    print(f"training {what}, {lora_lib.num_params(params):,} parameters) on {len(encoded)} "
          "examples: "
          f"{total_updates} updates x {plan.grad_accum} micro-steps of {plan.per_call}; "
          f"trace {spec.length(tc.max_prompt_tokens)} slots + solver "
          f"{tc.max_prompt_tokens} + target {tc.max_target_tokens}")

  window: list[dict] = []
  bar = tqdm(total=total_micro, initial=start, unit="step", desc="train",
             disable=not show_progress or jax.process_index() != 0)
  bar.set_postfix_str("compiling ...", refresh=True)  # the first step compiles (or loads) the step
  if probe and start == 0:
    metrics_log.log(0, probe_loss=probe(state.params))
  t_window = time.perf_counter()
  for micro in range(start, total_micro):
    idx = data.micro_batch_indices(len(encoded), plan.per_call, micro, tc.data_seed, tc.shuffle)
    batch = _global_batch(encoded, idx, batch_sh)
    if micro == start:
      step_fn = _compiled(step_fn, state, weights, make_cache(), batch, realigner)
    state, metrics = step_fn(state, weights, make_cache(), batch, realigner)
    metrics = jax.device_get(metrics)
    if not math.isfinite(float(metrics["loss"])):
      ckpt.wait()
      last = ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss ({metrics['loss']}) at micro-step {micro} (examples "
          f"{[encoded.ids[i] for i in idx]}); stopped without saving. The last good checkpoint "
          f"is {'none' if last is None else f'micro-step {last}'} in {ckpt.directory}; "
          "rerunning the same command resumes from it. To retry with a lower "
          "--config.train.lr (or other data), use a new --workdir: a changed config "
          "never continues an old run's checkpoints.")
    window.append(metrics)
    bar.update(1)
    if micro == start:
      bar.set_postfix_str("")
    done = micro + 1
    if metrics["applied"]:
      update = done // plan.grad_accum
      seconds = time.perf_counter() - t_window
      loss = float(np.mean([m["loss"] for m in window]))
      tokens = float(np.sum([m["target_tokens"] for m in window]))
      row = metrics_log.log(update, loss=loss, perplexity=math.exp(min(loss, 50.0)),
                            token_accuracy=float(np.mean([m["token_accuracy"] for m in window])),
                            grad_norm=float(np.mean([m["grad_norm"] for m in window])),
                            lr=float(metrics["lr"]), micro_step=done,
                            target_tokens_per_s=tokens / max(seconds, 1e-9))
      if probe:
        metrics_log.log(update, probe_loss=probe(state.params))
      bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
      window, t_window = [], time.perf_counter()
    if ckpt.should_save(done) or done == total_micro:
      ckpt.save(done, state, {"fingerprint": fp, "micro_step": done, "updates":
                              done // plan.grad_accum, "examples_seen": done * plan.per_call})
      if done == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  ckpt.close()
  png = None
  if multihost.is_main() and paths.as_path(metrics_log.path).exists():
    png = plot_loss_curve(metrics_log.path, str(paths.as_path(workdir) / "loss.png"),
                          also=("probe_loss",))
  return TrainResult(params=jax.device_get(state.params), updates=total_updates,
                     micro_steps=total_micro, excluded_eval_ids=excluded,
                     metrics_path=metrics_log.path, loss_png=png)
