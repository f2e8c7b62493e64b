"""The inner problem: a population of task training runs driven by a learned optimizer.

This module knows nothing about estimators. It advances ``N`` inner runs (task parameters,
optimizer state, step counter, data key) by ``K`` steps, each member with its own
meta-parameters: ``vmap`` over members or one member after another (``MEMBER_LOOPS``),
``lax.scan`` over steps, batches sampled inside the jit with ``task.sample_batch``. Estimators
(``meta_train.estimators``) decide which meta-parameters each member gets, when members reset,
and how the losses become a fitness.

Antithetic pairs: member ``i`` and member ``i + N/2`` always share their task initialisation and
their batches (both are derived from the pair index ``i mod N/2``), so the difference of their
losses measures the perturbation, not the data.

Example (``tasks`` and ``learned_opt`` of this project)::

    task = tasks.get_task("mlp_fmnist_tiny")
    lopt = learned_opt.learned_optimizer("sgdm", task.init(jax.random.PRNGKey(0)))
    problem = InnerProblem(task, lopt, loss_cap=10.0)
    meta = lopt.init(jax.random.PRNGKey(1))
    population = jax.tree.map(lambda x: jnp.stack([x] * 4), meta)   # 4 members
    state = problem.init(meta, 4)                                  # all due for a reset
    state = problem.reset(population, state, jnp.ones(4, bool), jax.random.PRNGKey(2), 20)
    state, out = problem.unroll(population, state, 10)             # out.losses: [4, 10]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

PyTree = Any

# How the members of a population are advanced: ``vmap`` batches them into one program (what a
# GPU wants); ``map`` runs them one after another (``lax.map``) on each device, so that one
# member's activations stay in the CPU's caches between ops (rnn_lm's PES step, population 16:
# 221 -> 377 member-steps/s; docs/meta_train.md). ``auto``: ``map`` on CPU, ``vmap`` elsewhere.
MEMBER_LOOPS = ("auto", "vmap", "map")


def resolve_member_loop(member_loop: str) -> str:
    """``vmap`` or ``map`` for ``member_loop`` on the default backend (see ``MEMBER_LOOPS``)."""
    if member_loop not in MEMBER_LOOPS:
        raise ValueError(f"member_loop must be one of {MEMBER_LOOPS}, got {member_loop!r}")
    if member_loop == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return member_loop


def over_members(fn, xs: PyTree, member_loop: str = "auto") -> PyTree:
    """``fn`` applied to each slice of ``xs`` along its leading axis, batched (``vmap``) or one
    after another (``lax.map``); see ``MEMBER_LOOPS``.

    Example:
      >>> over_members(lambda x: x @ x, jnp.ones((3, 2)), "map").tolist()
      [2.0, 2.0, 2.0]
    """
    if resolve_member_loop(member_loop) == "vmap":
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs)


def step_keys(data_key: jax.Array, start: jax.Array | int, num_steps: int) -> jax.Array:
    """The batch keys of steps ``start .. start + num_steps - 1`` of a run whose data key is
    ``data_key``: step ``s`` draws its batch from ``fold_in(data_key, s)``."""
    steps = jnp.asarray(start) + jnp.arange(num_steps)
    return jax.vmap(lambda s: jax.random.fold_in(data_key, s))(steps)


def train_step(task, update, params: PyTree, opt_state: PyTree, key: jax.Array,
               data: PyTree = None) -> tuple[PyTree, PyTree, jax.Array]:
    """One training step: the batch ``task.sample_batch(key, "train", data)``, the loss and its
    gradient, ``update(grads, opt_state, params) -> (updates, opt_state)`` (an optax
    ``update``), ``params + updates``. Returns ``(params, opt_state, loss)``.

    ``data`` (default ``task.data``): pass the task's arrays as an argument of the enclosing
    jit so that they are not embedded in the compiled program as constants.
    """
    batch = task.sample_batch(key, "train", data=data)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_steps(task, update, params: PyTree, opt_state: PyTree, keys: jax.Array,
                data: PyTree = None) -> tuple[PyTree, PyTree, jax.Array]:
    """``train_step`` once per key of ``keys`` (``[T, ...]``) in one ``lax.scan``: the training
    loop of every inner run, evaluation and benchmark. Returns ``(params, opt_state, losses
    [T])``.

    Example:
      >>> import optax
      >>> class Quadratic:  # a task: batches are ignored, the loss is |p|^2
      ...     sample_batch = staticmethod(lambda key, split="train", data=None: None)
      ...     loss = staticmethod(lambda p, batch: jnp.sum(p ** 2))
      >>> tx = optax.sgd(0.25)
      >>> p, _, losses = train_steps(Quadratic(), tx.update, jnp.ones(2), tx.init(jnp.ones(2)),
      ...                            jax.random.split(jax.random.key(0), 3))
      >>> losses.tolist(), p.tolist()
      ([2.0, 0.5, 0.125], [0.125, 0.125])
    """
    def body(carry, key):
        params, opt_state, loss = train_step(task, update, *carry, key, data)
        return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), keys)
    return params, opt_state, losses


class InnerState(NamedTuple):
    """A population of inner training runs; every field has a leading member axis ``N``."""

    params: PyTree  # task parameters
    opt_state: PyTree  # learned-optimizer state
    step: jax.Array  # int32 [N]: inner steps taken since the last reset
    length: jax.Array  # int32 [N]: horizon of the current episode (its reset comes at step==length)
    data_key: jax.Array  # uint32 [N, 2]: the batch of step s is sample_batch(fold_in(key, s))


class UnrollOutput(NamedTuple):
    """What ``InnerProblem.unroll`` reports for each member and inner step."""

    losses: jax.Array  # float32 [N, K]: training loss, non-finite or huge values capped
    nonfinite: jax.Array  # bool [N, K]: the raw training loss was NaN or infinite
    capped: jax.Array  # bool [N, K]: the loss was replaced by the cap (non-finite included)


def pair_keys(key: jax.Array, num_members: int) -> jax.Array:
    """One key per member such that members ``i`` and ``i + N/2`` get the same key."""
    half = num_members // 2
    pair = jnp.arange(num_members) % half
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(pair)


def cap_loss(loss: jax.Array, cap: float | jax.Array) -> jax.Array:
    """Bounded penalty: NaN/inf and losses above ``cap`` become ``cap``."""
    return jnp.where(jnp.isfinite(loss), jnp.minimum(loss, cap), cap)


class InnerProblem:
    """Advance a population of inner runs of ``task`` trained by ``lopt``.

    Args:
      task: a task (``init``, ``loss``, ``sample_batch``).
      lopt: a learned optimizer (``init_state``, ``update``).
      loss_cap: every per-step training loss is clipped to this value, NaN/inf included, so a
        diverging member gives a bounded, finite fitness.
      member_loop: ``MEMBER_LOOPS``: how ``unroll`` advances the members (same results to float
        rounding; a speed choice).
      mesh: the 1-D mesh (axis ``pop``) the population is sharded over; with ``map`` each device
        loops over its own members (``shard_map``) instead of the whole population.
    """

    def __init__(self, task, lopt, loss_cap: float, member_loop: str = "auto",
                 mesh: Mesh | None = None):
        self.task = task
        self.lopt = lopt
        self.loss_cap = float(loss_cap)
        self.member_loop = resolve_member_loop(member_loop)
        self.mesh = mesh

    def pair_positions(self, num_members: int) -> tuple[jax.Array, jax.Array]:
        """Each member's antithetic-pair index and the number of pairs (for staggering)."""
        half = num_members // 2
        return jnp.arange(num_members) % half, jnp.full((num_members,), half)

    def map_members(self, fn, members: PyTree, shared: PyTree = None) -> PyTree:
        """``fn(member, shared)`` for each member (the leading axis of ``members``), advanced
        the way ``unroll`` advances them (``member_loop``)."""
        def run(members, shared):
            return over_members(lambda m: fn(m, shared), members, self.member_loop)

        if self.member_loop == "map" and self.mesh is not None and self.mesh.size > 1:
            # A loop over a sharded axis would gather the population on every device.
            pop, repl = PartitionSpec("pop"), PartitionSpec()
            run = jax.shard_map(run, mesh=self.mesh, in_specs=(pop, repl), out_specs=pop,
                                check_vma=False)
        return run(members, shared)

    def metrics(self, out: UnrollOutput) -> dict[str, jax.Array]:
        """Extra metrics of an unroll (none for one task; ``MultiTaskProblem`` adds per task)."""
        del out
        return {}

    def init(self, meta_params: PyTree, num_members: int) -> InnerState:
        """A population of placeholder runs that are all due for a reset (step == length == 0).

        The placeholders fix shapes and dtypes (for jit and checkpoints); the first ``reset``
        replaces them with fresh task initialisations.
        """
        def one():
            params = self.task.init(jax.random.PRNGKey(0))
            return params, self.lopt.init_state(meta_params, params)

        # Shapes only (no computation): the values are placeholders.
        params, opt_state = jax.eval_shape(one)
        zeros = lambda x: jnp.zeros((num_members, *x.shape), x.dtype)
        return InnerState(
            params=jax.tree.map(zeros, params),
            opt_state=jax.tree.map(zeros, opt_state),
            step=jnp.zeros(num_members, jnp.int32),
            length=jnp.zeros(num_members, jnp.int32),
            data_key=jnp.zeros((num_members, 2), jnp.uint32),
        )

    def fresh(self, meta_params: PyTree, key: jax.Array, length: jax.Array) -> InnerState:
        """Fresh runs: new task initialisation and data key per antithetic pair.

        Args:
          meta_params: population of meta-parameters (leading axis N), used by ``init_state``.
          key: the reset key; member ``i`` uses ``fold_in(key, i mod N/2)``.
          length: int [N] horizons of the new episodes.
        """
        num = jnp.shape(length)[0]
        keys = pair_keys(key, num)

        def one(mp, k, n):
            k_init, k_data = jax.random.split(k)
            params = self.task.init(k_init)
            return InnerState(
                params=params,
                opt_state=self.lopt.init_state(mp, params),
                step=jnp.zeros((), jnp.int32),
                length=jnp.asarray(n, jnp.int32),
                data_key=k_data,
            )

        return jax.vmap(one)(meta_params, keys, length)

    def reset(
        self,
        meta_params: PyTree,
        state: InnerState,
        done: jax.Array,
        key: jax.Array,
        length: jax.Array | int,
    ) -> InnerState:
        """Replace the members where ``done`` is true by fresh runs with horizon ``length``."""
        num = state.step.shape[0]
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (num,))
        new = self.fresh(meta_params, key, length)

        def pick(a, b):
            mask = done.reshape((num,) + (1,) * (a.ndim - 1))
            return jnp.where(mask, a, b)

        return jax.tree.map(pick, new, state)

    def step_one(
        self, meta_params: PyTree, state: InnerState, data: PyTree = None
    ) -> tuple[InnerState, jax.Array]:
        """One inner training step of a single member (no member axis). Returns the raw loss.

        ``data`` (default ``task.data``): pass the task's arrays as an argument of the enclosing
        jit so that they are not embedded in the compiled program as constants.
        """
        key = jax.random.fold_in(state.data_key, state.step)
        params, opt_state, loss = train_step(self.task, self._update(meta_params, state),
                                             state.params, state.opt_state, key, data)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    def _update(self, meta_params: PyTree, state: InnerState):
        """The learned optimizer's update as an optax ``update`` for one member."""
        # The episode's horizon is the run's length for optimizers that use training progress.
        return lambda grads, opt_state, params: self.lopt.update(
            meta_params, opt_state, grads, params, num_steps=state.length)

    def unroll(
        self, meta_params: PyTree, state: InnerState, num_steps: int, data: PyTree = None
    ) -> tuple[InnerState, UnrollOutput]:
        """Advance every member by ``num_steps`` steps with its own meta-parameters.

        Args:
          meta_params: meta-parameters with a leading member axis N.
          state: the population's inner state.
          num_steps: K (static).
          data: the task's arrays (default ``task.data``), see :meth:`step_one`.

        Returns:
          The new state and the capped per-step losses with the non-finite flags, shape [N, K].
        """

        def member(mp, st, data):
            params, opt_state, losses = train_steps(
                self.task, self._update(mp, st), st.params, st.opt_state,
                step_keys(st.data_key, st.step, num_steps), data)
            return st._replace(params=params, opt_state=opt_state,
                               step=st.step + num_steps), losses

        state, raw = self.map_members(lambda ms, d: member(*ms, d), (meta_params, state), data)
        out = UnrollOutput(
            losses=cap_loss(raw, self.loss_cap),
            nonfinite=~jnp.isfinite(raw),
            capped=~(raw < self.loss_cap),  # NaN compares False: counted as capped
        )
        return state, out
