"""Role prompts, per task family, rendered as chats (system + user, generation prompt open).

Roles are data (`AgentRole`: name, instruction, latent steps). Config picks and
orders them (`agents.roles`), may replace or add instructions
(`agents.role_text`) and set per-role latent steps (`agents.role_latent_steps`),
so new roles need no code. The solver is always the final agent; its message
ends with the task family's answer-format instruction (\\boxed{} for math and
multiple choice, a fenced Python block for code).

Every method (single, text_mas, latent_mas) uses the same system message and
the same role texts, so only the way agents communicate differs.

Qwen3 chat templates take `enable_thinking`. `template_kwargs` passes
`agents.enable_thinking` only to templates that read it. True (Qwen3's own
default) leaves the assistant turn open, so the model starts with its `<think>`
reasoning: latent thoughts then stand in for that thinking and the solver may
think before answering (give it a large max_new_tokens, as the paper does).
False makes the template append an empty `<think></think>` block: direct
answers, for small token budgets. Templates without the variable (SmolLM2,
Llama) are unaffected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from diffmas_jax.tasks import Record, answer_instruction, format_question

SYSTEM = "You are a careful, expert problem solver."

# role -> {family or "default": instruction}; written in our own words with the
# intent of the paper's roles (plan, criticise, refine, solve).
ROLE_TEXT: dict[str, dict[str, str]] = {
    "planner": {
        "default": "You are the Planner of a team. Do not solve the problem. Lay out a short, "
                   "concrete plan: the key facts given, the sub-steps, and how to combine them.",
        "math": "You are the Planner of a team. Do not solve the problem. List the quantities "
                "given, what is asked, and the calculations needed, in order.",
        "mc": "You are the Planner of a team. Do not pick an answer. Name the concept the "
              "question tests and how to check each option against it.",
        "code": "You are the Planner of a team. Do not write the code. Describe the function's "
                "contract, the algorithm, and the edge cases to handle.",
    },
    "critic": {
        "default": "You are the Critic of a team. Check the team's thinking so far for mistakes, "
                   "gaps and wrong assumptions, and say how to fix them. Do not give a final "
                   "answer.",
        "code": "You are the Critic of a team. Check the team's approach for wrong algorithms, "
                "missed edge cases and off-by-one errors, and say how to fix them. Do not write "
                "the final code.",
    },
    "refiner": {
        "default": "You are the Refiner of a team. Merge the plan and the critique into one "
                   "corrected, step-by-step approach the solver can follow directly.",
    },
    "solver": {
        "default": "You are the Solver of a team. Use the team's reasoning where it helps, check "
                   "it, and solve the problem yourself.",
    },
    # Hierarchical specialists: independent views of the same problem.
    "math_specialist": {
        "default": "You are a mathematics specialist. Work out the quantitative core of the "
                   "problem step by step.",
    },
    "science_specialist": {
        "default": "You are a science specialist. Identify the facts and principles that "
                   "decide the question.",
    },
    "code_specialist": {
        "default": "You are a programming specialist. Identify the algorithm, the data "
                   "structures and the edge cases involved.",
    },
}

SEQUENTIAL_ROLES = ("planner", "critic", "refiner")
HIERARCHICAL_ROLES = ("math_specialist", "science_specialist", "code_specialist")


@dataclasses.dataclass(frozen=True)
class AgentRole:
  """One upstream agent: its name, instruction (None: the built-in text for the
  record's task family) and latent steps m (latent_mas)."""

  name: str
  text: str | None = None
  latent_steps: int = 10

  def instruction(self, family: str) -> str:
    if self.text is not None:
      return self.text
    return role_text(self.name, family)


def role_text(role: str, family: str) -> str:
  """The built-in instruction of `role` for a task family ("math", "mc", "code")."""
  if role not in ROLE_TEXT:
    raise ValueError(f"role {role!r} has no built-in prompt (known: {sorted(ROLE_TEXT)}); give "
                     f"its text in the config: cfg.agents.role_text = {{{role!r}: '...'}}")
  texts = ROLE_TEXT[role]
  return texts.get(family, texts["default"])


def roles_from_config(agents_cfg: Any) -> tuple[AgentRole, ...]:
  """Upstream roles from the `agents` config section (see configs/common.py)."""
  texts: Mapping[str, str] = dict(agents_cfg.get("role_text", {}) or {})
  steps: Mapping[str, int] = dict(agents_cfg.get("role_latent_steps", {}) or {})
  names = agents_cfg.roles
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    raise ValueError("no upstream roles: set --config.agents.roles (e.g. 'planner,critic,refiner')")
  for name in list(texts) + list(steps):
    if name not in names and name != "solver":
      raise ValueError(f"agents.role_text / role_latent_steps mention {name!r}, which is not "
                       f"in agents.roles={tuple(names)}")
  roles = tuple(AgentRole(n, texts.get(n), int(steps.get(n, agents_cfg.latent_steps)))
                for n in names)
  for r in roles:
    r.instruction("math")  # fail now, not mid-run, on a role without text
  return roles


def solver_text(agents_cfg: Any = None) -> str | None:
  """The solver's instruction override from config (None: built-in)."""
  if agents_cfg is None:
    return None
  return (dict(agents_cfg.get("role_text", {}) or {})).get("solver")


def _chat(user_parts: Sequence[str]) -> list[dict]:
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(user_parts)}]


def _teammates(previous: Sequence[tuple[str, str]]) -> list[str]:
  if not previous:
    return []
  return ["", "Notes from your teammates:"] + [f"[{name}]\n{text.strip()}"
                                               for name, text in previous]


def upstream_messages(role: AgentRole, record: Record,
                      previous: Sequence[tuple[str, str]] = ()) -> list[dict]:
  """An upstream agent's chat. `previous` = [(role name, text)] (text_mas only)."""
  parts = [role.instruction(record.family), "", "Problem:", format_question(record)]
  parts += _teammates(previous)
  return _chat(parts)


def solver_messages(record: Record, previous: Sequence[tuple[str, str]] = (),
                    text: str | None = None) -> list[dict]:
  """The final agent's chat, ending with the task family's answer format.

  For latent_mas `previous` is empty: the team's work is in the KV trace the
  solver's prompt is prefilled on, not in its text.
  """
  parts = [text or role_text("solver", record.family), "", "Problem:", format_question(record)]
  parts += _teammates(previous)
  parts += ["", answer_instruction(record.family)]
  return _chat(parts)


def single_messages(record: Record) -> list[dict]:
  """The single-agent chain-of-thought baseline (no role, same system message)."""
  return _chat(["Problem:", format_question(record), "", answer_instruction(record.family)])


def template_kwargs(tokenizer: Any, enable_thinking: bool | None) -> dict:
  """Extra chat-template variables: `enable_thinking` for templates that read it (Qwen3)."""
  template = getattr(tokenizer, "chat_template", None) or ""
  if enable_thinking is None or "enable_thinking" not in template:
    return {}
  return {"enable_thinking": bool(enable_thinking)}
