"""Optional dependencies: an import that names the extra to install when it is missing.

``pip install learned-opt`` brings the optimizers only; the extras add ``[tasks]`` (the paper's
datasets through tensorflow-datasets, scipy), ``[wandb]``, ``[plots]`` (matplotlib); ``[dev]``
installs all of them with the test tools.

Example:
  >>> import_optional("json", "tasks").__name__
  'json'
  >>> import_optional("no_such_module_xyz", "plots")
  Traceback (most recent call last):
  ...
  ImportError: no_such_module_xyz is not installed: pip install 'learned-opt[plots]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

EXTRAS = ("tasks", "wandb", "plots", "dev")


def is_installed(module: str) -> bool:
    """Whether ``module`` (a top-level name) can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def import_optional(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming ``learned-opt[extra]``."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {EXTRAS}, got {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there; something it imports is broken
        raise ImportError(f"{module} is not installed: pip install 'learned-opt[{extra}]'") from e


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend (``[plots]``)."""
    matplotlib = import_optional("matplotlib", "plots")
    matplotlib.use("Agg")
    return import_optional("matplotlib.pyplot", "plots")
