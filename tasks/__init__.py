"""Tasks for learned optimizers: the paper's four tasks on real data, with checked specs.

>>> import jax, tasks
>>> task = tasks.get_task("mlp_fmnist_tiny")          # doctest: +SKIP
>>> params = task.init(jax.random.key(0))             # doctest: +SKIP
>>> batch = task.sample_batch(jax.random.key(1))      # doctest: +SKIP
>>> loss = task.loss(params, batch)                   # doctest: +SKIP
"""

from tasks.base import ClassificationTask, LanguageModelTask, Task, cross_entropy
from tasks.custom import CustomConfig, from_flax
from tasks.data import DataFileError, DataNotFoundError
from tasks.family import FAMILY, family_task_list
from tasks.registry import (
    CNNConfig,
    MLPConfig,
    RNNLMConfig,
    TransformerLMConfig,
    get_task,
    list_tasks,
    optimizer_defaults,
)

__all__ = [
    "FAMILY",
    "family_task_list",
    "CNNConfig",
    "ClassificationTask",
    "CustomConfig",
    "DataFileError",
    "DataNotFoundError",
    "LanguageModelTask",
    "MLPConfig",
    "RNNLMConfig",
    "Task",
    "TransformerLMConfig",
    "cross_entropy",
    "from_flax",
    "get_task",
    "list_tasks",
    "optimizer_defaults",
]
