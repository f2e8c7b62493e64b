"""Turn a user's Flax model and arrays into a task (spec inferred when not given, always checked).

Example:
  >>> import flax.linen as nn, jax, numpy as np, tasks
  >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
  >>> x = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32)
  >>> y = (x[:, 0] > 0).astype(np.int32)
  >>> task = tasks.from_flax(model, tasks.cross_entropy, (x, y), (x, y), batch_size=8)
  >>> task.perm_spec["layers_0"]["kernel"]
  (None, 'layers_0')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from learned_opt.check import check_perm_spec
from learned_opt.infer import infer_perm_spec
from learned_opt.spec import PermSpecError
from tasks.base import ClassificationTask


@dataclasses.dataclass(frozen=True)
class CustomConfig:
    batch_size: int
    num_train: int
    num_test: int
    model: str
    data_source: str = "user arrays"


def _as_arrays(arrays, which: str) -> dict:
    if isinstance(arrays, Mapping):
        missing = {"inputs", "labels"} - set(arrays)
        if missing:
            raise ValueError(f"{which} needs keys 'inputs' and 'labels'; missing {sorted(missing)}")
        inputs, labels = arrays["inputs"], arrays["labels"]
    elif isinstance(arrays, tuple | list) and len(arrays) == 2:
        inputs, labels = arrays
    else:
        raise ValueError(f"{which} must be (inputs, labels) or dict(inputs=..., labels=...)")
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{which}: {inputs.shape[0]} inputs but {labels.shape[0]} labels (first axis)"
        )
    return {"inputs": inputs, "labels": labels}


def from_flax(
    module: nn.Module,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    train_arrays,
    test_arrays,
    batch_size: int,
    perm_spec=None,
    *,
    order=None,
    name: str = "custom",
    key: jax.Array | None = None,
) -> ClassificationTask:
    """A task from a Flax module and in-memory data.

    Args:
      module: Flax linen module, ``module.apply({"params": p}, inputs) -> outputs``.
      loss_fn: ``loss_fn(outputs, labels) -> scalar`` mean over the batch (e.g.
        :func:`tasks.cross_entropy`). Evaluation averages it over chunks, weighted by size.
      train_arrays, test_arrays: ``(inputs, labels)`` or ``dict(inputs=..., labels=...)``,
        examples along the first axis; used as given (preprocess them first).
      batch_size: examples per ``sample_batch``.
      perm_spec: the parameters' spec; inferred with :func:`learned_opt.infer_perm_spec` when
        None (from the parameters in Flax's call order, so e.g. Dense -> LayerNorm -> Dense
        chains without help). Either way it is verified with :func:`learned_opt.check_perm_spec`.
      order: top-level layer names in call order, passed to ``infer_perm_spec`` (only needed
        when the call order is ambiguous, which the error then says).
      name: the task's name.
      key: PRNG key for the spec check (default ``jax.random.key(0)``).

    Raises:
      learned_opt.spec.PermSpecError: the spec cannot be inferred or is not a symmetry.
      ValueError: the model keeps state outside ``"params"`` (BatchNorm's ``batch_stats``):
        tasks are pure functions of the parameters.
    """
    data = {"train": _as_arrays(train_arrays, "train_arrays"),
            "test": _as_arrays(test_arrays, "test_arrays")}
    config = CustomConfig(
        batch_size=batch_size,
        num_train=int(data["train"]["labels"].shape[0]),
        num_test=int(data["test"]["labels"].shape[0]),
        model=type(module).__name__,
    )
    task = ClassificationTask(name, config, module, data, perm_spec=None, loss_fn=loss_fn)
    key = jax.random.key(0) if key is None else key
    init_key, check_key = jax.random.split(key)
    inputs = data["train"]["inputs"][: max(batch_size, 8)]
    # Not jitted: jit sorts dict keys, and inference reads Flax's call order when it has it.
    variables = module.init(init_key, inputs[:1])
    _refuse_mutable_state(variables)
    params = task.init(init_key)
    spec = infer_perm_spec(variables["params"], order) if perm_spec is None else perm_spec
    try:
        check_perm_spec(task.apply, params, spec, inputs, key=check_key)
    except PermSpecError as e:
        if perm_spec is not None:
            raise
        raise PermSpecError(
            f"the spec inferred for this model is not a symmetry of it: {e} Inference sees "
            "only the parameter tree: with residual connections, the layers whose outputs "
            "are added together must share one label; write that spec and pass "
            "perm_spec=...") from e
    task.perm_spec = spec
    return task


def _refuse_mutable_state(variables: Mapping) -> None:
    other = sorted(set(variables) - {"params"})
    if not other:
        return
    where = sorted({path.split("/")[0] for c in other
                    for path in _paths(variables[c])})
    raise ValueError(
        f"the model keeps state in the collection(s) {other} (modules {where}), which a task "
        "cannot carry: tasks are pure functions of the parameters. Use a stateless "
        "normalisation (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) instead of nn.BatchNorm, or "
        "write a task whose loss threads that state explicitly.")


def _paths(tree, prefix: str = "") -> list[str]:
    if not isinstance(tree, Mapping):
        return [prefix]
    return [p for k, v in tree.items() for p in _paths(v, f"{prefix}{k}/")]
