"""The tasks the trainer knows, one module each, registered by name (`TASKS`).

A new task is one module here with a `@register`ed `Task` subclass (its data, and its three roles:
`JaxTraining`, `TorchTraining`, `ParityCase`), imported below, and a preset whose `task` names it. Nothing else in the project branches on a task's name.
"""

from train.tasks.base import (TASKS, JaxTraining, ParityCase, Task, TorchTraining, get_task, init_variables,
                              register, torch_inputs)
from train.tasks import captioning, classification, contrastive, diffusion, vqa  # noqa: F401  (fill TASKS)

__all__ = ["TASKS", "JaxTraining", "ParityCase", "Task", "TorchTraining", "get_task", "init_variables",
           "register", "torch_inputs"]
