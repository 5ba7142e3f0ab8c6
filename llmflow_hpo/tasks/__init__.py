"""Stage 3, tasks: one module per task behind the small contract of ``tasks.base``, and the registry.

Outside this folder no code asks which task it runs: it asks the task object.
"""

from __future__ import annotations

from llmflow_hpo.errors import ConfigError
from llmflow_hpo.tasks.base import IGNORE_INDEX, BaseTask
from llmflow_hpo.tasks.causal_lm import CausalLM
from llmflow_hpo.tasks.text_classification import TextClassification
from llmflow_hpo.tasks.token_classification import TokenClassification

__all__ = ["IGNORE_INDEX", "TASKS", "TASK_NAMES", "BaseTask", "get_task"]

# The registry: a study's ``task:`` value -> the task object. A new task is one module and one line here.
TASKS: dict[str, BaseTask] = {
    task.name: task
    for task in (
        TokenClassification(),
        TextClassification(),
        CausalLM(),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> BaseTask:
    """The task a study's ``task:`` value names; a ConfigError that lists the known tasks for any other."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"task {name!r} is not one of {', '.join(TASK_NAMES)}") from None
