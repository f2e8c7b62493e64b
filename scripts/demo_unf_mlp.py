"""Meta-train the UNF learned optimizer on mlp_fmnist, then evaluate it honestly (the v0.2 demo).

1. Meta-trains ``unf`` on ``mlp_fmnist`` (offline Fashion-MNIST 8x8) with PES: 16 inner runs
   (8 antithetic pairs) sharded over every device, truncations of K=50 steps, episodes of
   log-uniform length in [100, 2000] (T=2000, the paper's horizon), the final-loss objective
   and experiment 1's rule (network term scaled by rms(m)). A few minutes on 2 CPU cores.
2. Evaluates on 5 task seeds never used in meta-training, for T steps: the meta-trained
   optimizer, its own initialisation (SGD with momentum at alpha = 0.1 plus a tiny network
   term), the meta-trained optimizer with beta = 0 (what the network term adds), and optax
   SGD-momentum and Adam with learning rates tuned on 3 other seeds; then the meta-trained
   optimizer and its initialisation at 5T.
3. Prints the table, the verdicts and the plot's path.

Re-running continues (or reuses) the run in ``--out``; ``--fresh`` starts over.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from meta_train.cli import add_data_dir_flag, apply_data_dir
from meta_train.tracking import WANDB_MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory")
    add_data_dir_flag(p)
    p.add_argument("--outer-steps", type=int, default=600, help="PES outer steps")
    p.add_argument("--outer-lr", type=float, default=0.001, help="outer Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="meta-training seed")
    p.add_argument("--seeds", type=int, default=5, help="evaluation seeds (100, 101, ...)")
    p.add_argument("--wandb", default="offline", choices=WANDB_MODES)
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    apply_data_dir(args.data_dir)
    t_start = time.perf_counter()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    config, result = meta_train_demo(args, out)
    t_train = time.perf_counter() - t_start
    lopt, meta = result.lopt, result.meta_params
    init, nominal = print_nominal(lopt, meta, args.seed)

    evaluate_demo(lopt, {"unf (meta-trained)": meta,
                         "unf (meta-trained, beta=0)": meta | {"beta": 0.0 * meta["beta"]},
                         "unf (initialisation)": init}, config.horizon, args, out,
                  info={"task": "mlp_fmnist", "run": str(out), "outer_steps": result.steps_done,
                        "nominal": nominal})
    plot = out / "eval" / "curves.png"
    print(f"\nplot: {plot}\nsummary: {out / 'eval' / 'summary.json'}\n"
          f"optimizer checkpoint: {out / 'optimizer'} (learned_opt.load_optax reads it)\n"
          f"time: {time.perf_counter() - t_start:.0f} s ({t_train:.0f} s meta-training incl. "
          "setup)")
    return 0


def meta_train_demo(args, out: Path):
    """Step 1: meta-train (or resume) the run in ``out``; returns (its config, the result)."""
    import jax

    from learned_opt import presets
    from meta_train import MetaTrainConfig, meta_train

    devices = jax.devices()
    population = 16
    print(f"devices: {len(devices)} x {devices[0].device_kind}; population {population} "
          f"sharded over {len(devices)} device(s)")
    # Experiment 1's rule without training progress (network term scaled by rms(m), saturating
    # step embedding; the README's demo numbers were measured with it), the paper's horizon with
    # episode lengths drawn log-uniformly in [100, 2000], and the final-loss objective: at
    # T=200 with the mean objective the rule learnt a step size that is too large beyond its
    # horizon (README, "What make demo shows").
    rule = presets.get("recommended_fixed_horizon")
    config = MetaTrainConfig(
        task="mlp_fmnist", optimizer="unf", optimizer_args=rule, estimator="pes",
        population=population, truncation=50, horizon=2000, min_horizon=100, objective="final",
        outer_steps=args.outer_steps, outer_lr=args.outer_lr,
        std=0.01, seed=args.seed, out=str(out), resume=True, checkpoint_every=100,
        wandb=args.wandb,
    )
    print(f"1/2 meta-training unf on mlp_fmnist: PES, K={config.truncation}, "
          f"T={config.horizon}, {config.outer_steps} outer steps -> {out}")
    # Resuming an existing run is refused if any trajectory-defining option differs.
    given = MetaTrainConfig.field_names() - {"loss_cap"}
    return config, meta_train(config, progress=True, given=given)


def print_nominal(lopt, meta, seed: int):
    """Prints the nominal terms at initialisation and after meta-training; returns (the
    initial meta-parameters, the trained nominal terms)."""
    from meta_train.train import initial_meta_params

    nominal = {k: float(v) for k, v in lopt.nominal(meta).items()}
    init = initial_meta_params(lopt, seed)
    init_nominal = {k: float(v) for k, v in lopt.nominal(init).items()}
    print("nominal terms, init -> trained: "
          + ", ".join(f"{k} {init_nominal[k]:.4g} -> {nominal[k]:.4g}" for k in nominal))
    return init, nominal


def evaluate_demo(lopt, metas: dict, horizon: int, args, out: Path, info: dict) -> None:
    """Step 2: the learned optimizers ``metas`` against tuned SGDM and Adam at T, then the
    trained one against its initialisation at 5T; tables and paired verdicts."""
    import tasks
    from meta_train import evaluation as ev

    task = tasks.get_task("mlp_fmnist")
    seeds = [ev.EVAL_SEEDS[0] + i for i in range(args.seeds)]
    # Optimizers with training progress are told the run's length.
    learned = {name: ev.Candidate(lambda steps, m=m: lopt.as_optax(m, num_steps=steps))
               for name, m in metas.items()}
    print(f"2/2 evaluating on unseen seeds {seeds} for T={horizon} steps "
          f"(baselines tuned on seeds {list(ev.TUNE_SEEDS)})")
    report = ev.evaluate(task, learned | {"sgdm (tuned)": ev.BASELINES["sgdm"],
                                          "adam (tuned)": ev.BASELINES["adam"]},
                         [horizon], seeds, ev.TUNE_SEEDS, out_dir=out / "eval", info=info,
                         title=f"mlp_fmnist, {len(seeds)} unseen seeds", wandb_mode=args.wandb)
    print(f"\n{ev.format_table(report.rows)}\n")
    trained, no_net, init = metas
    print("meta-training: " + ev.paired_text(report, trained, init, horizon))
    print("network term: " + ev.paired_text(report, trained, no_net, horizon))
    print(f"\nbeyond the horizon: T={5 * horizon} steps on the same unseen seeds")
    far = ev.evaluate(task, {k: learned[k] for k in (trained, init)}, [5 * horizon], seeds,
                      log=lambda m: None)
    print(ev.format_table(far.rows))
    print(ev.paired_text(far, trained, init, 5 * horizon))


if __name__ == "__main__":
    sys.exit(main())
