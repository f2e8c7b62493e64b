"""Meta-gradient estimators on evosax 0.3: persistent ES over truncations, antithetic ES.

An estimator owns an evosax strategy (built once) and an ``InnerProblem``. Its ``step`` is a pure
function ``(state, key, t) -> (state, metrics)`` that the trainer jits; everything random in it
comes from ``key``, which the trainer derives from ``(seed, t)``.

* ``pes``: Persistent ES (Vicol et al. 2021; evosax ``PersistentES``). Each outer step unrolls
  every member by K inner steps (a truncation) and updates the meta-parameters from the
  accumulated perturbations of the member's current episode. evosax keeps one shared
  truncation counter; we bypass it (its ``T`` is set to "never") and reset members ourselves,
  per antithetic pair, so that the pairs' horizons are staggered: pair ``p`` of ``P`` starts with
  an episode shortened by ``floor(p * T / P)`` rounded down to a multiple of K. At a reset the
  member's accumulated perturbation is zeroed and it gets a fresh task initialisation. With
  ``min_horizon`` set, every episode's length is drawn log-uniformly in ``[min_horizon, T]``.
* ``es``: antithetic OpenAI-ES (evosax ``Open_ES``) over full unrolls of T steps from fresh
  initialisations at every outer step (unbiased, but T/K times more inner steps per update).

Meta-objectives: ``mean`` scores an unroll by its mean (capped) training loss; ``mean_log`` by
the mean of its logarithm, so that a relative improvement counts the same late in training as
early (with ``mean`` the large early losses dominate the fitness differences); ``final`` by the
training loss of the last step of the horizon (under PES only the truncation that ends an
episode is scored; the others get fitness 0, which antithetic pairs cancel exactly).

Safety: per-step losses are capped (``InnerProblem``), so fitness is always finite; if the
outer update nevertheless produced a non-finite mean, it is skipped (the previous estimator state
is kept) and counted in ``update_skipped``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# evosax.algorithms is imported where it is used: importing it creates arrays, which starts JAX's
# backends, and a multi-process run must call jax.distributed.initialize() before that.
from evosax.core.fitness_shaping import (
    centered_rank_fitness_shaping_fn,
    identity_fitness_shaping_fn,
)

from meta_train.inner import InnerProblem, InnerState, pair_keys

PyTree = Any

FITNESS_SHAPING = {
    "raw": identity_fitness_shaping_fn,
    "centered_rank": centered_rank_fitness_shaping_fn,
}
OBJECTIVES = ("mean", "mean_log", "final")
_LOG_FLOOR = 1e-6  # log of a loss that reached 0 stays finite


class RecordNormState(NamedTuple):
    """State of ``record_norm``: the global norm of the last gradient it saw."""

    norm: jax.Array


def record_norm() -> optax.GradientTransformation:
    """Identity transformation that stores the incoming gradient's global norm (for logging)."""

    def init(params):
        del params
        return RecordNormState(norm=jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, RecordNormState(norm=optax.tree.norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


# Outer learning-rate schedules: constant (the paper's) or cosine decay to 10% over the run.
OUTER_SCHEDULES = ("constant", "cosine")


def outer_optimizer(learning_rate: float, clip: float = 1.0, weight_decay: float = 0.0,
                    schedule: str = "constant", total_steps: int | None = None
                    ) -> optax.GradientTransformation:
    """The outer optimizer: Adam (the paper's; AdamW with ``weight_decay > 0``, Celo2's) after
    clipping the ES gradient to global norm ``clip``, at a constant learning rate or one that
    decays by cosine to 10% over ``total_steps`` (``schedule``, one of ``OUTER_SCHEDULES``).

    Estimators accept any optax optimizer (``optimizer=``); the ``grad_norm`` metric is the
    norm stored by a :func:`record_norm` in it (NaN without one).
    """
    if schedule not in OUTER_SCHEDULES:
        raise ValueError(f"schedule must be one of {OUTER_SCHEDULES}, got {schedule!r}")
    lr = learning_rate
    if schedule == "cosine":
        if not total_steps or total_steps < 1:
            raise ValueError("the cosine outer schedule needs total_steps >= 1")
        lr = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.1)
    # Plain Adam when there is no decay: the optimizer state of earlier runs' checkpoints.
    inner = optax.adam(lr) if weight_decay == 0 else optax.adamw(lr, weight_decay=weight_decay)
    return optax.chain(record_norm(), optax.clip_by_global_norm(clip), inner)


def _no_metrics(key, population, fitness, state, params):
    # evosax's default metrics carry whole solution vectors; the trainer computes its own.
    return {}


class EstimatorState(NamedTuple):
    """Everything an estimator carries from one outer step to the next (all checkpointed)."""

    es: Any  # evosax state: mean, outer optimizer state, perturbation (accumulators)
    inner: InnerState | None  # PES: the persistent inner runs; ES: None


def _constrain(tree: PyTree, sharding) -> PyTree:
    """Shard the leading (member) axis of every leaf, when a sharding is given."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


class _Base:
    """Shared construction: the evosax strategy, fitness shaping, the safety guard, metrics."""

    name: str
    strategy_cls: type

    def __init__(
        self,
        problem: InnerProblem,
        meta_template: PyTree,
        *,
        population: int,
        truncation: int,
        horizon: int,
        std: float = 0.01,
        optimizer: optax.GradientTransformation | None = None,
        objective: str = "mean",
        fitness_shaping: str = "raw",
        min_horizon: int = 0,
        member_sharding=None,
    ):
        if population < 2 or population % 2:
            raise ValueError(
                f"population must be even and >= 2 (antithetic pairs), got {population}"
            )
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if fitness_shaping not in FITNESS_SHAPING:
            raise ValueError(
                f"fitness_shaping must be one of {tuple(FITNESS_SHAPING)}, got {fitness_shaping!r}"
            )
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        if min_horizon and not truncation <= min_horizon <= horizon:
            raise ValueError(f"min_horizon must be 0 or in [truncation ({truncation}), horizon "
                             f"({horizon})], got {min_horizon}")
        self.problem = problem
        self.population = population
        self.truncation = truncation
        self.horizon = horizon
        self.std = std
        self.objective = objective
        self.fitness_shaping = fitness_shaping
        self.min_horizon = min_horizon
        self.member_sharding = member_sharding
        self.strategy = self._build(
            meta_template, optimizer or outer_optimizer(3e-3), FITNESS_SHAPING[fitness_shaping]
        )

    def _build(self, template, optimizer, shaping):
        raise NotImplementedError

    def inner_steps_per_outer_step(self) -> int:
        raise NotImplementedError

    def mean(self, state: EstimatorState) -> PyTree:
        """The current meta-parameters (the search distribution's mean) as a pytree."""
        return self.strategy.get_mean(state.es)

    def _fitness(self, losses: jax.Array, finished: jax.Array) -> jax.Array:
        """Per-member fitness of capped losses [N, K] (``final``: 0 unless the episode ended)."""
        if self.objective == "mean":
            return losses.mean(axis=1)
        if self.objective == "mean_log":
            return jnp.log(jnp.maximum(losses, _LOG_FLOOR)).mean(axis=1)
        return jnp.where(finished, losses[:, -1], 0.0)

    def _tell(self, key, population, fitness, es_state):
        new, _ = self.strategy.tell(key, population, fitness, es_state, self.es_params)
        half = fitness.shape[0] // 2
        # No antithetic pair differs (e.g. every member at the loss cap): the estimate is 0, but
        # recovering the perturbations from the population rounds, and Adam would turn that
        # noise into full-size steps.
        informative = jnp.any(fitness[:half] != fitness[half:])
        ok = jnp.all(jnp.isfinite(new.mean)) & informative
        # Guard: never let a non-finite mean (or optimizer state) replace a finite one, nor an
        # uninformative estimate move it.
        guarded = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, es_state)
        # Logged when the outer optimizer records it (``outer_optimizer`` does); NaN otherwise,
        # so that any optax optimizer can be injected.
        grad_norm = optax.tree_utils.tree_get(new.opt_state, "norm", default=jnp.nan)
        return guarded, grad_norm, ~ok

    def _metrics(self, out, fitness_raw, finished, grad_norm, skipped):
        per_member = out.losses.mean(axis=1)
        n_fin = finished.sum()
        final = jnp.where(finished, out.losses[:, -1], 0.0).sum() / jnp.maximum(n_fin, 1)
        return {
            "meta_loss": per_member.mean(),
            "inner_loss_min": per_member.min(),
            "inner_loss_max": per_member.max(),
            "final_loss": jnp.where(n_fin > 0, final, jnp.nan),
            "episodes_done": n_fin,
            "nonfinite": out.nonfinite.sum(),
            "capped": out.capped.sum(),
            "grad_norm": grad_norm,
            "update_skipped": skipped.astype(jnp.int32),
            "fitness_mean": fitness_raw.mean(),
        } | self.problem.metrics(out)


class PES(_Base):
    """Persistent ES over truncated unrolls with staggered, per-pair resets."""

    name = "pes"

    def _build(self, template, optimizer, shaping):
        if self.horizon % self.truncation:
            raise ValueError(
                f"horizon ({self.horizon}) must be a multiple of truncation ({self.truncation})"
            )
        if self.objective == "final" and self.fitness_shaping != "raw":
            raise ValueError(
                "objective 'final' under pes scores only the truncations that end an episode "
                "(fitness 0 elsewhere); ranking those zeros is meaningless: use fitness_shaping "
                "'raw'"
            )
        from evosax.algorithms import PersistentES  # not at import time: see the imports

        strategy = PersistentES(
            self.population,
            solution=template,
            optimizer=optimizer,
            std_schedule=optax.constant_schedule(self.std),
            fitness_shaping_fn=shaping,
            metrics_fn=_no_metrics,
        )
        # evosax's shared counter would reset every member at once: make it never fire.
        self.es_params = strategy.default_params.replace(
            T=jnp.iinfo(jnp.int32).max, K=self.truncation
        )
        return strategy

    def inner_steps_per_outer_step(self) -> int:
        return self.population * self.truncation

    def sample_lengths(self, key: jax.Array) -> jax.Array:
        """Horizon of each member's next episode (the same for both members of a pair).

        ``horizon`` when ``min_horizon`` is 0; otherwise drawn log-uniformly in
        ``[min_horizon, horizon]`` and rounded to a multiple of K (as Celo does), so that the
        rule cannot tie its behaviour to one episode length.
        """
        if not self.min_horizon:
            return jnp.full((self.population,), self.horizon, jnp.int32)
        u = jax.vmap(jax.random.uniform)(pair_keys(key, self.population))
        lo, hi = math.log(self.min_horizon), math.log(self.horizon)
        length = jnp.exp(lo + u * (hi - lo))
        k = self.truncation
        length = jnp.round(length / k) * k
        return jnp.clip(length, k * math.ceil(self.min_horizon / k), self.horizon).astype(
            jnp.int32)

    def first_lengths(self, key: jax.Array | None = None) -> jax.Array:
        """Horizon of each member's first episode: staggered per antithetic pair.

        Pair ``p`` of ``P`` (the pairs of its task, with several tasks) starts with an episode
        shortened by ``floor(p * L / P)`` (rounded
        down to a multiple of K), ``L`` its drawn length (``sample_lengths``).
        """
        full = (jnp.full((self.population,), self.horizon, jnp.int32) if key is None
                else self.sample_lengths(key))
        # Pair positions among the pairs that train the same task (all pairs for one task).
        pair, num_pairs = self.problem.pair_positions(self.population)
        offset = (pair * full // num_pairs) // self.truncation * self.truncation
        return (full - offset).astype(jnp.int32)

    def init(self, key: jax.Array, meta_params: PyTree) -> EstimatorState:
        es_state = self.strategy.init(key, meta_params, self.es_params)
        inner = self.problem.init(meta_params, self.population)
        return EstimatorState(es=es_state, inner=inner)

    def step(self, state: EstimatorState, key: jax.Array, t: jax.Array, data=None):
        k_reset, k_ask, k_tell = jax.random.split(key, 3)
        inner = state.inner
        # Members whose episode ended in the previous step start a new one (all of them at t=0).
        done = inner.step >= inner.length
        es_state = state.es.replace(
            pert_accum=jnp.where(done[:, None], 0.0, state.es.pert_accum)
        )
        population, es_state = self.strategy.ask(k_ask, es_state, self.es_params)
        population = _constrain(population, self.member_sharding)
        # fold_in rather than a fourth split: runs with fixed horizons keep their trajectory.
        k_length = jax.random.fold_in(k_reset, 1)
        length = jnp.where(t == 0, self.first_lengths(k_length), self.sample_lengths(k_length))
        inner = self.problem.reset(population, inner, done, k_reset, length)
        inner = _constrain(inner, self.member_sharding)
        inner, out = self.problem.unroll(population, inner, self.truncation, data)
        finished = inner.step >= inner.length
        fitness = self._fitness(out.losses, finished)
        es_state, grad_norm, skipped = self._tell(k_tell, population, fitness, es_state)
        metrics = self._metrics(out, fitness, finished, grad_norm, skipped)
        return EstimatorState(es=es_state, inner=inner), metrics


class FullES(_Base):
    """Antithetic OpenAI-ES over full unrolls of ``horizon`` steps from fresh initialisations."""

    name = "es"

    def _build(self, template, optimizer, shaping):
        from evosax.algorithms import Open_ES  # not at import time: see the imports

        strategy = Open_ES(
            self.population,
            solution=template,
            use_antithetic_sampling=True,
            optimizer=optimizer,
            std_schedule=optax.constant_schedule(self.std),
            fitness_shaping_fn=shaping,
            metrics_fn=_no_metrics,
        )
        self.es_params = strategy.default_params
        return strategy

    def inner_steps_per_outer_step(self) -> int:
        return self.population * self.horizon

    def init(self, key: jax.Array, meta_params: PyTree) -> EstimatorState:
        return EstimatorState(es=self.strategy.init(key, meta_params, self.es_params), inner=None)

    def step(self, state: EstimatorState, key: jax.Array, t: jax.Array, data=None):
        del t
        k_reset, k_ask, k_tell = jax.random.split(key, 3)
        population, es_state = self.strategy.ask(k_ask, state.es, self.es_params)
        population = _constrain(population, self.member_sharding)
        length = jnp.full((self.population,), self.horizon, jnp.int32)
        inner = self.problem.fresh(population, k_reset, length)
        inner = _constrain(inner, self.member_sharding)
        _, out = self.problem.unroll(population, inner, self.horizon, data)
        finished = jnp.ones(self.population, bool)
        fitness = self._fitness(out.losses, finished)
        es_state, grad_norm, skipped = self._tell(k_tell, population, fitness, es_state)
        metrics = self._metrics(out, fitness, finished, grad_norm, skipped)
        return EstimatorState(es=es_state, inner=None), metrics


ESTIMATORS = {"pes": PES, "es": FullES}
