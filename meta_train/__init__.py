"""Meta-training of learned optimizers: inner problem, ES estimators, trainer, evaluation.

* ``meta_train.inner``: a population of inner training runs (``InnerProblem``).
* ``meta_train.estimators``: PES over truncations and antithetic ES over full unrolls (evosax).
* ``meta_train.train``: config -> run directory with checkpoints, metrics, wandb, optimizer.
* ``meta_train.callbacks``: hooks of the loop (metrics, progress bar, snapshots, your own).
* ``meta_train.checkpoint``: training checkpoints; ``export_run`` / ``import_run`` carry a run
  to another machine.
* ``meta_train.experiments``: research experiments built on the above (the paper's experiment 1,
  the held-out architectures).
* ``meta_train.evaluation``: train fresh task networks with learned and tuned optax optimizers.
* ``meta_train.benchmarks``: what meta-training costs (time of its parts, matmul FLOPs, the
  machine's limits), for ``scripts/bench_meta_train.py``.
"""

from meta_train.callbacks import Callback
from meta_train.config import ConfigError, MetaTrainConfig
from meta_train.estimators import ESTIMATORS, PES, EstimatorState, FullES, outer_optimizer
from meta_train.inner import InnerProblem, InnerState, UnrollOutput
from meta_train.runs import load_run_config
from meta_train.train import MetaTrainResult, build, meta_train, step_key

__all__ = [
    "ESTIMATORS", "PES", "Callback", "ConfigError", "EstimatorState", "FullES", "InnerProblem",
    "InnerState", "MetaTrainConfig", "MetaTrainResult", "UnrollOutput", "build",
    "load_run_config", "meta_train", "outer_optimizer", "step_key",
]
