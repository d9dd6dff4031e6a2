"""The relay task: communication is necessary, and the latent trace is the only channel.

Real multiple-choice items (ARC-Easy test by default). The upstream Reader's
prompt holds the item's answer key ("the correct option is C", and nothing
else: a short prompt keeps the CPU experiment cheap); the Solver's prompt
holds the item (question and options) without the key. With `trace_keep="latent_only"` the
Solver sees none of the Reader's prompt slots, only its m latent thoughts, so
whatever the Solver gains over answering alone crossed those m slots.

Scoring is teacher-forced, one forward per item, no decoding: the Solver's
target is `\\boxed{X}`; the prediction is the option letter with the highest
logit at the letter's position (restricted to the item's letters), and the
answer NLL is -log p(gold letter) over the full vocabulary there.

Everything here is a pure function of (weights, adapters, batch); the
experiment driver is `research/relay_run.py`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax import model as model_lib, prompts, topology
from diffmas_jax import train as train_lib
from diffmas_jax.kv_cache import KVCache
from diffmas_jax.methods.base import encode_chats
from diffmas_jax.methods.latent_mas import PipelineBatch
from diffmas_jax.tasks import Record, format_question, load_task

READER_TEXT = ("You are the Reader of a team. You alone were given the answer key of a "
               "multiple-choice question; the Solver was not. Pass on which option is correct.")
SOLVER_TEXT = ("You are the Solver of a team. Your teammate may know the answer key. "
               "Answer the question.")
ANSWER_TEXT = "Answer with only the letter of the correct option within \\boxed{}, e.g. \\boxed{B}."
NUM_OPTIONS = 4
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class RelaySplit:
  train: list[Record]
  heldout: list[Record]


def relay_items(num_train: int, num_heldout: int, task: str = "arc_easy", split: str = "test",
                seed: int = 0, records: Sequence[Record] | None = None,
                keep: Callable[[Record], bool] | None = None) -> RelaySplit:
  """Deterministic train / held-out split of 4-option items.

  Items are deduplicated by question text first, so no held-out question is
  ever a training question (ARC repeats a few questions under different ids).
  `records` overrides the loaded task (tests); `keep` filters items (e.g. prompts
  that fit the configured width) before the split.
  """
  records = list(records) if records is not None else load_task(task, split=split)
  seen, pool = set(), []
  for r in records:
    key = " ".join(r.question.lower().split())
    if len(r.choices) == NUM_OPTIONS and r.gold in LETTERS and key not in seen:
      seen.add(key)
      pool.append(r)
  order = list(range(len(pool)))
  random.Random(seed).shuffle(order)
  # Filtered lazily in the shuffled order: only the items used get tokenised.
  chosen = []
  for i in order:
    if keep is None or keep(pool[i]):
      chosen.append(pool[i])
      if len(chosen) == num_heldout + num_train:
        break
  else:
    raise ValueError(f"relay: {num_train} train + {num_heldout} held-out items requested, but "
                     f"{task}/{split} has only {len(chosen)} usable 4-option items (that fit)")
  heldout, train = chosen[:num_heldout], chosen[num_heldout:]
  return RelaySplit(train=train, heldout=heldout)


def _chat(parts: Sequence[str]) -> list[dict]:
  return [{"role": "system", "content": prompts.SYSTEM},
          {"role": "user", "content": "\n".join(parts)}]


def fact(record: Record) -> str:
  return f"Answer key: the correct option is {record.gold}."


def reader_messages(record: Record) -> list[dict]:
  """The upstream agent: the item's answer key only."""
  return _chat([READER_TEXT, "", fact(record)])


def solver_messages(record: Record, note: str | None = None, with_fact: bool = False
                    ) -> list[dict]:
  """The Solver: the item without the key; `note` = the Reader's text (text_mas);
  `with_fact` puts the key in the Solver's own prompt (an oracle reference)."""
  parts = [SOLVER_TEXT, "", "Problem:", format_question(record)]
  if note is not None:
    parts += ["", "Notes from your teammates:", f"[reader]\n{note.strip()}"]
  if with_fact:
    parts += ["", fact(record)]
  return _chat(parts + ["", ANSWER_TEXT])


def target_text(record: Record) -> str:
  return f"\\boxed{{{record.gold}}}"


@dataclasses.dataclass(frozen=True)
class LetterSpec:
  """Where the answer letter sits in the target, and the option letters' token ids."""

  column: int  # target column holding the letter
  ids: tuple[int, ...]  # token ids of "A".."D"

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "LetterSpec":
    ids = []
    column = None
    for letter in LETTERS:
      toks = tokenizer.encode(f"\\boxed{{{letter}}}")
      prefix = tokenizer.encode("\\boxed{")
      if toks[:len(prefix)] != prefix or len(toks) != len(prefix) + 2:
        raise ValueError(f"tokenizer splits \\boxed{{{letter}}} as {toks}: the letter is not "
                         "one token after the '\\boxed{' prefix; relay scoring needs that")
      ids.append(toks[len(prefix)])
      column = len(prefix)
    return cls(column=column, ids=tuple(ids))


def encode(tokenizer: Any, records: Sequence[Record], *, bucket: int = 32, note_texts=None,
           with_fact: bool = False, template_kwargs: dict | None = None) -> PipelineBatch:
  """Records -> PipelineBatch with one upstream agent (the Reader).

  agent_tokens [1, B, T], solver_tokens [B, Ts] (widths rounded up to `bucket`),
  targets [B, U] (`\\boxed{X}` + eos).
  """
  reader = [reader_messages(r) for r in records]
  notes = note_texts or [None] * len(records)
  solver = [solver_messages(r, n, with_fact) for r, n in zip(records, notes)]
  rt, rv = encode_chats(tokenizer, reader, bucket, template_kwargs)
  st, sv = encode_chats(tokenizer, solver, bucket, template_kwargs)
  targets = [tokenizer.encode(target_text(r)) + [tokenizer.eos_id] for r in records]
  u = max(len(t) for t in targets)
  tt = np.full((len(records), u), tokenizer.pad_id, np.int32)
  tv = np.zeros((len(records), u), bool)
  for i, t in enumerate(targets):
    tt[i, :len(t)], tv[i, :len(t)] = t, True
  return PipelineBatch(rt[None], rv[None], st, sv, tt, tv)


def prompt_tokens(tokenizer: Any, record: Record, template_kwargs: dict | None = None) -> int:
  """The Solver prompt's length (no note), in tokens."""
  return len(tokenizer.encode_chat(solver_messages(record), **(template_kwargs or {})))


# ----- scoring (pure functions of weights, adapters, batch) -----

def letter_scores(logits: jax.Array, batch: PipelineBatch, letters: LetterSpec
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [B, U, V] -> (predicted option index [B], gold index [B], gold NLL [B])."""
  row = logits[:, letters.column].astype(jnp.float32)  # [B, V]
  gold_id = batch.target_tokens[:, letters.column]  # [B]
  logp = jax.nn.log_softmax(row, axis=-1)
  nll = -jnp.take_along_axis(logp, gold_id[:, None], axis=-1)[:, 0]
  option = row[:, jnp.asarray(letters.ids)]  # [B, 4]
  gold = jnp.argmax(gold_id[:, None] == jnp.asarray(letters.ids)[None], axis=-1)
  return jnp.argmax(option, axis=-1), gold, nll


def solver_alone_logits(weights, cfg, cache: KVCache, batch: PipelineBatch, lora=None
                        ) -> jax.Array:
  """[B, U, V] target logits of the Solver prompt with no trace (single / text_mas).

  `cache`: empty, at least solver width + U - 1 slots, made outside jit.
  """
  tokens = jnp.concatenate([batch.solver_tokens, batch.target_tokens[:, :-1]], axis=1)
  valid = jnp.concatenate([batch.solver_valid, batch.target_valid[:, :-1]], axis=1)
  out = model_lib.forward(weights, cfg, cache, tokens=tokens, valid=valid, lora=lora,
                          logits="none", fresh_cache=True)
  return model_lib.lm_head(weights, out.hidden[:, batch.solver_tokens.shape[1] - 1:])


def pipeline_logits(params, weights, cfg, cache: KVCache, batch: PipelineBatch, realigner,
                    spec: topology.TraceSpec, grad_mode: str = "shared") -> jax.Array:
  """[B, U, V] target logits on top of the Reader's trace (latent_mas: params=None)."""
  return train_lib.solver_target_logits(params, weights, cfg, cache, batch, realigner, spec,
                                        grad_mode, remat=False)
