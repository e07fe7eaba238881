"""The tasks the trainer knows, one module each, registered by name (`TASKS`).

A new task is one module here with a `@register`ed `Task` subclass, imported below, and a preset
whose `task` names it. Nothing else in the project branches on a task's name.
"""

from train.tasks.base import TASKS, Task, get_task, init_variables, register
from train.tasks import captioning, classification, contrastive, diffusion, vqa  # noqa: F401  (fill TASKS)

__all__ = ["TASKS", "Task", "get_task", "init_variables", "register"]
