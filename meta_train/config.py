"""The typed configuration of a meta-training run (saved as ``DIR/config.json``).

Every field is a command-line flag of ``python -m meta_train`` (``--outer-steps`` for
``outer_steps``); its help text is the field's ``help`` metadata.

Example:
  >>> cfg = MetaTrainConfig(task="mlp_fmnist", optimizer="unf", outer_steps=10)
  >>> cfg.estimator, cfg.population, cfg.std
  ('pes', 16, 0.01)
  >>> MetaTrainConfig.from_json(cfg.to_json()) == cfg
  True
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from meta_train.estimators import ESTIMATORS, FITNESS_SHAPING, OBJECTIVES, OUTER_SCHEDULES
from meta_train.inner import MEMBER_LOOPS
from meta_train.tracking import WANDB_MODES

# The valid values of each choice option, from the modules that implement them (the CLI's
# ``choices`` come from here too).
CHOICES = {"estimator": tuple(ESTIMATORS), "objective": OBJECTIVES,
           "fitness_shaping": tuple(FITNESS_SHAPING), "wandb": WANDB_MODES,
           "member_loop": MEMBER_LOOPS, "outer_schedule": OUTER_SCHEDULES}


class ConfigError(ValueError):
    """A meta-training option is invalid or incompatible with another one."""


def _field(default, help: str, **kw):
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Options of one meta-training run; see each field's ``help``."""

    task: str = _field("mlp_fmnist", "task name (tasks.list_tasks()), or several separated by "
                       "commas: one weight-space-agnostic optimizer meta-trained on all of them, "
                       "the population split evenly across them")
    task_args: dict = _field({}, "task config overrides, KEY=VALUE (VALUE parsed as JSON); with "
                             "several tasks, TASK={...} per task")
    optimizer: str = _field("unf", "learned optimizer method (learned_opt.list_optimizers())")
    optimizer_args: dict = _field({}, "learned optimizer config overrides, KEY=VALUE")
    estimator: str = _field("pes", "meta-gradient estimator: pes (truncated) or es (full unroll)")
    population: int = _field(16, "number of perturbed inner runs (even: antithetic pairs)")
    truncation: int = _field(20, "K: inner steps per outer step (pes)")
    horizon: int = _field(200, "T: inner steps of an episode (a multiple of K for pes)")
    min_horizon: int = _field(0, "pes: draw each episode's length log-uniformly in [min_horizon, "
                              "horizon] (rounded to a multiple of K); 0: every episode T long")
    outer_steps: int = _field(1000, "number of outer (meta-parameter) updates")
    outer_lr: float = _field(3e-3, "learning rate of the outer Adam")
    outer_schedule: str = _field("constant", "outer learning-rate schedule: constant or cosine "
                                 "(decays to 10%% of outer_lr at outer_steps)")
    outer_weight_decay: float = _field(0.0, "decoupled weight decay of the outer optimizer "
                                       "(AdamW; 0: Adam)")
    clip: float = _field(1.0, "global-norm clipping of the ES gradient before Adam")
    std: float = _field(0.01, "perturbation standard deviation")
    objective: str = _field("mean", "meta-objective: mean (training loss over each unroll), "
                            "mean_log (its logarithm: late-training gains weigh as much as "
                            "early ones) or final (training loss at the end of the horizon)")
    fitness_shaping: str = _field("raw", "raw or centered_rank")
    loss_cap: float = _field(0.0, "per-step inner loss cap (NaN/inf count as the cap); 0: 3x "
                             "the task's mean initial loss, measured at start")
    seed: int = _field(0, "seed: fixes meta-initialisation, perturbations, task inits and data")
    shard: bool = _field(True, "shard the population over all devices (1-D mesh)")
    member_loop: str = _field("auto", "how each device advances its members: vmap (batched), "
                              "map (one after another: faster on CPU) or auto (map on CPU, "
                              "vmap elsewhere); same results to float rounding")
    out: str = _field("runs/meta_train", "run directory (config, metrics, checkpoints, optimizer)")
    resume: bool = _field(False, "continue the run in --out from its latest checkpoint")
    checkpoint_every: int = _field(100, "save a training checkpoint every N outer steps")
    snapshot_every: int = _field(0, "also keep the optimizer (its mean meta-parameters) every N "
                                 "outer steps in OUT/snapshots/step_N, for selection on "
                                 "validation seeds; 0: none")
    wandb: str = _field("offline", "wandb mode: online, offline or disabled")
    wandb_project: str = _field("learned-opt", "wandb project name")

    def __post_init__(self):
        # Tuples become lists, as after a round trip through config.json, so that a resumed
        # run compares equal to the stored one.
        for name in ("task_args", "optimizer_args"):
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))
        for name in ("population", "truncation", "horizon", "outer_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.population % 2:
            raise ConfigError(
                f"population must be even (antithetic pairs i, i+N/2), got {self.population}"
            )
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")
        if self.estimator == "pes" and self.horizon % self.truncation:
            raise ConfigError(
                f"horizon ({self.horizon}) must be a multiple of truncation ({self.truncation})"
            )
        if self.min_horizon and (self.estimator != "pes" or not (
                self.truncation <= self.min_horizon <= self.horizon)):
            raise ConfigError(
                f"min_horizon ({self.min_horizon}) needs estimator 'pes' and must lie in "
                f"[truncation ({self.truncation}), horizon ({self.horizon})]; 0 disables it"
            )
        if self.estimator == "pes" and self.objective == "final" and (
            self.fitness_shaping != "raw"
        ):
            raise ConfigError(
                "objective 'final' with estimator 'pes' needs fitness_shaping 'raw' (only the "
                "truncations that end an episode are scored)"
            )
        names = self.task_names
        if len(names) != len(set(names)) or not all(names):
            raise ConfigError(f"task must list distinct task names, got {self.task!r}")
        if len(names) > 1:
            bad = sorted(set(self.task_args) - set(names))
            if bad or not all(isinstance(v, dict) for v in self.task_args.values()):
                raise ConfigError(
                    f"with several tasks, task_args must be TASK={{...}} for tasks among {names}; "
                    f"got {self.task_args}")
            if (self.population // 2) % len(names):
                raise ConfigError(
                    f"population ({self.population}) must be 2 x a multiple of the number of "
                    f"tasks ({len(names)}): each task gets whole antithetic pairs")
            if self.loss_cap:
                raise ConfigError("with several tasks the loss cap is automatic (3x each task's "
                                  "initial loss): leave loss_cap at 0")
        if self.snapshot_every < 0:
            raise ConfigError(f"snapshot_every must be >= 0 (0: none), got {self.snapshot_every}")
        for name in ("std", "outer_lr", "clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # NaN fails both tests
                raise ConfigError(f"{name} must be a finite positive number, got {value}")
        if not (math.isfinite(self.outer_weight_decay) and self.outer_weight_decay >= 0):
            raise ConfigError(f"outer_weight_decay must be a finite number >= 0, got "
                              f"{self.outer_weight_decay}")
        if not (math.isfinite(self.loss_cap) and self.loss_cap >= 0):
            raise ConfigError(
                f"loss_cap must be a finite number >= 0 (0: automatic), got {self.loss_cap}")

    @property
    def task_names(self) -> list[str]:
        """The task, or the tasks of a multi-task run, in order."""
        return [t.strip() for t in self.task.split(",")]

    def args_of(self, task: str) -> dict:
        """The task config overrides of ``task``."""
        if len(self.task_names) == 1:
            return self.task_args
        return self.task_args.get(task, {})

    @classmethod
    def field_names(cls) -> set[str]:
        """Every option's name (``meta_train(config, given=...)``: a caller whose config holds
        every option it wants, the automatic loss_cap aside, gives ``field_names() - {"loss_cap"}``
        so that a resumed run checks the trajectory options and takes the others from it)."""
        return {f.name for f in dataclasses.fields(cls)}

    # Fields that define the trajectory: a resumed run must keep them.
    RUN_FIELDS = (
        "task", "task_args", "optimizer", "optimizer_args", "estimator", "population",
        "truncation", "horizon", "min_horizon", "outer_lr", "outer_schedule",
        "outer_weight_decay", "clip", "std", "objective",
        "fitness_shaping", "loss_cap", "seed",
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MetaTrainConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> MetaTrainConfig:
        return dataclasses.replace(self, **changes)
