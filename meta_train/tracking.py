"""Metrics to ``DIR/metrics.jsonl`` and, unless disabled, to wandb (offline by default).

wandb runs in ``DIR/wandb`` (offline runs can be uploaded later with ``wandb sync``); the run id
is kept in ``DIR/wandb_id.txt`` so that a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_MODES = ("online", "offline", "disabled")


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def usable_wandb_mode(mode: str, timeout: float = 3.0) -> str:
    """``mode``, or ``"offline"`` with a warning when ``"online"`` cannot work here.

    Online wandb without an API key fails after about 15 s and without network hangs about
    90 s before it crashes; both are checked in at most ``timeout`` seconds first.
    """
    if mode != "online":
        return mode
    host = _wandb_host()
    problem = None
    if not _has_api_key(host):
        problem = f"no wandb API key for {host} (set WANDB_API_KEY or run `wandb login`)"
    else:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as e:
            problem = f"{host}:443 is unreachable ({e})"
    if problem is None:
        return mode
    warnings.warn(f"wandb online is not usable: {problem}; logging offline instead (upload "
                  "later with `wandb sync`)", stacklevel=2)
    return "offline"


def offline_run_hint(run_dir) -> str:
    """Where a run's offline wandb data are and how to upload them."""
    return (f"wandb offline data in {Path(run_dir) / 'wandb'}; upload with: wandb sync "
            f"{Path(run_dir) / 'wandb' / 'offline-run-*'}")


def _jsonable(v: Any) -> Any:
    v = float(v) if not isinstance(v, (int, str, bool)) else v
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; None = "not measured at this step"
    return v


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class MetricsLogger:
    """Append one JSON line per outer step; mirror it to wandb.

    Args:
      run_dir: the run directory.
      config: a JSON-able dict logged once as the run's config.
      mode: wandb mode, ``online``, ``offline`` or ``disabled``.
      resume_step: when resuming after ``resume_step`` outer steps, lines of later steps (written
        after that checkpoint, before an interruption) are dropped so the file matches the state.
      project: wandb project.
    """

    def __init__(self, run_dir, config: dict, mode: str = "offline",
                 resume_step: int | None = None, project: str = "learned-opt"):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            kept = [ln for ln in self.path.read_text().splitlines()
                    if (step := _step_of(ln)) is not None and step < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = self.path.open("a")
        self.run = None
        self.mode = mode = usable_wandb_mode(mode)
        if mode != "disabled":
            import wandb  # slow import: only when used

            os.environ.setdefault("WANDB_SILENT", "true")
            id_path = Path(run_dir) / "wandb_id.txt"
            if resume_step is not None and id_path.exists():
                run_id = id_path.read_text().strip()
            else:
                run_id = secrets.token_hex(4)
                id_path.write_text(run_id)
            self.run = wandb.init(project=project, dir=str(run_dir), mode=mode, config=config,
                                  id=run_id, resume="allow", name=Path(run_dir).name)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step)} | {k: _jsonable(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                         step=int(step))

    def close(self) -> None:
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(run_dir) -> list[dict]:
    """All rows of ``DIR/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if _step_of(ln) is not None]
