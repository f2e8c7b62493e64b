"""Measuring cost: time, matrix-product FLOPs and the machine's limits, for meta-training.

``bench_one`` times one PES outer step (exactly the trainer's jitted step) against the same
K inner steps of the same members with the same learned optimizer and nothing else, and
against plain Adam training of those members; ``profile_task`` splits the time of a member
inner step into its parts (task, update, estimator) with their matmul FLOPs and bytes
(``flops_and_bytes``), to be read against ``machine_limits``. ``PlainUpdate`` puts an optax
rule behind the learned-optimizer interface of ``InnerProblem``, so that an inner unroll can
be timed without the update network. ``scripts/bench_meta_train.py`` prints the tables.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from meta_train import benchmarks
    >>> jaxpr = jax.make_jaxpr(jnp.matmul)(jnp.ones((4, 3)), jnp.ones((3, 5))).jaxpr
    >>> benchmarks.matmul_flops(jaxpr)  # 2 * (4 * 5 outputs) * 3
    120.0
    >>> r = benchmarks.bench_one("mlp_fmnist_tiny", "unf", population=2, truncation=2,
    ...                          horizon=4, repeats=1, shard=False)  # doctest: +SKIP
    >>> print(f"{r['inner_steps_per_s']:.0f} inner steps/s, "
    ...       f"estimator overhead {r['overhead_pct']:.0f}%")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class PlainUpdate:
    """A hand-designed rule behind the learned-optimizer interface of ``InnerProblem``
    (``meta_params`` ignored), so that the inner unroll can be timed without the update
    network: ``sgd`` (the task's own share: sampling, forward, backward, p - lr g) or any
    other optax transformation."""

    def __init__(self, tx):
        self.tx = tx

    def init_state(self, meta_params, params):
        del meta_params
        return self.tx.init(params)

    def update(self, meta_params, state, grads, params, num_steps=None):
        del meta_params, num_steps
        return self.tx.update(grads, state, params)


# --------------------------------------------------------------------------------------------
# Timing.


def time_call(fn) -> float:
    """Seconds until the result of ``fn()`` is ready (its first call includes compilation)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def time_rounds(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every ``runs[name]()``, once per round for ``repeats`` rounds.

    The runs alternate so that a change of machine load hits them alike."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            times[k].append(time_call(f))
    return times


# --------------------------------------------------------------------------------------------
# FLOPs, bytes and the machine's limits.


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products (dot_general, conv_general_dilated) of a jaxpr, nested
    jaxprs included (scan bodies times their length).

    Counted on the jaxpr rather than taken from XLA's cost analysis, which counts a fused
    elementwise op at the size of its operand even when the fusion only computes a slice of it
    (the unf update on transformer_lm: 352 MFLOP for the 197 MFLOP of its per-parameter
    layers). Elementwise work is left out: it is bound by memory, not by FLOPs.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # kernel; XLA's default layout puts O first
            dn = eqn.params["dimension_numbers"]
            spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * spatial * rhs[dn.rhs_spec[1]]
        for sub in subjaxprs(eqn):
            reps = eqn.params.get("length", 1) if name == "scan" else 1
            total += reps * matmul_flops(sub)
    return total


def subjaxprs(eqn):
    """The jaxprs nested in the parameters of one equation (scan, cond, pjit, custom_vjp...)."""
    from jax.extend import core

    for v in eqn.params.values():
        for x in (v if isinstance(v, list | tuple) else (v,)):
            if isinstance(x, core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, core.Jaxpr):
                yield x


def flops_and_bytes(fn, *args) -> tuple[float, float]:
    """(matmul FLOPs from the jaxpr, bytes accessed from XLA's cost analysis) of ``fn``."""
    flops = matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return flops, float(cost.get("bytes accessed", 0.0))


def machine_limits(repeats=5, n=1024) -> dict[str, float]:
    """Measured in this process: float32 matmul FLOP/s (one n x n x n product on one device,
    and one per device at once, sharded) and the memory bandwidth of a sum over 64 MiB."""
    key = jax.random.key(0)
    a, b = jax.random.normal(key, (2, n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("d",))
    shard = NamedSharding(mesh, PartitionSpec("d"))
    ab = jax.device_put(jnp.broadcast_to(a, (len(devices), n, n)), shard)
    bb = jax.device_put(jnp.broadcast_to(b, (len(devices), n, n)), shard)
    mm_all = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b))
    big = jnp.ones((1 << 24,), jnp.float32)  # 64 MiB: well outside the caches
    add = jax.jit(jnp.sum)
    for f, args in ((mm, (a, b)), (mm_all, (ab, bb)), (add, (big,))):
        jax.block_until_ready(f(*args))
    best = {"one": [], "all": [], "add": []}
    for _ in range(repeats):
        for k, f, args in (("one", mm, (a, b)), ("all", mm_all, (ab, bb)), ("add", add, (big,))):
            t0 = time.perf_counter()
            for _ in range(5):
                out = f(*args)
            jax.block_until_ready(out)
            best[k].append((time.perf_counter() - t0) / 5)
    flop = 2.0 * n ** 3
    return {
        "matmul_one_flops": flop / min(best["one"]),
        "matmul_all_flops": len(devices) * flop / min(best["all"]),
        "bandwidth": big.size * 4 / min(best["add"]),
    }


# --------------------------------------------------------------------------------------------
# The pieces of a meta-training step, each as a call that can be timed.


def build_setup(task_name, optimizer, population, truncation, horizon, shard,
                member_loop="auto"):
    """The trainer's ``Setup`` for one benchmark (no wandb, no run directory)."""
    from meta_train import MetaTrainConfig
    from meta_train import train as mt

    cfg = MetaTrainConfig(task=task_name, optimizer=optimizer, population=population,
                          truncation=truncation, horizon=horizon, wandb="disabled", shard=shard,
                          member_loop=member_loop)
    return mt.build(cfg)


class TrainerStep:
    """Calling it runs the trainer's next outer step (the first call compiles) and returns
    its metrics; ``state`` is the trainer's state after the last one."""

    def __init__(self, setup):
        from meta_train import train as mt

        self.setup, self.state, self.t = setup, mt.init_state(setup), 0

    def __call__(self):
        self.state, metrics = self.setup.step_fn(self.state, np.int32(self.t))
        self.t += 1
        return metrics


def member_placement(setup):
    """(the member sharding, the initial meta-parameters given to every member, placed on it,
    the task's data replicated on every device)."""
    member = NamedSharding(setup.mesh, PartitionSpec("pop"))
    population = setup.config.population
    meta = jax.tree.map(lambda x: jnp.broadcast_to(x, (population, *jnp.shape(x))),
                        setup.init_meta_params)
    data = jax.device_put(setup.task.data, NamedSharding(setup.mesh, PartitionSpec()))
    return member, jax.device_put(meta, member), data


def unroll_call(problem, meta, inner, data, steps, donate=False):
    """A call that advances the members' ``inner`` state by ``steps`` inner steps of
    ``problem`` (jitted, data passed as an argument) and returns their losses."""
    fn = jax.jit(lambda m, s, d: problem.unroll(m, s, steps, d),
                 donate_argnums=(1,) if donate else ())
    box = [inner]

    def run():
        box[0], out = fn(meta, box[0], data)
        return out.losses

    return run


def fresh_unroll_call(problem, meta, data, member, steps, horizon, donate=False):
    """``unroll_call`` from fresh runs of length ``horizon``, placed on the member sharding."""
    population = jax.tree.leaves(meta)[0].shape[0]
    lengths = jnp.full((population,), horizon, jnp.int32)
    inner = jax.device_put(jax.jit(problem.fresh)(meta, jax.random.key(3), lengths), member)
    return unroll_call(problem, meta, inner, data, steps, donate)


def updates_call(problem, meta, params, grads, init_state, update, steps):
    """A call running ``steps`` updates of every member on fixed gradients (no task at all),
    members advanced as ``problem`` advances them."""

    def one_member(msgp, _):
        m, s, g, p = msgp

        def body(carry, _):
            s, p = carry
            u, s = update(m, s, g, p)
            return (s, jax.tree.map(jnp.add, p, u)), None

        return jax.lax.scan(body, (s, p), None, length=steps)[0]

    fn = jax.jit(lambda m, s, g, p: problem.map_members(one_member, (m, s, g, p)))
    s0 = jax.jit(jax.vmap(init_state))(meta, params)
    return lambda: fn(meta, s0, grads, params)


# --------------------------------------------------------------------------------------------
# Throughput: the estimator's overhead and the cost against Adam.


def bench_one(task_name, optimizer, population, truncation, horizon, repeats, shard,
              member_loop="auto") -> dict:
    """Median times of a PES outer step, of its inner unroll alone and of Adam's unroll.

    All three advance the same members by ``truncation`` inner steps, in alternating rounds;
    returns compile times, ms per call, inner steps/s, the estimator's overhead
    (step / unroll-only - 1, in %) and the PES step over the Adam unroll.
    """
    from meta_train.inner import InnerProblem

    setup = build_setup(task_name, optimizer, population, truncation, horizon, shard,
                        member_loop)
    step = TrainerStep(setup)
    compile_step = time_call(step)
    step()  # one more warm-up step (first resets done)
    problem = setup.estimator.problem
    member, meta, data = member_placement(setup)
    # The same inner steps with the same learned optimizer, without the estimator.
    unroll = unroll_call(problem, meta, step.state.inner, data, truncation)
    compile_unroll = time_call(unroll)
    # The throughput check's yardstick: plain optax.adam training of the same members, vmapped.
    adam = InnerProblem(setup.task, PlainUpdate(optax.adam(1e-3)), problem.loss_cap,
                        member_loop="vmap")
    adam_unroll = fresh_unroll_call(adam, meta, data, member, truncation, horizon)
    time_call(adam_unroll)
    times = time_rounds({"step": step, "unroll": unroll, "adam": adam_unroll}, repeats)
    step_s, unroll_s, adam_s = (float(np.median(times[k])) for k in ("step", "unroll", "adam"))
    return {
        "member_loop": problem.member_loop, "pes_over_adam": step_s / adam_s,
        "task": task_name, "population": population, "devices": setup.mesh.size,
        "meta_params": setup.lopt.num_meta_params(),
        "compile_step_s": compile_step, "compile_unroll_s": compile_unroll,
        "step_ms": 1e3 * step_s, "unroll_ms": 1e3 * unroll_s,
        "inner_steps_per_s": population * truncation / step_s,
        "overhead_pct": 100 * (step_s / unroll_s - 1),
    }


# --------------------------------------------------------------------------------------------
# Profile: where the time of a member inner step goes.


def profile_task(task_name, optimizer, population, truncation, horizon, repeats, shard,
                 member_loop="auto") -> dict:
    """Time, in interleaved rounds (minimum per part), the parts of a PES outer step.

    Parts (all jitted, the population sharded as in the trainer, data passed as arguments):
    ``pes step`` (the trainer's step), ``inner unroll`` (K inner steps of every member with the
    learned optimizer), ``task only`` (the same unroll with the update replaced by p - lr g:
    sampling, forward, backward), ``adam unroll`` (the same with optax.adam), ``update only``
    (K learned-optimizer updates of every member on fixed gradients: features + f + nominal
    term) and ``adam update only``. Returns the seconds of each part (``sec``), compile times
    and ``cost``: (matmul FLOPs, bytes) of one member's step of each part, unvmapped
    (``member_step_costs``).
    """
    setup = build_setup(task_name, optimizer, population, truncation, horizon, shard,
                        member_loop)
    step = TrainerStep(setup)
    compile_step = time_call(step)
    member, meta, data = member_placement(setup)
    runs = {"pes step": step} | _unroll_parts(setup, meta, data, member)
    params, grads = _fixed_gradients(setup.task, population, member)
    runs |= _update_parts(setup, meta, params, grads)
    compile_s = {k: time_call(f) for k, f in runs.items() if k != "pes step"}
    time_call(step)
    sec = {k: min(v) for k, v in time_rounds(runs, repeats).items()}
    return {"task": task_name, "population": population, "truncation": truncation,
            "devices": setup.mesh.size, "member_loop": setup.estimator.problem.member_loop,
            "params": sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params)),
            "compile_step_s": compile_step, "compile_s": compile_s, "sec": sec,
            "cost": member_step_costs(setup, meta, params, grads)}


def _adam():
    return PlainUpdate(optax.adam(1e-3))


def _unroll_parts(setup, meta, data, member) -> dict:
    """``inner unroll``, ``task only`` and ``adam unroll``: K inner steps of every member from
    fresh runs, with the learned optimizer, with p - lr g and with Adam."""
    from meta_train.inner import InnerProblem

    problem = setup.estimator.problem
    K, horizon = setup.config.truncation, setup.config.horizon
    loop = dict(member_loop=problem.member_loop, mesh=problem.mesh)  # every part as the trainer
    sgd = InnerProblem(setup.task, PlainUpdate(optax.sgd(1e-3)), problem.loss_cap, **loop)
    adam = InnerProblem(setup.task, _adam(), problem.loss_cap, **loop)
    return {name: fresh_unroll_call(prob, meta, data, member, K, horizon, donate=True)
            for name, prob in (("inner unroll", problem), ("task only", sgd),
                               ("adam unroll", adam))}


def _fixed_gradients(task, population, member):
    """Every member's initial parameters and smooth made-up gradients, on the members."""
    params = jax.jit(jax.vmap(task.init))(jax.random.split(jax.random.key(4), population))
    grads = jax.tree.map(lambda p: 0.01 * jnp.cos(p * 7.0 + 1.0), params)
    return jax.device_put((params, grads), member)


def _update_parts(setup, meta, params, grads) -> dict:
    """``update only`` and ``adam update only``: K updates of every member on ``grads``."""
    problem, lopt = setup.estimator.problem, setup.lopt
    K, horizon = setup.config.truncation, setup.config.horizon
    adam = _adam()

    def lopt_update(m, s, g, p):
        return lopt.update(m, s, g, p, num_steps=horizon)

    return {"update only": updates_call(problem, meta, params, grads, lopt.init_state,
                                        lopt_update, K),
            "adam update only": updates_call(problem, meta, params, grads, adam.init_state,
                                             adam.update, K)}


def member_step_costs(setup, meta, params, grads) -> dict[str, tuple[float, float]]:
    """(matmul FLOPs, bytes accessed) of ONE member's step of every part of ``profile_task``,
    unvmapped (the estimator's own work is not counted: ``pes step`` = ``inner unroll``)."""
    task, lopt, problem = setup.task, setup.lopt, setup.estimator.problem
    horizon, adam = setup.config.horizon, _adam()
    lengths = jnp.full((setup.config.population,), horizon, jnp.int32)
    one, st1 = _first(meta), _first(jax.jit(problem.fresh)(
        jax.device_get(meta), jax.random.key(3), lengths))
    p1, g1 = _first((params, grads))

    def task_step(p, key, d):
        return jax.value_and_grad(task.loss)(p, task.sample_batch(key, data=d))

    cost = {
        "inner unroll": flops_and_bytes(problem.step_one, one, st1, task.data),
        "task only": flops_and_bytes(task_step, p1, jax.random.key(0), task.data),
        "update only": flops_and_bytes(
            lambda m, s, g, p: lopt.update(m, s, g, p, num_steps=horizon),
            one, lopt.init_state(one, p1), g1, p1),
        "adam update only": flops_and_bytes(
            lambda s, g, p: adam.update(None, s, g, p), adam.init_state(None, p1), g1, p1),
    }
    cost["adam unroll"] = tuple(a + b for a, b in zip(cost["task only"],
                                                      cost["adam update only"], strict=True))
    cost["pes step"] = cost["inner unroll"]
    return cost


def _first(tree):
    """The first member of a population, on the host."""
    return jax.tree.map(lambda x: x[0], jax.device_get(tree))
