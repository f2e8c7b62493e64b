"""Several tasks as one inner problem: the population split across tasks, one jitted step.

``MultiTaskProblem`` has the interface of ``InnerProblem`` (``init``, ``fresh``, ``reset``,
``unroll``), so the estimators need no change: each task is its own vmapped group of members
inside the one jitted outer step, and the groups' outputs are put back in member order.

Members. With ``N`` members (``P = N/2`` antithetic pairs) and ``G`` tasks, task ``g`` gets the
pairs ``g*m ... (g+1)*m - 1`` (``m = P/G``), i.e. members ``[g*m, (g+1)*m)`` and
``[P + g*m, P + (g+1)*m)``: both members of a pair train the same task, so their fitness
difference measures the perturbation. Each group's episodes are staggered among its own pairs
(``pair_positions``).

Fitness normalisation. A task's losses are divided by its *reference loss*, the mean training
loss of fresh initialisations at the start (``meta_train.train.initial_loss``), before they
become fitness: every task starts at 1, and a pair's difference counts as a relative change, so
a language model's loss of 5 does not outweigh a classifier's 2. (Centred ranks would also
remove the scale, but they rank members of different tasks against each other, which mixes
"which task" with "which perturbation".) The raw per-task losses are reported as
``meta_loss/<task>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meta_train.inner import InnerProblem, InnerState, UnrollOutput

PyTree = Any


def group_members(num_members: int, num_groups: int) -> list[np.ndarray]:
    """Member indices of each task's group: its pairs' first members, then their partners."""
    half = num_members // 2
    if num_members % 2 or half % num_groups:
        raise ValueError(f"the population ({num_members}) must be 2 x a multiple of the number "
                         f"of tasks ({num_groups}): each task gets whole antithetic pairs")
    m = half // num_groups
    return [np.concatenate([np.arange(k * m, (k + 1) * m), half + np.arange(k * m, (k + 1) * m)])
            for k in range(num_groups)]


class GroupedInnerState(NamedTuple):
    """Per task, the ``InnerState`` of its members; ``step`` and ``length`` in member order."""

    groups: tuple[InnerState, ...]

    @property
    def step(self) -> jax.Array:
        return self.in_member_order([g.step for g in self.groups])

    @property
    def length(self) -> jax.Array:
        return self.in_member_order([g.length for g in self.groups])

    def in_member_order(self, parts: list[jax.Array]) -> jax.Array:
        """Per-group arrays (leading member axis) as one array in member order."""
        num = sum(np.shape(g.step)[0] for g in self.groups)
        order = np.concatenate(group_members(num, len(self.groups)))
        return jnp.concatenate(parts, axis=0)[np.argsort(order)]


class MultiTaskProblem:
    """Advance a population split across several ``InnerProblem``s (one per task).

    Args:
      problems: one ``InnerProblem`` per task (their optimizers must share the meta-parameter
        structure: a weight-space-agnostic method).
      reference_losses: per task, the loss its fitness is divided by (module doc).
      names: the tasks' names (for metrics).
    """

    def __init__(self, problems: Sequence[InnerProblem], reference_losses: Sequence[float],
                 names: Sequence[str]):
        if not len(problems) == len(reference_losses) == len(names) >= 1:
            raise ValueError("one reference loss and one name per problem")
        self.problems = tuple(problems)
        self.reference = tuple(float(r) for r in reference_losses)
        self.names = tuple(names)

    def members(self, num_members: int) -> list[np.ndarray]:
        """Member indices of each task's group (``group_members``)."""
        return group_members(num_members, len(self.problems))

    def pair_positions(self, num_members: int) -> tuple[jax.Array, jax.Array]:
        """Each member's pair index within its task, and the number of pairs of its task."""
        half = num_members // 2
        m = half // len(self.problems)
        pair = jnp.arange(num_members) % half
        return pair % m, jnp.full((num_members,), m)

    def init(self, meta_params: PyTree, num_members: int) -> GroupedInnerState:
        groups = tuple(p.init(meta_params, len(idx))
                       for p, idx in zip(self.problems, self.members(num_members), strict=True))
        return GroupedInnerState(groups)

    def fresh(self, meta_params: PyTree, key: jax.Array, length: jax.Array) -> GroupedInnerState:
        num = jnp.shape(length)[0]
        groups = tuple(
            p.fresh(_take(meta_params, idx), jax.random.fold_in(key, g), length[idx])
            for g, (p, idx) in enumerate(zip(self.problems, self.members(num), strict=True)))
        return GroupedInnerState(groups)

    def reset(self, meta_params: PyTree, state: GroupedInnerState, done: jax.Array,
              key: jax.Array, length: jax.Array | int) -> GroupedInnerState:
        num = state.step.shape[0]
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (num,))
        groups = tuple(
            p.reset(_take(meta_params, idx), s, done[idx], jax.random.fold_in(key, g),
                    length[idx])
            for g, (p, s, idx) in enumerate(
                zip(self.problems, state.groups, self.members(num), strict=True)))
        return GroupedInnerState(groups)

    def unroll(self, meta_params: PyTree, state: GroupedInnerState, num_steps: int,
               data: Sequence[PyTree] | None = None) -> tuple[GroupedInnerState, UnrollOutput]:
        """Every group by ``num_steps``; losses divided by each task's reference loss."""
        num = state.step.shape[0]
        data = data if data is not None else (None,) * len(self.problems)
        groups, outs = [], []
        for p, s, idx, d, ref in zip(self.problems, state.groups, self.members(num), data,
                                     self.reference, strict=True):
            s, out = p.unroll(_take(meta_params, idx), s, num_steps, d)
            groups.append(s)
            outs.append(out._replace(losses=out.losses / ref))
        new = GroupedInnerState(tuple(groups))
        fields = zip(*outs, strict=True)
        merged = UnrollOutput(*(new.in_member_order(list(parts)) for parts in fields))
        return new, merged

    def metrics(self, out: UnrollOutput) -> dict[str, jax.Array]:
        """Per task: its members' mean raw training loss and their non-finite steps."""
        num = out.losses.shape[0]
        rows = {}
        for name, idx, ref in zip(self.names, self.members(num), self.reference, strict=True):
            rows[f"meta_loss/{name}"] = out.losses[idx].mean() * ref
            rows[f"nonfinite/{name}"] = out.nonfinite[idx].sum()
        return rows


def _take(tree: PyTree, idx: np.ndarray) -> PyTree:
    return jax.tree.map(lambda x: x[idx], tree)
