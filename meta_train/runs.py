"""The run directory: whether this process writes it, its lock, what a resume continues.

``meta_train.meta_train`` uses these: a new run refuses a directory that holds one, a resumed
run merges its stored config with the options given now (trajectory-defining ones must match),
only process 0 writes, the directory is locked while a run uses it, and SIGTERM stops a run
like Ctrl-C (checkpoint first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
from pathlib import Path

import jax

from meta_train import checkpoint
from meta_train.config import ConfigError, MetaTrainConfig


def resume_step(config: MetaTrainConfig) -> int | None:
    """Check ``--out``/``--resume``; returns the step to resume from (None: a new run)."""
    run_dir = Path(config.out)
    meta = checkpoint.latest(run_dir)
    if not config.resume:
        if meta is not None:
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoint at step {meta['step']}); pass "
                "--resume to continue it or choose another --out"
            )
        return None
    if meta is None:
        print(f"--resume: {run_dir} holds no run (no checkpoints/latest.json): starting a new "
              "run there with the options given")
        return None
    return int(meta["step"])


def check_same_run(built: MetaTrainConfig, config: MetaTrainConfig) -> None:
    for name in config.trajectory_fields() + ("shard", "member_loop"):
        a, b = getattr(built, name), getattr(config, name)
        if a != b and not (name == "loss_cap" and b == 0):
            raise ConfigError(f"setup was built with {name}={a!r}, the config has {b!r}")


def resolve_resume(config: MetaTrainConfig, given: set[str] | None) -> MetaTrainConfig:
    """Merge a resumed run's stored config with the flags given now (``given`` = their names).

    Flags that define the trajectory (``trajectory_fields``) must match the stored ones; the
    others (outer_steps under a constant outer schedule, checkpoint_every, wandb, ...) may
    change, and keep their stored values when not given.
    """
    path = Path(config.out) / "config.json"
    stored = MetaTrainConfig.from_json(path.read_text(), str(path))
    in_checkpoint = MetaTrainConfig.from_json(json.dumps(checkpoint.latest(config.out)["config"]),
                                              f"{Path(config.out) / 'checkpoints'}/latest.json")
    trajectory = stored.trajectory_fields()
    for name in trajectory:  # a config.json edited or copied from another run
        if getattr(in_checkpoint, name) != getattr(stored, name):
            raise ConfigError(
                f"--resume: {name}={getattr(stored, name)!r} in {Path(config.out) / 'config.json'}"
                f" differs from the checkpoint's {getattr(in_checkpoint, name)!r} "
                f"({Path(config.out) / 'checkpoints' / 'latest.json'})")
    for name in trajectory:
        if name in (given or ()) and getattr(config, name) != getattr(stored, name):
            why = " (it sets the cosine outer schedule's length)" if name == "outer_steps" else ""
            raise ConfigError(
                f"--resume: {name}={getattr(config, name)!r} differs from the run's "
                f"{getattr(stored, name)!r} in {path}{why}"
            )
    # The other options keep their stored values unless given again (given=None: the API
    # caller's config is taken as given in full).
    free = {f.name: getattr(config, f.name) for f in dataclasses.fields(MetaTrainConfig)
            if f.name not in trajectory
            and (given is None or f.name in given or f.name in ("out", "resume"))}
    return stored.replace(**free)


def writes_here() -> bool:
    """Whether this process writes the run directory and logs: process 0 of several."""
    return jax.process_index() == 0


class NoLogger:
    """The metrics logger of the processes that do not write."""

    mode = "disabled"

    def log(self, step, metrics):
        pass

    def close(self):
        pass


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` (released by the OS if the process dies)."""
    import fcntl

    path = run_dir / "lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"{run_dir} is in use by another meta-training run ({holder}); wait "
                          "for it to end or choose another --out") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what schedulers send) stops the run like Ctrl-C: checkpoint, then exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_run_config(run_dir) -> MetaTrainConfig:
    """The config of a run directory."""
    path = Path(run_dir) / "config.json"
    return MetaTrainConfig.from_json(path.read_text(), str(path))
