"""Character-level integer addition and a zoo of small seq2seq GRUs trained on it.

The task of the paper's "Tiny RNN Zoo" (Zhou et al. 2024, section 5.2): read ``"15+20="`` one
character at a time with a GRU encoder cell, then emit ``"35."`` with a GRU decoder cell that
starts from the encoder's final hidden state, followed by an output layer to the vocabulary.

* Problems: each operand has a number of digits drawn uniformly from ``1..digits`` and a value
  drawn uniformly among the numbers with that many digits, so that short (easy) and long (hard)
  sums are both common and trained models reach graded success rates. The question is
  left-padded with ``" "`` to ``2 * digits + 2`` characters; the answer is followed by the end
  token ``"."`` and padded to ``digits + 2`` characters.
* Model: inputs are one-hot characters; ``encoder`` and ``decoder`` are ``flax.linen.GRUCell``
  with the same hidden size; ``out`` is a Dense layer from the hidden state to the vocabulary.
  The decoder is fed ``"="`` first, then the previous answer character (teacher forcing in
  training, its own greedy prediction in :func:`evaluate`).
* Success: greedy decoding reproduces every character of the answer up to and including the end
  token (exact match of the whole answer). Loss: cross-entropy over the same positions.
* Zoo: :func:`train_models` trains a population of models of one batch size at once (``vmap``
  over models, ``lax.scan`` over steps, Adam with a learning rate per model).

Example:
  >>> import jax
  >>> cfg = AdditionConfig(digits=2, hidden=8)
  >>> data = make_problems(cfg, seed=0, n=4)
  >>> decode(data.question[0]), decode(data.answer[0])  # doctest: +SKIP
  ('  91+4=', '95.')
  >>> params = init_params(cfg, jax.random.key(1))
  >>> sorted(params)
  ['decoder', 'encoder', 'out']
  >>> spec = perm_spec(params)
  >>> spec["encoder"]["hr"]["kernel"], spec["out"]["kernel"]
  (('h', 'h'), ('h', None))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

VOCAB = "0123456789+=. "
PLUS, EQUALS, END, PAD = (VOCAB.index(c) for c in "+=. ")
VOCAB_SIZE = len(VOCAB)


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
    """The addition task and the model trained on it.

    Attributes:
      digits: operands have 1 to ``digits`` digits (the paper: 5).
      hidden: GRU hidden size, shared by encoder and decoder (the paper: 128).
    """

    digits: int = 5
    hidden: int = 128

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    @property
    def question_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 2  # up to digits + 1 digits, then the end token


class Problems(NamedTuple):
    """A set of addition problems as token arrays."""

    question: jax.Array  # int32 [n, question_len], left-padded "a+b="
    answer: jax.Array  # int32 [n, answer_len], "c." then padding
    mask: jax.Array  # float32 [n, answer_len], 1 up to and including the end token


def decode(tokens) -> str:
    """Tokens to text, e.g. ``decode(problems.answer[0]) == "35."``."""
    return "".join(VOCAB[int(t)] for t in np.asarray(tokens))


def _encode(text: str, width: int, left_pad: bool) -> list[int]:
    text = text.rjust(width) if left_pad else text.ljust(width)
    return [VOCAB.index(ch) for ch in text]


def make_problems(cfg: AdditionConfig, seed: int, n: int) -> Problems:
    """``n`` random problems, fixed by the integer ``seed``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, cfg.digits + 1, size=(n, 2))
    low = np.where(lengths == 1, 0, 10 ** (lengths - 1))
    ab = rng.integers(low, 10**lengths)  # uniform among numbers with that many digits
    questions, answers, masks = [], [], []
    for a, b in ab:
        c = str(a + b)
        questions.append(_encode(f"{a}+{b}=", cfg.question_len, left_pad=True))
        answers.append(_encode(c + VOCAB[END], cfg.answer_len, left_pad=False))
        masks.append([1.0] * (len(c) + 1) + [0.0] * (cfg.answer_len - len(c) - 1))
    return Problems(
        jnp.asarray(questions, jnp.int32), jnp.asarray(answers, jnp.int32),
        jnp.asarray(masks, jnp.float32),
    )


def _cell(hidden: int, params: PyTree, h: jax.Array, token: jax.Array) -> jax.Array:
    """One ``flax.linen.GRUCell`` step on a one-hot token."""
    new_h, _ = nn.GRUCell(hidden).apply({"params": params}, h, jax.nn.one_hot(token, VOCAB_SIZE))
    return new_h


def _readout(params: PyTree, h: jax.Array) -> jax.Array:
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def encode(cfg: AdditionConfig, params: PyTree, question: jax.Array) -> jax.Array:
    """Final encoder state [batch, hidden] after reading ``question`` [batch, question_len]."""
    h0 = jnp.zeros(question.shape[:-1] + (cfg.hidden,), jnp.float32)
    step = lambda h, tok: (_cell(cfg.hidden, params["encoder"], h, tok), None)
    return jax.lax.scan(step, h0, jnp.moveaxis(question, -1, 0))[0]


def init_params(cfg: AdditionConfig, key: jax.Array) -> PyTree:
    """Flax default initialisation (lecun normal inputs, orthogonal recurrent, zero biases)."""
    k_enc, k_dec, k_out = jax.random.split(key, 3)
    h = jnp.zeros((1, cfg.hidden))
    x = jnp.zeros((1, VOCAB_SIZE))
    return {
        "encoder": nn.GRUCell(cfg.hidden).init(k_enc, h, x)["params"],
        "decoder": nn.GRUCell(cfg.hidden).init(k_dec, h, x)["params"],
        "out": nn.Dense(VOCAB_SIZE).init(k_out, h)["params"],
    }


def perm_spec(params: PyTree) -> PyTree:
    """The GRU's permutation spec: one label ``"h"`` for the hidden units everywhere.

    The decoder starts from the encoder's final state, so encoder and decoder hidden units are
    the same units and share the label; gates act elementwise on them, so permuting every
    ``hidden``-sized axis together leaves the function unchanged. Vocabulary axes (one-hot inputs,
    output logits) are fixed (``None``).
    """

    def cell_spec(cell):
        spec = {}
        for name, sub in cell.items():
            recurrent = name.startswith("h")  # hr, hz, hn read the hidden state; ir, iz, in a token
            spec[name] = {"kernel": ("h", "h") if recurrent else (None, "h")}
            if "bias" in sub:
                spec[name]["bias"] = ("h",)
        return spec

    return {
        "encoder": cell_spec(params["encoder"]),
        "decoder": cell_spec(params["decoder"]),
        "out": {"kernel": ("h", None), "bias": (None,)},
    }


def apply(cfg: AdditionConfig, params: PyTree, question: jax.Array, answer: jax.Array):
    """Teacher-forced logits [batch, answer_len, vocab]: the decoder reads '=', answer[:-1]."""
    answer_in = jnp.concatenate(
        [jnp.full(answer.shape[:-1] + (1,), EQUALS, jnp.int32), answer[..., :-1]], axis=-1
    )

    def step(h, tok):
        h = _cell(cfg.hidden, params["decoder"], h, tok)
        return h, _readout(params, h)

    _, logits = jax.lax.scan(step, encode(cfg, params, question), jnp.moveaxis(answer_in, -1, 0))
    return jnp.moveaxis(logits, 0, -2)


def greedy(cfg: AdditionConfig, params: PyTree, question: jax.Array) -> jax.Array:
    """Greedy decoding: tokens [batch, answer_len], each fed back as the next input."""

    def step(carry, _):
        h, tok = carry
        h = _cell(cfg.hidden, params["decoder"], h, tok)
        tok = jnp.argmax(_readout(params, h), axis=-1).astype(jnp.int32)
        return (h, tok), tok

    start = jnp.full(question.shape[:-1], EQUALS, jnp.int32)
    _, tokens = jax.lax.scan(step, (encode(cfg, params, question), start), None,
                             length=cfg.answer_len)
    return jnp.moveaxis(tokens, 0, -1)


def loss_fn(cfg: AdditionConfig, params: PyTree, batch: Problems) -> jax.Array:
    """Mean cross-entropy per answer character, up to and including the end token."""
    logits = apply(cfg, params, batch.question, batch.answer)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.answer)
    return jnp.sum(ce * batch.mask) / jnp.sum(batch.mask)


def evaluate(cfg: AdditionConfig, params: PyTree, data: Problems) -> tuple[jax.Array, jax.Array]:
    """(success rate, loss): exact match of the greedily decoded answer, teacher-forced loss."""
    pred = greedy(cfg, params, data.question)
    correct = jnp.all((pred == data.answer) | (data.mask == 0), axis=-1)
    return jnp.mean(correct.astype(jnp.float32)), loss_fn(cfg, params, data)


class TrainState(NamedTuple):
    """Per-model training state (every leaf carries a leading model axis in a zoo)."""

    params: PyTree
    adam: optax.ScaleByAdamState
    key: jax.Array  # batch sampling key of this model


def init_models(cfg: AdditionConfig, seeds: jax.Array) -> TrainState:
    """Initial states for models with integer ``seeds`` [m] (init and batch order from the seed)."""

    def one(seed):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = init_params(cfg, k_init)
        return TrainState(params, optax.scale_by_adam().init(params), k_data)

    return jax.vmap(one)(seeds)


def train_models(
    cfg: AdditionConfig,
    state: TrainState,
    lrs: jax.Array,
    train: Problems,
    batch_size: int,
    steps: int,
    start_step: int = 0,
) -> tuple[TrainState, jax.Array]:
    """Train a population of models (one batch size) with Adam for ``steps`` steps.

    Args:
      cfg: task configuration.
      state: :class:`TrainState` with a leading model axis [m].
      lrs: learning rate of each model [m].
      train: the training problems; each model samples its own batches (with replacement).
      batch_size: batch size shared by the population (so the step is one vmapped program).
      steps: number of steps to run.
      start_step: index of the first step (batches depend on the step index, so a run split
        into pieces sees the same batches as one run).

    Returns:
      The new state and the training loss of every model at every step [steps, m].
    """
    n = train.question.shape[0]
    adam = optax.scale_by_adam()

    def model_step(st: TrainState, lr, step):
        idx = jax.random.randint(jax.random.fold_in(st.key, step), (batch_size,), 0, n)
        batch = jax.tree.map(lambda x: x[idx], train)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, batch))(st.params)
        updates, adam_state = adam.update(grads, st.adam, st.params)
        params = jax.tree.map(lambda p, u: p - lr * u, st.params, updates)
        return TrainState(params, adam_state, st.key), loss

    def scan_step(st, step):
        return jax.vmap(model_step, in_axes=(0, 0, None))(st, lrs, step)

    return jax.lax.scan(scan_step, state, start_step + jnp.arange(steps))


def evaluate_models(cfg: AdditionConfig, params: PyTree, data: Problems):
    """(success rate [m], loss [m]) for a population of models with a leading model axis."""
    return jax.vmap(lambda p: evaluate(cfg, p, data))(params)
