"""The task interface: a model, its data held as device arrays, a loss and a permutation spec.

A task is built once per process and used as a static value inside jitted code (it hashes by
identity). Its data are jax arrays; ``sample_batch`` and ``evaluate`` are pure and jittable, so a
vmapped population of inner training runs samples data inside one ``jit`` + ``lax.scan``.

Closing over the data inside ``jit`` embeds them into the compiled program as constants (for
CIFAR-10's 46 MB, 3.4 s instead of 0.9 s to compile the sampler, ``scripts/bench_tasks.py``).
To avoid that, pass ``task.data`` as an
argument of the jitted function and hand it on: ``task.sample_batch(key, data=data)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (over every leading axis)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Task:
    """Base class; :class:`ClassificationTask` and :class:`LanguageModelTask` add the sampling.

    Attributes:
      name: registered name (or the user's name for custom tasks).
      config: frozen dataclass of sizes, batch size and data source (``dataclasses.asdict``).
      model: the Flax linen module.
      data: ``{split: {field: jax.Array}}``, the whole dataset on the device.
      perm_spec: exact permutation spec of the parameters (a true symmetry, checked in tests).
      paper_perm_spec: the paper's approximate spec (input/output/spatial axes given labels),
        or None. It is NOT a symmetry of the network; offered to reproduce the paper.
    """

    eval_chunk = 1024  # examples per evaluation chunk (bounds evaluation memory)

    def __init__(self, name, config, model: nn.Module, data, perm_spec, paper_perm_spec=None,
                 loss_fn=cross_entropy):
        self.name = name
        self.loss_fn = loss_fn
        self.config = config
        self.model = model
        self.data = data
        self.perm_spec = perm_spec
        self.paper_perm_spec = paper_perm_spec
        self.batch_size = config.batch_size
        self._init = jax.jit(model.init)  # compiling is faster than Flax's eager init
        self._evaluate = jax.jit(self._evaluate_impl, static_argnames=("split", "max_examples"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.config})"

    # Subclasses define how stored data become model inputs and how batches are drawn.
    def prepare_inputs(self, stored: jax.Array) -> jax.Array:
        return stored

    def sample_batch(self, key: jax.Array, split: str = "train", data=None) -> dict:
        raise NotImplementedError

    def eval_examples(self, data, split: str, max_examples: int | None) -> tuple:
        raise NotImplementedError

    def dummy_inputs(self) -> jax.Array:
        # Shapes only: reading self.data here would embed the dataset as a constant in any
        # jitted function that initialises the task (e.g. a meta-training reset).
        inputs = jax.eval_shape(self.sample_batch, jax.random.key(0))["inputs"]
        return jnp.zeros((1, *inputs.shape[1:]), inputs.dtype)

    def init(self, key: jax.Array) -> dict:
        """Fresh parameters: the content of the Flax "params" collection, a plain dict."""
        variables = self._init(key, self.dummy_inputs())
        # jit returns dicts with sorted keys, not Flax's call order (infer_perm_spec copes).
        return dict(variables["params"])

    def apply(self, params: PyTree, inputs: jax.Array) -> jax.Array:
        """Logits for a batch of (prepared) inputs."""
        return self.model.apply({"params": params}, inputs)

    def loss(self, params: PyTree, batch: dict) -> jax.Array:
        """Scalar training loss: ``loss_fn(apply(params, batch["inputs"]), batch["labels"])``,
        the mean cross-entropy for the registered tasks."""
        return self.loss_fn(self.apply(params, batch["inputs"]), batch["labels"])

    def evaluate(self, params, split: str = "test", max_examples: int | None = None, data=None):
        """Mean loss and accuracy on the first ``max_examples`` examples (all when None) of a
        split, deterministically. Jittable (``split`` and ``max_examples`` are static).
        Accuracy is NaN when outputs are not class scores for integer labels.

        Returns:
          ``dict(loss=scalar, accuracy=scalar)``.
        """
        data = self.data if data is None else data
        return self._evaluate(params, data, split=split, max_examples=max_examples)

    def _evaluate_impl(self, params, data, split, max_examples):
        inputs, labels = self.eval_examples(data, split, max_examples)
        n = labels.shape[0]
        chunk = min(n, self.eval_chunk)
        full = n // chunk * chunk

        def sums(x, y):
            logits = self.apply(params, self.prepare_inputs(x))
            loss_sum = self.loss_fn(logits, y) * y.size  # loss_fn is a mean over labels
            if logits.ndim == y.ndim + 1 and jnp.issubdtype(y.dtype, jnp.integer):
                correct = (jnp.argmax(logits, axis=-1) == y).sum()
            else:  # accuracy is undefined for non-classification outputs
                correct = jnp.full((), jnp.nan)
            return loss_sum, correct

        def split_chunks(a):
            return a[:full].reshape(full // chunk, chunk, *a.shape[1:])

        chunks = (split_chunks(inputs), split_chunks(labels))
        ce, correct = jax.lax.map(lambda xy: sums(*xy), chunks)
        ce, correct = ce.sum(), correct.sum()
        if full < n:
            ce_rest, correct_rest = sums(inputs[full:], labels[full:])
            ce, correct = ce + ce_rest, correct + correct_rest
        return {"loss": ce / labels.size, "accuracy": correct / labels.size}


def _check_split(data, split):
    if split not in data:
        raise ValueError(f"unknown split {split!r}; this task has {sorted(data)}")
    return data[split]


class ClassificationTask(Task):
    """Examples ``data[split] = {"inputs": [N, ...], "labels": [N]}``; batches drawn uniformly
    with replacement. Stored inputs are cast to float32 and multiplied by ``input_scale``.
    """

    def __init__(self, name, config, model, data, perm_spec, paper_perm_spec=None,
                 input_scale: float | None = None, loss_fn=cross_entropy):
        self.input_scale = input_scale
        super().__init__(name, config, model, data, perm_spec, paper_perm_spec, loss_fn)

    def prepare_inputs(self, stored):
        if self.input_scale is None:
            return stored
        return stored.astype(jnp.float32) * self.input_scale

    def sample_batch(self, key, split="train", data=None):
        """``dict(inputs=[batch, ...], labels=[batch])``, drawn with replacement."""
        arrays = _check_split(self.data if data is None else data, split)
        idx = jax.random.randint(key, (self.batch_size,), 0, arrays["labels"].shape[0])
        inputs = self.prepare_inputs(arrays["inputs"][idx])
        return {"inputs": inputs, "labels": arrays["labels"][idx]}

    def eval_examples(self, data, split, max_examples):
        arrays = _check_split(data, split)
        n = arrays["labels"].shape[0] if max_examples is None else max_examples
        return arrays["inputs"][:n], arrays["labels"][:n]


class LanguageModelTask(Task):
    """A token stream ``data[split] = {"tokens": [N]}``; a batch is ``batch_size`` windows of
    ``seq_len + 1`` tokens at uniformly random offsets: inputs are the first ``seq_len``, labels
    the next tokens (teacher forcing). Evaluation uses consecutive non-overlapping windows from
    the start of the split; ``max_examples`` counts windows.
    """

    def __init__(self, name, config, model, data, perm_spec, paper_perm_spec=None):
        self.seq_len = config.seq_len
        super().__init__(name, config, model, data, perm_spec, paper_perm_spec)

    def prepare_inputs(self, stored):
        return stored.astype(jnp.int32)

    def sample_batch(self, key, split="train", data=None):
        """``dict(inputs=int32 [batch, seq_len], labels=int32 [batch, seq_len])``."""
        tokens = _check_split(self.data if data is None else data, split)["tokens"]
        starts = jax.random.randint(key, (self.batch_size, 1), 0, tokens.shape[0] - self.seq_len)
        windows = tokens[starts + jnp.arange(self.seq_len + 1)].astype(jnp.int32)
        return {"inputs": windows[:, :-1], "labels": windows[:, 1:]}

    def eval_examples(self, data, split, max_examples):
        tokens = _check_split(data, split)["tokens"]
        n = (tokens.shape[0] - 1) // self.seq_len
        n = n if max_examples is None else min(n, max_examples)
        idx = jnp.arange(n)[:, None] * self.seq_len + jnp.arange(self.seq_len + 1)
        windows = tokens[idx]
        return windows[:, :-1], windows[:, 1:].astype(jnp.int32)
