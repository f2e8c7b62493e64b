"""Metrics to ``DIR/metrics.jsonl`` and, unless disabled, to wandb (offline by default).

wandb runs in ``DIR/wandb`` (offline runs can be uploaded later with ``wandb sync``); the run id
is kept in ``DIR/wandb_id.txt`` so that a resumed run continues the same wandb run.

Every row reaches wandb exactly once, also after ``kill -9``: wandb's service buffers its
transaction log (``DIR/wandb/*-ID/run-ID.wandb``) and a kill loses what it had not written (all
of the last 30 rows at a kill 5 s after logging them, here). A resumed run reads the rows that
the earlier segments of the run hold (:func:`wandb_history`), sends wandb the rows of
``metrics.jsonl`` that are missing, and does not send again the steps wandb already has (a kill
can also leave wandb ahead of the checkpoint the run resumes from).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import secrets
import socket
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from learned_opt.extras import is_installed

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
    """``mode``, or ``"offline"`` with a warning when ``"online"`` cannot work here, or
    ``"disabled"`` with a warning when wandb is not installed (the ``[wandb]`` extra).

    Online wandb without an API key fails after about 15 s and without network hangs about
    90 s before it crashes; both are checked in at most ``timeout`` seconds first.
    """
    if mode != "disabled" and not is_installed("wandb"):
        warnings.warn(f"wandb {mode} asked for, but wandb is not installed (pip install "
                      "'learned-opt[wandb]'): the metrics go to metrics.jsonl only", stacklevel=2)
        return "disabled"
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


# wandb's transaction log (``run-ID.wandb``): LevelDB's log format with a 7-byte file header
# (":W&B", magic 0xBEE1 little-endian, version 0), then records in 32 KiB blocks, each with a
# header (CRC-32 of type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last) and a
# serialised ``wandb_internal_pb2.Record``. wandb 0.31's Python package no longer ships a
# reader (its wandb-core service, in Go, writes and syncs the file), hence this one.
_LOG_IDENT, _LOG_BLOCK, _LOG_HEADER = b":W&B\xe1\xbe", 32768, 7


def _log_records(path: Path):
    """The complete records of a wandb transaction log, in order; stops at the first record cut
    short or damaged (what a kill leaves at the end of the file)."""
    data = path.read_bytes()
    if len(data) < _LOG_HEADER and _LOG_IDENT.startswith(data[:6]):
        return  # created, nothing written yet (a kill at the start)
    if data[:6] != _LOG_IDENT:
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:7]!r})")
    pos, parts = _LOG_HEADER, []
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _LOG_HEADER])
        chunk = data[pos + _LOG_HEADER:pos + _LOG_HEADER + length]
        if (len(chunk) < length or kind not in (1, 2, 3, 4)
                or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc):
            return
        pos += _LOG_HEADER + length
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def wandb_logs(run_dir, run_id: str) -> list[Path]:
    """The transaction logs of wandb run ``run_id`` under ``DIR/wandb`` (one per segment: each
    start or resume of the run writes its own), oldest first."""
    # Segment folders: [offline-]run-YYYYMMDD_HHMMSS-ID, with "-N" added by wandb when one of
    # that name exists (a resume within the same second).
    name = re.compile(rf"(?:offline-)?run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = {}
    for path in (Path(run_dir) / "wandb").glob(f"*/run-{run_id}.wandb"):
        if (m := name.fullmatch(path.parent.name)) and not path.parent.is_symlink():
            found[(m.group(1), int(m.group(2) or 0))] = path
    return [found[k] for k in sorted(found)]


def wandb_history(run_dir, run_id: str) -> list[dict]:
    """Every history row wandb has written for run ``run_id`` under ``DIR/wandb``, in order,
    as ``{"step": ..., key: value}`` (values as logged; ``_runtime``-style keys included)."""
    return [row for path in wandb_logs(run_dir, run_id) for row in _history_rows(path)]


def _history_rows(path: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2  # slow import: only when used

    rows = []
    for data in _log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {"step": int(record.history.step.num)}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def _init_wandb(wandb, timeout: float = 10.0, **kwargs):
    """``wandb.init``, retried while wandb's service still holds the same run id (for a moment
    after ``finish`` returns: a resume in the same process got "run ID ... is in use")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # wandb's ServerResponseError, not importable from one place
            if "is in use" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class MetricsLogger:
    """Append one JSON line per outer step; mirror it to wandb.

    Args:
      run_dir: the run directory.
      config: a JSON-able dict logged once as the run's config.
      mode: wandb mode, ``online``, ``offline`` or ``disabled``.
      resume_step: when resuming after ``resume_step`` outer steps, lines of later steps (written
        after that checkpoint, before an interruption) are dropped so the file matches the state;
        wandb is sent the kept rows it does not have (offline: the steps missing from the run's
        transaction logs in ``DIR/wandb``; online: the steps from the server's resumed step on;
        offline segments of the run are not counted then: sync them before resuming online).
      project: wandb project.
    """

    def __init__(self, run_dir, config: dict, mode: str = "offline",
                 resume_step: int | None = None, project: str = "learned-opt"):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            kept = [ln for ln in self.path.read_text().splitlines()
                    if (step := _step_of(ln)) is not None and step < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = self.path.open("a")
        self.run = None
        self._in_wandb: set[int] = set()  # steps wandb has or has been sent
        self._last_sent: int | None = None
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
            if mode == "offline":  # steps earlier segments of this run wrote: not sent again
                self._in_wandb = {row["step"] for row in wandb_history(run_dir, run_id)}
            self.run = _init_wandb(wandb, project=project, dir=str(run_dir), mode=mode,
                                   config=config, id=run_id, resume="allow",
                                   name=Path(run_dir).name)
            if mode == "online":  # the server holds the steps before the resumed run's start
                self._in_wandb = set(range(int(self.run.starting_step or 0)))
            for line in kept:  # rows a kill kept from wandb, sent now (in step order)
                self._send(json.loads(line))

    def _send(self, row: dict) -> None:
        step = row["step"]
        if self.run is not None and step not in self._in_wandb:
            self.run.log({k: v for k, v in row.items() if k != "step" and v is not None},
                         step=step)
            self._in_wandb.add(step)
            self._last_sent = step

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step)} | {k: _jsonable(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._send(row)

    def close(self, timeout: float = 30.0) -> None:
        """Close the file and finish the wandb run; offline, wait (up to ``timeout`` s) until
        wandb's transaction log holds the last row sent: ``finish`` returns before wandb's service
        has written it (the log was empty right after ``finish`` in a test), and a resume that
        read it then would send those rows again."""
        self._file.close()
        if self.run is None:
            return
        log_path = Path(self.run.dir).parent / f"run-{self.run.id}.wandb"
        self.run.finish()
        self.run = None
        if self.mode != "offline" or self._last_sent is None:
            return
        deadline = time.monotonic() + timeout
        while not (log_path.exists()
                   and any(row["step"] == self._last_sent for row in _history_rows(log_path))):
            if time.monotonic() > deadline:
                warnings.warn(f"wandb has not written step {self._last_sent} to {log_path} "
                              f"{timeout:.0f} s after finishing the run; a resume may send "
                              "wandb rows it has again", stacklevel=2)
                return
            time.sleep(0.05)


def read_metrics(run_dir) -> list[dict]:
    """All rows of ``DIR/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if _step_of(ln) is not None]
