"""Generalisation prediction on a zoo of small seq2seq GRUs (the paper's Tiny RNN Zoo).

Three subcommands:

  build    train a zoo of GRU models on integer addition (tasks/zoo/addition.py) and store their
           final weights, test success rates and test losses (zoo.npz + config.json);
           resumes from finished chunks when interrupted.
  predict  train a predictor (STATNN, UNF or Deep Set) of the success rate from the weights on
           the zoo's training split, pick the best epoch on the validation split and print the
           test metrics as one JSON line.
  cost     benchmark: CPU time per model-step of the zoo's training, and the build time it
           extrapolates to (one process, or two sharing the build with --workers 2).

Example (a tiny zoo, about a minute on a laptop CPU):
  python scripts/rnn_zoo.py build --out runs/zoo_tiny --preset tiny
  python scripts/rnn_zoo.py predict --zoo runs/zoo_tiny --method statnn --epochs 2 --seed 0

The library code is :mod:`tasks.zoo.rnn_zoo`; this file is its command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from tasks.zoo import addition
from tasks.zoo.predictors import METHODS, PredictConfig, save_scatter, train_predictor
from tasks.zoo.rnn_zoo import PRESETS, ZooConfig, build, load_zoo, measure_cost, save_histogram


def main_predict(args) -> None:
    t0 = time.time()
    pcfg = PredictConfig(method=args.method, epochs=args.epochs, seed=args.seed,
                         batch_size=args.batch_size, lr=args.lr, channels=args.channels,
                         layers=args.layers)
    cfg, zoo, params = load_zoo(Path(args.zoo))
    spec = addition.perm_spec(params)
    print(f"predict {pcfg.method} on {args.zoo}: {cfg.num_models} models, split sizes "
          f"{np.bincount(zoo['split'], minlength=3).tolist()}", flush=True)
    res = train_predictor(pcfg, params, zoo["success"], zoo["split"], spec,
                          log=lambda m: print(m, flush=True))
    default_plot = Path(args.zoo) / f"scatter_{pcfg.method}_seed{pcfg.seed}.png"
    plot = Path(args.plot) if args.plot else default_plot
    save_scatter(res["test_pred"], res["test_true"], plot,
                 f"{pcfg.method} seed {pcfg.seed}: tau {res['kendall_tau']:.3f}, "
                 f"R2 {res['r2']:.3f}")
    summary = {"method": pcfg.method, "seed": pcfg.seed, "channels": pcfg.channels,
               "layers": pcfg.layers, "kendall_tau": res["kendall_tau"],
               "r2": res["r2"], "val_kendall_tau": res["val_kendall_tau"],
               "best_epoch": res["best_epoch"], "epochs": pcfg.epochs,
               "num_test": int(len(res["test_true"])),
               "num_predictor_params": res["num_predictor_params"], "zoo": str(args.zoo),
               "plot": str(plot), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(summary))


def _zoo_config_from_args(args) -> ZooConfig:
    base = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ZooConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **overrides)


def main_build(args) -> None:
    cfg = _zoo_config_from_args(args)
    out = Path(args.out)
    zoo = build(cfg, out, log_every=args.log_every, worker=args.worker, workers=args.workers)
    if zoo is None:
        return
    counts = save_histogram(zoo["success"], out / "success_hist.png",
                            f"{cfg.num_models} GRUs, hidden {cfg.hidden}, {cfg.digits} digits")
    print("success-rate histogram (10 bins of [0, 1]):", counts.tolist())
    print(json.dumps({"zoo": str(out), "num_models": cfg.num_models,
                      "success_mean": float(zoo["success"].mean()),
                      "success_std": float(zoo["success"].std()),
                      "histogram": counts.tolist()}))


def main_cost(args) -> None:
    measure_cost(_zoo_config_from_args(args), args.probe_steps)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the zoo")
    b.add_argument("--out", required=True, help="zoo directory (resumes if it exists)")
    b.add_argument("--preset", choices=sorted(PRESETS), default="default")
    b.add_argument("--num-models", dest="num_models", type=int)
    b.add_argument("--hidden", type=int)
    b.add_argument("--digits", type=int)
    b.add_argument("--steps", type=int)
    b.add_argument("--train-size", dest="train_size", type=int)
    b.add_argument("--test-size", dest="test_size", type=int)
    b.add_argument("--chunk-size", dest="chunk_size", type=int)
    b.add_argument("--seed", type=int)
    b.add_argument("--log-every", dest="log_every", type=int, default=500)
    b.add_argument("--worker", type=int, default=0, help="this process's index (see --workers)")
    b.add_argument("--workers", type=int, default=1,
                   help="processes sharing the build: each trains its share of the chunks")
    c = sub.add_parser("cost", help="measure CPU cost per model-step, extrapolate the build")
    c.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for flag in ("num-models", "hidden", "digits", "steps", "chunk-size", "seed"):
        c.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int)
    c.add_argument("--probe-steps", dest="probe_steps", type=int, default=100)
    p = sub.add_parser("predict", help="train and test a success-rate predictor")
    p.add_argument("--zoo", required=True, help="zoo directory written by build")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, default=16, help="unf/deepset: channels per layer")
    p.add_argument("--layers", type=int, default=3, help="unf/deepset: equivariant layers")
    p.add_argument("--plot", help="scatter plot PNG (default: ZOO/scatter_METHOD_seedK.png)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    {"build": main_build, "cost": main_cost, "predict": main_predict}[args.command](args)


if __name__ == "__main__":
    main()
