"""Training examples -> fixed-width pipeline batches, in a resumable order.

Every example is tokenised once into fixed widths (`max_prompt_tokens` for each
agent's and the solver's prompt, `max_target_tokens` for the target), so the
train step compiles once. The order is a pure function of (seed, micro-step):
epoch e visits the examples in `permutation(seed + e)`, and micro-step i takes
the next `batch_size` of that endless stream. The data-iterator position that
checkpoints store is therefore just the micro-step count.

Overlong inputs (`train.on_overlong`): "truncate" cuts a target to its first
`max_target_tokens` tokens (its end-of-sequence token is then lost) and drops an
example whose prompt does not fit, with one warning counting both; "error"
refuses the run, naming the first such example and the setting to raise.

Batch arithmetic (`plan_batches`): the configured update (`batch_size` x
`grad_accum`, the paper's 1 x 64) is kept on any mesh. When `batch_size` is not
a multiple of the devices the batch is split over, each jitted call takes the
smallest multiple that divides the update and accumulation shrinks to match
(1 x 64 on data x fsdp = 8 runs as 8 x 8); an update that cannot be split is
refused with the valid sizes. Micro-step i still takes the next examples of the
same stream, so every update sees the same examples whatever the mesh.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from diffmas_jax import prompts
from diffmas_jax.methods.base import encode_chats, pad_left_to
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.tasks import Record
from diffmas_jax.tasks.training_data import TrainExample

log = logging.getLogger(__name__)

ON_OVERLONG = ("truncate", "error")


class TrainDataError(ValueError):
  """Training data that cannot be used as configured."""


@dataclasses.dataclass
class EncodedExamples:
  """All examples, fixed widths: agents [N, A, T], solver [N, T], targets [N, U]."""

  agent_tokens: np.ndarray
  agent_valid: np.ndarray
  solver_tokens: np.ndarray
  solver_valid: np.ndarray
  target_tokens: np.ndarray
  target_valid: np.ndarray
  ids: list[str]
  truncated_targets: int = 0
  dropped_prompts: int = 0

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, index: np.ndarray) -> PipelineBatch:
    """PipelineBatch of examples `index` (agents' axis first: [A, B, T])."""
    return PipelineBatch(agent_tokens=np.swapaxes(self.agent_tokens[index], 0, 1),
                         agent_valid=np.swapaxes(self.agent_valid[index], 0, 1),
                         solver_tokens=self.solver_tokens[index],
                         solver_valid=self.solver_valid[index],
                         target_tokens=self.target_tokens[index],
                         target_valid=self.target_valid[index])


def as_record(example: TrainExample) -> Record:
  return Record(id=example.id, question=example.question, family=example.family, gold="")


def encode_examples(tokenizer, examples: Sequence[TrainExample],
                    roles: Sequence[prompts.AgentRole], *, max_prompt_tokens: int,
                    max_target_tokens: int, on_overlong: str = "truncate",
                    solver_text: str | None = None, template_kwargs: dict | None = None,
                    solver_previous: Sequence[Sequence[tuple[str, str]]] | None = None
                    ) -> EncodedExamples:
  """Tokenises agent prompts, solver prompt and target (+ eos) at fixed widths.

  `solver_previous`: per example, [(role, text)] notes for the solver's prompt
  (TextMAS+SFT: the upstream agents' fixed text); default none (latent trace).
  """
  if on_overlong not in ON_OVERLONG:
    raise TrainDataError(f"train.on_overlong={on_overlong!r}; expected one of {ON_OVERLONG}")
  if not examples:
    raise TrainDataError("no training examples: the training data is empty "
                         "(check --config.train.data and its path)")
  agent_tok, agent_val, solver_tok, solver_val, tgt_tok, tgt_val, ids = [], [], [], [], [], [], []
  truncated = dropped = 0
  for i, ex in enumerate(examples):
    record = as_record(ex)
    chats = [prompts.upstream_messages(role, record) for role in roles]
    previous = solver_previous[i] if solver_previous is not None else ()
    chats.append(prompts.solver_messages(record, previous, text=solver_text))
    toks, vals = encode_chats(tokenizer, chats, bucket=1, template_kwargs=template_kwargs)
    width = int(vals.sum(axis=1).max())
    if width > max_prompt_tokens:
      if on_overlong == "error":
        raise TrainDataError(f"example {ex.id!r}: a prompt has {width} tokens > "
                             f"train.max_prompt_tokens={max_prompt_tokens}; raise "
                             "--config.train.max_prompt_tokens or set "
                             "--config.train.on_overlong=truncate to drop such examples")
      dropped += 1
      continue
    toks, vals = pad_left_to(toks[:, -width:], vals[:, -width:], max_prompt_tokens,
                             tokenizer.pad_id)
    target = tokenizer.encode(ex.target) + [tokenizer.eos_id]
    if len(target) > max_target_tokens:
      if on_overlong == "error":
        raise TrainDataError(f"example {ex.id!r}: its target has {len(target)} tokens (with "
                             f"eos) > train.max_target_tokens={max_target_tokens}; raise "
                             "--config.train.max_target_tokens or set "
                             "--config.train.on_overlong=truncate")
      truncated += 1
      target = target[:max_target_tokens]
    row = np.full(max_target_tokens, tokenizer.pad_id, np.int32)
    row[:len(target)] = target
    agent_tok.append(toks[:-1])
    agent_val.append(vals[:-1])
    solver_tok.append(toks[-1])
    solver_val.append(vals[-1])
    tgt_tok.append(row)
    tgt_val.append(np.arange(max_target_tokens) < len(target))
    ids.append(ex.id)
  if not ids:
    raise TrainDataError(f"all {len(examples)} examples have a prompt longer than "
                         f"train.max_prompt_tokens={max_prompt_tokens}; raise it")
  if truncated or dropped:
    log.warning("training data: %d targets truncated to %d tokens, %d examples dropped "
                "(prompt > %d tokens); see train.on_overlong", truncated, max_target_tokens,
                dropped, max_prompt_tokens)
  return EncodedExamples(np.stack(agent_tok), np.stack(agent_val), np.stack(solver_tok),
                         np.stack(solver_val), np.stack(tgt_tok), np.stack(tgt_val), ids,
                         truncated, dropped)


def micro_batch_indices(num_examples: int, batch_size: int, micro_step: int, seed: int,
                        shuffle: bool = True) -> np.ndarray:
  """Example indices of micro-step `micro_step` in the endless epoch stream."""
  flat = np.arange(micro_step * batch_size, (micro_step + 1) * batch_size)
  epochs, offsets = flat // num_examples, flat % num_examples
  if not shuffle:
    return offsets
  return np.array([np.random.default_rng(seed + int(e)).permutation(num_examples)[o]
                   for e, o in zip(epochs, offsets)])


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How one optimizer update is split: `grad_accum` calls of `per_call` examples."""

  per_call: int  # global examples per jitted call (split over the batch shards)
  grad_accum: int  # calls per update
  shards: int  # devices the batch axis is split over
  configured: tuple[int, int]  # (train.batch_size, train.grad_accum) as configured

  @property
  def effective(self) -> int:
    return self.per_call * self.grad_accum

  def describe(self, shard_axes: str = "data x fsdp", rows_per_process: int | None = None
               ) -> str:
    b, k = self.configured
    changed = "" if (b, k) == (self.per_call, self.grad_accum) else (
        f" (configured batch_size {b} x grad_accum {k}: batch raised to a multiple of the "
        f"{self.shards} batch shards, accumulation shrunk to keep {self.effective})")
    hosts = "" if rows_per_process is None else f"; this process builds {rows_per_process} rows"
    return (f"batch: {self.effective} examples per update = {self.grad_accum} calls x "
            f"{self.per_call} examples ({self.per_call // self.shards} per shard over "
            f"{shard_axes} = {self.shards}{hosts}){changed}")


def plan_batches(batch_size: int, grad_accum: int, shards: int,
                 shard_axes: str = "data x fsdp") -> BatchPlan:
  """Keeps batch_size x grad_accum examples per update with a per-call batch that
  is a multiple of `shards` (see module docstring); raises TrainDataError naming
  the valid sizes when no such split exists."""
  if batch_size < 1 or grad_accum < 1 or shards < 1:
    raise TrainDataError(f"train.batch_size={batch_size} and train.grad_accum={grad_accum} must "
                         "be >= 1")
  effective = batch_size * grad_accum
  if batch_size % shards == 0:
    return BatchPlan(batch_size, grad_accum, shards, (batch_size, grad_accum))
  per_call = next((n for n in range(shards * -(-batch_size // shards), effective + 1, shards)
                   if effective % n == 0), None)
  if per_call is None:
    lower, upper = effective // shards * shards, -(-effective // shards) * shards
    near = " or ".join(str(n) for n in sorted({lower, upper}) if n > 0)
    meshes = ", ".join(str(d) for d in range(1, effective + 1) if effective % d == 0)
    raise TrainDataError(
        f"train.batch_size={batch_size} x train.grad_accum={grad_accum} = {effective} examples "
        f"per update cannot be split over the {shards} batch shards ({shard_axes}): each call's "
        f"batch must be a multiple of {shards} that divides {effective}. Use an update of "
        f"{near} examples (--config.train.batch_size x --config.train.grad_accum), or a mesh "
        f"whose {shard_axes} is one of {meshes} (--config.mesh.*)")
  return BatchPlan(per_call, effective // per_call, shards, (batch_size, grad_accum))


def num_micro_steps(num_examples: int, epochs: float, batch_size: int, grad_accum: int) -> int:
  """Micro-steps for `epochs` passes, rounded UP to whole optimizer updates: the
  last update is completed with the first examples of the next shuffle rather
  than dropping the remainder (210 MATH items, accumulation 64: 4 updates)."""
  per_update = batch_size * grad_accum
  updates = max(1, -(-int(round(epochs * num_examples)) // per_update))
  return updates * grad_accum
