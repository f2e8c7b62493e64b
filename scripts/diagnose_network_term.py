"""How a learned optimizer's network term relates to its nominal term and to the weights.

Trains one fresh network of the task with the optimizer for ``--steps`` steps (one unseen seed)
and prints, at a few steps, the smoothed training loss, ``|net| / |m|`` (network term against
nominal momentum), ``cos(net, m)``, ``cos(net, W)`` (the update moves the weights by
``-alpha_t (m + net)``, so a cosine near -1 means the network term grows the weights), ``|W|``
and the scheduled step size ``alpha_t``. Norms and cosines are over the whole weight space.

Example::

    python scripts/diagnose_network_term.py \\
        --optimizer results/ablation/progress_10000/unf/optimizer --steps 10000
"""

import argparse
import sys

from meta_train.cli import add_data_dir_flag, apply_data_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", required=True, help="optimizer checkpoint directory")
    p.add_argument("--task", default="mlp_fmnist")
    p.add_argument("--steps", type=int, default=10_000, help="run length (num_steps)")
    p.add_argument("--seed", type=int, default=100, help="evaluation seed (unseen: 100-104)")
    add_data_dir_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    import jax
    import numpy as np

    import learned_opt
    import tasks
    from meta_train.evaluation import seed_key

    lopt, meta = learned_opt.load(args.optimizer)
    if "beta" not in meta:
        raise SystemExit(f"diagnose_network_term.py: error: {lopt.name!r} has no network term")
    task = tasks.get_task(args.task)
    # The same initialisation and batches as meta_train.evaluation.train_runs for this seed.
    k_init, k_data = jax.random.split(seed_key(args.seed))
    params = task.init(k_init)
    state = lopt.init_state(meta, params)
    step = diagnosed_step(task, lopt, meta, args.steps)
    marks = {10, 100, 300, 1000, 2000, 3000, 5000, 7500, args.steps}
    losses = []
    for t in range(1, args.steps + 1):
        params, state, loss, stats = step(params, state, jax.random.fold_in(k_data, t - 1))
        losses.append(float(loss))
        if t in marks:
            ratio, c_m, c_w, w, a_t = (float(x) for x in stats)
            print(f"step {t:6d}  loss (last 100) {np.mean(losses[-100:]):.4f}  |net|/|m| "
                  f"{ratio:.3f}  cos(net, m) {c_m:+.3f}  cos(net, W) {c_w:+.3f}  |W| {w:8.2f}  "
                  f"alpha_t {a_t:.4f}", flush=True)
    return 0


def diagnosed_step(task, lopt, meta, num_steps):
    """jit(params, state, batch key) -> (params, state, loss, (|net| / |m|, cos(net, m),
    cos(net, W), |W|, alpha_t)): one training step and what it says of the network term."""
    import jax
    import jax.numpy as jnp
    import optax

    norm = optax.tree.norm

    def cos(a, b):
        return optax.tree.vdot(a, b) / (norm(a) * norm(b))

    @jax.jit
    def step(params, state, batch_key):
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(batch_key, "train"))
        updates, new = lopt.update(meta, state, grads, params, num_steps=num_steps)
        alpha_t = lopt.step_size(meta, state.step, num_steps)
        net = jax.tree.map(lambda u, m: -u / alpha_t - m, updates, new.momentum)
        stats = (norm(net) / norm(new.momentum), cos(net, new.momentum), cos(net, params),
                 norm(params), alpha_t)
        return jax.tree.map(jnp.add, params, updates), new, loss, stats

    return step


if __name__ == "__main__":
    sys.exit(main())
