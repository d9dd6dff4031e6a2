"""Benchmarks, training recipes, answer extraction, scoring and the code sandbox.

    records = load_task("gsm8k", limit=8)
    prompt_text = format_question(records[0]) + "\\n" + answer_instruction(records[0].family)
    result = score(records[0], model_output)  # {"correct", "prediction", "detail"}
"""

from diffmas_jax.tasks.extract import extract_answer, last_boxed
from diffmas_jax.tasks.formats import answer_instruction, format_question
from diffmas_jax.tasks.records import (Record, TaskDataError, TaskDataMissingError,
                                       TaskFormatError)
from diffmas_jax.tasks.registry import TASKS, load_task, task_family
from diffmas_jax.tasks.sandbox import (SandboxConfig, SandboxResult, SandboxUnavailableError,
                                       check_available, isolation_report, run_code, run_tests)
from diffmas_jax.tasks.scoring import (aime_equal, math_equal, mc_equal, normalize_math, score,
                                       verify_math)
from diffmas_jax.tasks.training_data import (TrainExample, commonsenseqa_train, humaneval_train,
                                             jsonl_pairs, math_train)

__all__ = [
    "Record", "TaskDataError", "TaskDataMissingError", "TaskFormatError", "TASKS", "load_task",
    "task_family", "format_question", "answer_instruction", "extract_answer", "last_boxed",
    "normalize_math", "math_equal", "aime_equal", "mc_equal", "verify_math", "score",
    "SandboxConfig", "SandboxResult", "SandboxUnavailableError", "check_available", "run_code",
    "run_tests", "isolation_report", "TrainExample", "math_train",
    "humaneval_train", "commonsenseqa_train", "jsonl_pairs",
]
