"""Hooks of the meta-training loop: what happens around each outer step besides the step itself.

The loop (``meta_train.meta_train``) runs the jitted outer step, checkpoints, and calls its
callbacks; logging, the progress bar and snapshots are callbacks, and users add their own with
``meta_train(config, callbacks=[...])``. Override only what you need:

* ``on_step(t, row)``: outer step ``t`` finished; ``row`` holds its metrics as host floats. It is
  called one step late (the next step is already dispatched, so the device stays busy), and
  always before a checkpoint that holds step ``t`` is written.
* ``on_state(done, state)``: the estimator state after ``done`` outer steps (device arrays).
* ``on_end(done, state, interrupted)``: once, after the final checkpoint (also on Ctrl-C or
  SIGTERM, with ``interrupted=True``); callbacks end in reverse order.

Example (a callback that keeps the meta-loss of every step):
  >>> class KeepLoss(Callback):
  ...     def __init__(self):
  ...         self.losses = []
  ...     def on_step(self, t, row):
  ...         self.losses.append(row["meta_loss"])
  >>> cb = KeepLoss(); cb.on_step(0, {"meta_loss": 0.5}); cb.losses
  [0.5]
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any

import jax

import learned_opt
from meta_train.tracking import offline_run_hint

STEADY_STEPS = 5  # steps after compilation over which the printed throughput is measured


class Callback:
    """Base class: every hook does nothing."""

    def on_step(self, t: int, row: dict[str, float]) -> None:
        pass

    def on_state(self, done: int, state: Any) -> None:
        pass

    def on_end(self, done: int, state: Any, interrupted: bool) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar with the meta-loss, its mean over the last 50 steps and an ETA."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        # Redraw at most once every 0.5 s on a terminal, every 30 s in a log file.
        self.bar = tqdm(total=total, initial=initial, desc="meta-train", unit="step",
                        dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.recent = collections.deque(maxlen=50)

    def say(self, message: str) -> None:
        """Print without breaking the bar (in a log file the bar's lines do not overwrite each
        other, and redrawing it would defeat its throttle)."""
        if sys.stderr.isatty():
            self.bar.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def restart_clock(self) -> None:
        """The rate and ETA count steps from now (called after the compilation)."""
        self.bar.start_t = self.bar.last_print_t = time.time()  # tqdm's clock

    def on_step(self, t, row):
        self.recent.append(row["meta_loss"])
        shown = {k: f"{row[k]:.3g}" for k in ("alpha",) if k in row}  # nominal step
        # refresh=False: set_postfix would otherwise redraw every step, defeating mininterval
        self.bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}",
                             mean50=f"{sum(self.recent) / len(self.recent):.4f}", **shown,
                             refresh=False)
        self.bar.update(1)

    def on_end(self, done, state, interrupted):
        self.bar.close()


class MetricsRecorder(Callback):
    """Rows to a ``MetricsLogger`` (metrics.jsonl, wandb) and to ``history``; prints the steady
    throughput once, ``STEADY_STEPS`` steps after the compilation."""

    def __init__(self, logger, inner_steps_per_outer_step: int, say=print,
                 hint_offline: bool = True):
        self.logger, self.per_step, self.say = logger, inner_steps_per_outer_step, say
        self.hint_offline = hint_offline
        self.history: list[dict] = []

    def on_step(self, t, row):
        self.logger.log(t, row)
        self.history.append({"step": t} | row)
        if len(self.history) == 1 + STEADY_STEPS:  # the first row includes the compilation
            wall = sum(r["wall_s"] for r in self.history[1:])
            self.say(f"steady state: {STEADY_STEPS / wall:.3g} outer steps/s, "
                     f"{STEADY_STEPS * self.per_step / wall:.4g} member inner steps/s "
                     f"(over {STEADY_STEPS} steps after compilation)")

    def on_end(self, done, state, interrupted):
        self.logger.close()
        if self.logger.mode == "offline" and (interrupted or self.hint_offline):
            print(offline_run_hint(self.logger.path.parent))


class Snapshots(Callback):
    """The optimizer (the estimator's mean) every ``every`` outer steps, in
    ``run_dir/snapshots/step_NNNNNNN`` (``learned_opt.save`` format), for selection on
    validation seeds."""

    def __init__(self, run_dir, lopt, estimator, every: int):
        self.dir, self.lopt, self.estimator, self.every = Path(run_dir), lopt, estimator, every

    def on_state(self, done, state):
        if done % self.every == 0:
            learned_opt.save(self.dir / "snapshots" / f"step_{done:07d}", self.lopt,
                             jax.device_get(self.estimator.mean(state)))
