"""Shared config sections. Task configs (gpqa.py, aime.py, ...) compose these.

Sections: model, mesh, agents, eval, train, checkpoint. Each is a ConfigDict whose
keys are locked, so a typo on the command line (`--config.train.lr=...`) fails.
"""

from __future__ import annotations

import ml_collections as mlc

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def model_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      # "embedded:smollm2-135m-instruct" (offline default), a local HF directory, or a hub id.
      source=EMBEDDED_MODEL,
      dtype="float32",  # parameter/activation dtype: float32 | bfloat16
      # per-layer activation checkpointing (model.REMAT): none | full | dots | dots_no_batch |
      # attn (keep attention outputs) | attn_mlp (and the MLP gate/up projections)
      remat="none",
  ))


def mesh_config() -> mlc.ConfigDict:
  # parallelism (sharding.choose_mesh): auto | data | tensor | fsdp | manual.
  #   data: replicated base weights; tensor: heads/kv_heads/mlp/vocab split inside a
  #   host; fsdp: and embed dims split across hosts; auto: the first of these whose
  #   weights fit half the device memory (data where it is unknown, e.g. CPU).
  #   manual (or auto with a size set here): the sizes as given.
  # Axis sizes; -1 takes the remaining devices. data * fsdp * tensor == #devices.
  return mlc.ConfigDict(dict(parallelism="auto", data=-1, fsdp=1, tensor=1))


def agents_config() -> mlc.ConfigDict:
  """Multi-agent communication (diffmas_jax/prompts.py, topology.py, methods/)."""
  return mlc.ConfigDict(dict(
      topology="sequential",  # sequential | hierarchical (independent, vmapped specialists)
      # Upstream roles in order (tuple or "a,b,c"); the solver is always last.
      # Built-in: planner, critic, refiner, math_specialist, science_specialist, code_specialist.
      roles=("planner", "critic", "refiner"),
      # Role name -> instruction, replacing the built-in one or defining a new role
      # ("solver" sets the solver's). Set in a config file: cfg.agents.role_text = {...}.
      role_text={},
      latent_steps=10,  # m per upstream agent (paper's best); 0 still hands the prompts over
      role_latent_steps={},  # role name -> m, overriding latent_steps for that role
      realign=True,  # False: W_a = I, the norm rescale still applies
      realign_lambda=1e-5,  # ridge term of the realignment solve (f32)
      # W_a and target_norm from the first len(tokenizer) vocabulary rows (LatentMAS resizes
      # the embeddings first: drops Qwen's padding rows) | all rows.
      realign_rows="tokenizer",
      trace_keep="all",  # all | own_segment | latent_only
      # How trace_keep acts: hide (mask slots, keep positions) | cut (LatentMAS: cut the cache to
      # the last agent's m latent slots / segment and restart positions).
      trace_cut="hide",
      position_layout="continue",  # hierarchical: continue | shared_start
      agent_max_new_tokens=256,  # text_mas: tokens each upstream agent may write
      # Qwen3 templates: True (Qwen3's default, and LatentMAS's: it never sets it) lets the
      # model think before answering, False appends an empty <think></think> block. Only
      # templates that read it get it.
      enable_thinking=True,
  ))


def eval_config() -> mlc.ConfigDict:
  """Evaluation harness (diffmas_jax/evaluation.py, launch/eval.py)."""
  return mlc.ConfigDict(dict(
      task="gsm8k",  # any name in diffmas_jax.tasks.TASKS
      split="",  # "" = the task's default split
      data_path="",  # local file for gated sets (GPQA csv, AIME jsonl, evalplus jsonl)
      limit=0,  # first N items (0 = all)
      stand_in_for="",  # paper benchmark this offline split stands in for (noted in summary.md)
      methods=("single", "text_mas", "latent_mas"),  # "+lora" suffix / "diffmas": with adapters
      batch_size=0,  # 0 = as many rows as cache_budget_mb holds (1..32; eval_batch.py)
      cache_budget_mb=2048.0,  # KV-cache memory (MB) for the automatic batch size
      bucket=32,  # prompt widths round up to a multiple of this (bounds recompiles)
      max_new_tokens=512,  # solver / single answer budget
      temperature=0.0,  # 0 = greedy (default); the paper samples at 0.6
      top_p=0.95,  # used when temperature > 0
      top_k=0,
      num_samples=1,  # > 1 (with temperature > 0): self-consistency in summary.md
      seed=0,
      # Code tasks: SandboxConfig fields, e.g. {"timeout_s": 10, "memory_mb": 1024}.
      # isolation="bwrap" refuses to run code where user namespaces are unavailable;
      # "process" accepts the weaker in-process guard (docs/sandbox.md).
      sandbox=dict(isolation="bwrap"),
  ))


def train_config() -> mlc.ConfigDict:
  """DiffMAS training (diffmas_jax/train.py, data.py, trainer.py)."""
  return mlc.ConfigDict(dict(
      # What trains (diffmas_jax/ablations.py): diffmas (LoRA through the latent trace),
      # textmas_sft (the solver's LoRA on fixed upstream text), c2c (the cache fuser only).
      method="diffmas",
      grad_mode="shared",  # final_only | shared | per_agent (SPEC section 2)
      # Training data: math (MATH train, reference solutions), humaneval (canonical
      # solutions; those problems are then excluded from HumanEval evaluation),
      # commonsenseqa (templated rationale + letter), jsonl (train.data_path).
      data="math",
      data_path="",  # jsonl of {"question", "target"} pairs when data="jsonl"
      num_examples=210,  # sampled with data_seed (0 = all for jsonl)
      data_seed=0,
      epochs=1.0,
      shuffle=True,
      batch_size=1,  # examples per micro-step (divisible by mesh data * fsdp)
      grad_accum=64,  # micro-steps per optimizer update (the paper's 64)
      lr=5e-5,
      warmup_ratio=0.03,
      final_lr_ratio=0.0,  # cosine decays to lr * this
      max_grad_norm=1.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      max_prompt_tokens=512,  # every agent's and the solver's prompt, padded to this
      max_target_tokens=512,  # solver target (+ eos), padded to this
      on_overlong="truncate",  # truncate (warn: cut targets, drop long prompts) | error
      remat_stages=True,  # recompute each agent stage in the backward pass
      # > 0: also log `probe_loss`, the loss on the first N training examples (fixed,
      # no dropout), before training and after every update: a curve that is not
      # confounded by each update seeing new examples.
      probe_examples=0,
      seed=0,  # adapter init, dropout
  ))


def lora_config() -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      rank=8,
      alpha=16.0,
      dropout=0.0,
      # Comma-separated names or regexes over q,k,v,o,gate,up,down (or q_proj, ...), or "all".
      targets="all",
  ))


def c2c_config() -> mlc.ConfigDict:
  """The C2C cache fuser (diffmas_jax/c2c.py), used when train.method = c2c."""
  return mlc.ConfigDict(dict(
      hidden=256,  # MLP width of each layer's K and V fuser
      gate_init=1.0,  # initial gate logit (> 0: open at evaluation, where the gate is hard)
      tau_start=1.0,  # Gumbel-sigmoid temperature, annealed geometrically over the updates
      tau_end=0.01,
  ))


def checkpoint_config() -> mlc.ConfigDict:
  # every_updates: optimizer updates between saves (also saved at the end).
  return mlc.ConfigDict(dict(every_updates=1, max_to_keep=2, async_save=True))


def base_config() -> mlc.ConfigDict:
  cfg = mlc.ConfigDict(dict(
      model=model_config(),
      mesh=mesh_config(),
      agents=agents_config(),
      eval=eval_config(),
      train=train_config(),
      lora=lora_config(),
      c2c=c2c_config(),
      checkpoint=checkpoint_config(),
      workdir="",
      seed=0,
  ))
  return cfg


def quick_variant(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
  """`:quick` for any eval config: 4 items, short outputs, m = 4 (a smoke test in seconds)."""
  cfg.eval.limit = 4
  cfg.eval.max_new_tokens = 48
  cfg.agents.agent_max_new_tokens = 32
  cfg.agents.latent_steps = 4
  return cfg
