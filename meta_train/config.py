"""The typed configuration of a meta-training run (saved as ``DIR/config.json``).

Every field is a command-line flag of ``python -m meta_train`` (``--outer-steps`` for
``outer_steps``); its help text is the field's ``help`` metadata. Fields belong to the sections
``task``, ``optimizer``, ``estimator`` (with the outer optimizer and the seed) and ``run`` (how
and where it runs); ``config.json`` holds them by section, and a resumed run must keep every
option outside ``run`` (``trajectory_fields``).

Example:
  >>> cfg = MetaTrainConfig(task="mlp_fmnist", optimizer="unf", outer_steps=10)
  >>> cfg.estimator, cfg.population, cfg.std
  ('pes', 16, 0.01)
  >>> MetaTrainConfig.from_json(cfg.to_json()) == cfg
  True
  >>> sorted(cfg.sections()["task"]), "outer_steps" in cfg.trajectory_fields()
  (['task', 'task_args'], False)
"""

from __future__ import annotations

import dataclasses
import functools
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


# config.json's sections, in order. Every option outside "run" defines the trajectory: a resumed
# run must keep it (``trajectory_fields``).
SECTIONS = ("task", "optimizer", "estimator", "run")


def _field(default, help: str, section: str):
    meta = {"help": help, "section": section}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_task, _opt, _est, _run = (functools.partial(_field, section=name) for name in SECTIONS)


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Options of one meta-training run; see each field's ``help``."""

    task: str = _task("mlp_fmnist", "task name (tasks.list_tasks()), or several separated by "
                       "commas: one weight-space-agnostic optimizer meta-trained on all of them, "
                       "the population split evenly across them")
    task_args: dict = _task({}, "task config overrides, KEY=VALUE (VALUE parsed as JSON); with "
                             "several tasks, TASK={...} per task")
    optimizer: str = _opt("unf", "learned optimizer method (learned_opt.list_optimizers())")
    optimizer_args: dict = _opt({}, "learned optimizer config overrides, KEY=VALUE")
    estimator: str = _est("pes", "meta-gradient estimator: pes (truncated) or es (full unroll)")
    population: int = _est(16, "number of perturbed inner runs (even: antithetic pairs)")
    truncation: int = _est(20, "K: inner steps per outer step (pes)")
    horizon: int = _est(200, "T: inner steps of an episode (a multiple of K for pes)")
    min_horizon: int = _est(0, "pes: draw each episode's length log-uniformly in [min_horizon, "
                              "horizon] (rounded to a multiple of K); 0: every episode T long")
    outer_steps: int = _run(1000, "number of outer (meta-parameter) updates")
    outer_lr: float = _est(3e-3, "learning rate of the outer Adam")
    outer_schedule: str = _est("constant", "outer learning-rate schedule: constant or cosine "
                                 "(decays to 10%% of outer_lr at outer_steps)")
    outer_weight_decay: float = _est(0.0, "decoupled weight decay of the outer optimizer "
                                       "(AdamW; 0: Adam)")
    clip: float = _est(1.0, "global-norm clipping of the ES gradient before Adam")
    std: float = _est(0.01, "perturbation standard deviation")
    objective: str = _est("mean", "meta-objective: mean (training loss over each unroll), "
                            "mean_log (its logarithm: late-training gains weigh as much as "
                            "early ones) or final (training loss at the end of the horizon)")
    fitness_shaping: str = _est("raw", "raw or centered_rank")
    loss_cap: float = _est(0.0, "per-step inner loss cap (NaN/inf count as the cap); 0: 3x "
                             "the task's mean initial loss, measured at start")
    seed: int = _est(0, "seed: fixes meta-initialisation, perturbations, task inits and data")
    shard: bool = _run(True, "shard the population over all devices (1-D mesh)")
    member_loop: str = _run("auto", "how each device advances its members: vmap (batched), "
                              "map (one after another: faster on CPU) or auto (map on CPU, "
                              "vmap elsewhere); same results to float rounding")
    out: str = _run("runs/meta_train", "run directory (config, metrics, checkpoints, optimizer)")
    resume: bool = _run(False, "continue the run in --out from its latest checkpoint")
    checkpoint_every: int = _run(100, "save a training checkpoint every N outer steps")
    snapshot_every: int = _run(0, "also keep the optimizer (its mean meta-parameters) every N "
                                 "outer steps in OUT/snapshots/step_N, for selection on "
                                 "validation seeds; 0: none")
    wandb: str = _run("offline", "wandb mode: online, offline or disabled")
    wandb_project: str = _run("learned-opt", "wandb project name")

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

    def trajectory_fields(self) -> tuple[str, ...]:
        """The options that define the run's trajectory (a resumed run must keep them): every
        option outside the "run" section, and ``outer_steps`` under the cosine outer schedule
        (its length)."""
        names = [f.name for f in dataclasses.fields(self) if f.metadata["section"] != "run"]
        return tuple(names + ["outer_steps"] * (self.outer_schedule == "cosine"))

    def sections(self) -> dict[str, dict]:
        """The options by section (``SECTIONS``), as ``config.json`` holds them."""
        out = {name: {} for name in SECTIONS}
        for f in dataclasses.fields(self):
            out[f.metadata["section"]][f.name] = getattr(self, f.name)
        return out

    def to_json(self) -> str:
        return json.dumps(self.sections(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> MetaTrainConfig:
        """Read ``to_json``'s sections, or the flat layout of runs written before sections."""
        data = json.loads(text)
        if set(data) <= set(SECTIONS) and all(isinstance(v, dict) for v in data.values()):
            fields = {f.name: f.metadata["section"] for f in dataclasses.fields(cls)}
            misplaced = sorted(f"{sec}.{k}" for sec, opts in data.items() for k in opts
                               if fields.get(k, sec) != sec)
            if misplaced:
                raise ConfigError(f"{source}: option(s) {misplaced} in the wrong section (each "
                                  "option's section: MetaTrainConfig().sections())")
            data = {k: v for opts in data.values() for k, v in opts.items()}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> MetaTrainConfig:
        return dataclasses.replace(self, **changes)
