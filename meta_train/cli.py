"""Command line of ``python -m meta_train``: one flag per ``MetaTrainConfig`` field.

Example:
  >>> cfg, given = parse_args(["--task", "mlp_fmnist", "--population", "8", "--task-arg",
  ...                          "hidden_sizes=[16]"])
  >>> cfg.population, cfg.task_args, sorted(given)
  (8, {'hidden_sizes': [16]}, ['population', 'task', 'task_args'])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from meta_train.config import CHOICES, SECTIONS, ConfigError, MetaTrainConfig

_SINGULAR = {"task_args": "task-arg", "optimizer_args": "optimizer-arg"}
JOIN_TIMEOUT_S = 120.0  # --join-timeout default: how long processes wait for each other



def _prog() -> str:
    """``lopt-meta-train`` or ``python -m meta_train``, as invoked."""
    name = Path(sys.argv[0]).name
    return "python -m meta_train" if name in ("__main__.py", "") else name

def key_value(text: str) -> tuple[str, object]:
    """argparse type of ``KEY=VALUE`` flags: VALUE parsed as JSON, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def _valid_names() -> dict[str, list[str]]:
    """The registered names of the name options, for ``--help`` (their one source)."""
    from learned_opt import list_optimizers
    from tasks import list_tasks

    return {"task": list_tasks(), "optimizer": list_optimizers()}


def make_parser() -> argparse.ArgumentParser:
    names = _valid_names()
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Meta-train a learned optimizer on one task with PES or ES (evosax). "
        "Writes OUT/config.json, OUT/metrics.jsonl, OUT/checkpoints/, OUT/wandb/ and the "
        "final optimizer OUT/optimizer (learned_opt.load_optax reads it).",
    )
    groups = {name: parser.add_argument_group(f"{name} options") for name in SECTIONS}
    for f in dataclasses.fields(MetaTrainConfig):
        group = groups[f.metadata["section"]]
        help_text = f.metadata["help"]
        if f.name in names:
            help_text += f"; one of: {', '.join(names[f.name])}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in _SINGULAR:
            group.add_argument(f"--{_SINGULAR[f.name]}", dest=f.name, type=key_value,
                               action="append", default=None, metavar="KEY=VALUE",
                               help=f"{help_text} (repeatable)")
        elif f.name == "resume":
            group.add_argument("--resume", dest="resume", action="store_const", const=True,
                               default=None, help=help_text)
        elif f.type in ("bool", bool):
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction,
                               help=f"{help_text} (default: {default})")
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            choices = CHOICES.get(f.name)
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                               default=None, choices=choices,
                               help=f"{help_text} (default: {default})")
    add_data_dir_flag(parser)
    add_process_flags(parser)
    return parser


def add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: the offline data directory (sets ``LOPT_DATA_DIR``; not a config field).

    Where the data come from does not change the run's trajectory (the same files or the same
    tfds datasets), so it is not saved in ``config.json``; ``task.config.data_source`` says it.
    """
    parser.add_argument("--data-dir", dest="data_dir", default=None, metavar="DIR",
                        type=_existing_dir,
                        help="offline data directory, laid out like ../shared/data "
                        "(default: $LOPT_DATA_DIR, else tensorflow-datasets)")


def _existing_dir(text: str) -> str:
    # An argparse type: a missing directory is a usage error (exit 2, like every bad flag).
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory")
    return text


def apply_data_dir(data_dir: str | None) -> None:
    """Point every task loader at ``data_dir`` (they read ``LOPT_DATA_DIR``)."""
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise SystemExit(f"--data-dir {data_dir!r}: no such directory")
        os.environ["LOPT_DATA_DIR"] = os.path.abspath(data_dir)


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id``: one of several processes.

    Not config fields: how many processes share the population does not change the trajectory.
    """
    group = parser.add_argument_group(
        "multiple processes (jax.distributed; run the same command once per process)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0, where the coordination service listens "
                       "(default: $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, metavar="N", default=None,
                       help="number of processes; their devices form one mesh")
    group.add_argument("--process-id", type=int, metavar="I", default=None,
                       help="this process's index, 0..N-1; only process 0 writes --out and "
                       "logs to wandb")
    group.add_argument("--join-timeout", type=float, metavar="S", default=None,
                       help=f"seconds to wait for the coordinator and the other processes "
                       f"(default {JOIN_TIMEOUT_S:g})")


def _wait_for_coordinator(parser, coordinator: str, process_id: int, timeout: float) -> None:
    """Exit with a usage error naming the address when nothing listens there within
    ``timeout`` seconds (JAX's own timeout aborts the process with a C++ stack trace)."""
    import socket
    import time

    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                parser.exit(2, f"{parser.prog}: error: process {process_id}: no coordinator at "
                            f"{coordinator} after {timeout:g} s ({e}); start process 0 with the "
                            "same --coordinator, or raise --join-timeout\n")
            time.sleep(0.5)


def join_processes(parser: argparse.ArgumentParser, coordinator: str | None,
                   num_processes: int | None, process_id: int | None,
                   join_timeout: float | None = None) -> None:
    """``jax.distributed.initialize`` with the process flags (nothing when none is given).

    Must run before any JAX computation: importing ``meta_train`` starts no JAX backend.
    """
    if num_processes is None:
        for flag, value in (("--coordinator", coordinator), ("--process-id", process_id),
                            ("--join-timeout", join_timeout)):
            if value is not None:
                parser.error(f"{flag} needs --num-processes")
        return
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is None:
        parser.error("--num-processes needs --process-id (0 on the coordinator's host)")
    if not 0 <= process_id < num_processes:
        parser.error(f"--process-id {process_id} is out of range for --num-processes "
                     f"{num_processes} (0..{num_processes - 1})")
    if not coordinator or ":" not in coordinator:
        parser.error(f"--num-processes needs --coordinator HOST:PORT (or "
                     f"$JAX_COORDINATOR_ADDRESS), got {coordinator!r}")
    port = coordinator.rsplit(":", 1)[1]
    if not (port.isdigit() and 0 < int(port) < 65536):
        parser.error(f"--coordinator {coordinator!r}: the port must be a number in 1..65535, "
                     f"got {port!r}")
    timeout = JOIN_TIMEOUT_S if join_timeout is None else join_timeout
    if not timeout > 0:
        parser.error(f"--join-timeout must be > 0, got {join_timeout}")
    if process_id != 0:
        _wait_for_coordinator(parser, coordinator, process_id, timeout)
    # Said before joining: if a process never comes or two claim one id, JAX aborts after the
    # timeout with DEADLINE_EXCEEDED and a stack trace, which this line explains.
    print(f"process {process_id} of {num_processes}: joining the coordinator at {coordinator} "
          f"(up to {timeout:g} s; DEADLINE_EXCEEDED after that: a process is missing or two "
          "claim one --process-id)", file=sys.stderr, flush=True)
    import jax

    if jax.config.jax_cpu_collectives_implementation is None:  # jax < 0.5 has none by default
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=max(1, int(timeout)))


def parse_args(argv: list[str] | None = None) -> tuple[MetaTrainConfig, set[str]]:
    """Parse flags into a config; also returns the names of the options given explicitly.

    With ``--num-processes``, this process then joins the others (``join_processes``).
    """
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    apply_data_dir(args.pop("data_dir"))
    processes = [args.pop(k) for k in ("coordinator", "num_processes", "process_id",
                                       "join_timeout")]
    given = {k: v for k, v in args.items() if v is not None}
    for name in _SINGULAR:
        if name in given:
            given[name] = dict(given[name])
    try:
        config = MetaTrainConfig(**given)
    except ConfigError as e:
        parser.error(str(e))
    join_processes(parser, *processes)
    return config, set(given)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, check everything that can fail early, then train."""
    config, given = parse_args(argv)
    from meta_train.checkpoint import TrainingCheckpointError  # slow imports (jax, tasks)
    from meta_train.train import meta_train  # after parsing

    try:
        result = meta_train(config, progress=True, given=given)
    except (ConfigError, FileNotFoundError, TrainingCheckpointError) as e:
        # FileNotFoundError: task data missing
        print(f"{_prog()}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    last = result.history[-1] if result.history else {}
    loss = last.get("meta_loss", float("nan"))
    import jax

    saved = (f"optimizer saved to {result.run_dir / 'optimizer'}" if jax.process_index() == 0
             else "process 0 saved the optimizer")
    print(f"done: {result.steps_done} outer steps; meta_loss {loss:.4f}; {saved}")
    return 0
