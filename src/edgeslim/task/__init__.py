"""Tasks: how a user's data and metric reach every algorithm (see :class:`Task`)."""

from edgeslim.task.agreement import agreement_metrics, flat_outputs
from edgeslim.task.builtin import (
    digits_task,
    fashion_mnist_task,
    labelled_task,
    minilm_task,
    photos_task,
)
from edgeslim.task.core import Task, normalised_range
from edgeslim.task.resolve import BUILTIN_DATA, load_data, resolve_task
from edgeslim.task.sources import image_folder_task, npz_task, task_from_function

__all__ = [
    "BUILTIN_DATA",
    "Task",
    "agreement_metrics",
    "digits_task",
    "fashion_mnist_task",
    "flat_outputs",
    "image_folder_task",
    "labelled_task",
    "load_data",
    "minilm_task",
    "normalised_range",
    "npz_task",
    "photos_task",
    "resolve_task",
    "task_from_function",
]
