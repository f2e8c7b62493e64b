"""Training checkpoints: the whole estimator state as msgpack, metadata as JSON (no pickle).

Layout under the run directory::

    checkpoints/step_00000100.msgpack   estimator state (meta-parameters = the ES mean, outer
                                        optimizer state, perturbation accumulators, inner runs)
    checkpoints/latest.json             {"step", "file", "sha256", "seed", "config", "kept"}

``kept`` lists every checkpoint still on disk with its SHA-256, newest first. ``restore`` checks
the checksum, the tree structure, every leaf's shape and dtype, and falls back to the older kept
checkpoint (with a warning) when the newest is damaged; a damaged run never resumes silently.

Randomness is not stored as a generator state: the key of outer step ``t`` is a pure function
of ``(seed, t)`` (``meta_train.train.step_key``), so the seed and the step fix it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from learned_opt.checkpoint import read_verified, serialize, write_atomic

KEEP = 2  # training checkpoints kept on disk (the newest ones)


class TrainingCheckpointError(ValueError):
    """No usable training checkpoint: every kept one is missing, damaged or of another run."""


def _to_host(tree: Any) -> Any:
    if jax.process_count() > 1:  # multi-host: gather the sharded population first
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def save(run_dir: str | os.PathLike, step: int, state: Any, config_json: str, seed: int) -> Path:
    """Write the estimator state after ``step`` outer steps; returns the checkpoint's path."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = ckpt_dir / f"step_{step:08d}.msgpack"
    host = _to_host(serialization.to_state_dict(state))  # every process takes part in a gather
    if jax.process_index() != 0:
        return path
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    blob, sha = serialize(host)
    write_atomic(path, blob)
    previous = latest(ckpt_dir.parent, missing_ok=True) or {}
    entry = {"step": step, "file": path.name, "sha256": sha}
    kept = [entry] + [k for k in previous.get("kept", []) if k["file"] != path.name]
    kept = kept[:KEEP]
    meta = entry | {"seed": seed, "config": json.loads(config_json), "kept": kept}
    write_atomic(ckpt_dir / "latest.json", json.dumps(meta, indent=2).encode())
    names = {k["file"] for k in kept}
    for old in ckpt_dir.glob("step_*.msgpack"):
        if old.name not in names:
            old.unlink()
    return path


def latest(run_dir: str | os.PathLike, missing_ok: bool = False) -> dict | None:
    """The metadata of the newest checkpoint, or None when the run has none.

    A ``latest.json`` that cannot be read (e.g. cut short by a crash of an older version) raises
    ``TrainingCheckpointError`` naming it, or gives None with ``missing_ok``.
    """
    path = Path(run_dir) / "checkpoints" / "latest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if missing_ok:
            return None
        raise TrainingCheckpointError(f"{path} is not valid JSON ({e}): the run cannot be "
                                      "resumed; start it again in another --out") from e


def _check_leaves(template: Any, raw: Any, file: Path) -> None:
    """Same tree, shapes and dtypes as the state being restored, or an error naming the leaf."""
    want = serialization.to_state_dict(template)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(raw)[0])
    if flat_want.keys() != flat_got.keys():
        extra = sorted(map(jax.tree_util.keystr, flat_got.keys() - flat_want.keys()))[:3]
        missing = sorted(map(jax.tree_util.keystr, flat_want.keys() - flat_got.keys()))[:3]
        raise TrainingCheckpointError(f"{file}: state tree differs from this run's (missing "
                                      f"{missing}, unexpected {extra})")
    for key, w in flat_want.items():
        g = np.asarray(flat_got[key])
        # Shape and dtype only: a template leaf may span other processes' devices.
        shape, dtype = np.shape(w), np.dtype(getattr(w, "dtype", type(w)))
        if g.shape != shape or g.dtype != dtype:
            raise TrainingCheckpointError(
                f"{file}: leaf {jax.tree_util.keystr(key)} has shape {g.shape} {g.dtype}, this "
                f"run expects {shape} {dtype}")


def _read(file: Path, sha256: str | None, template: Any) -> Any:
    raw = read_verified(file, sha256, "latest.json", TrainingCheckpointError)
    _check_leaves(template, raw, file)
    state = serialization.from_state_dict(template, raw)
    # Leaves come back as numpy arrays; keep the template's dtypes exactly.
    return jax.tree.map(lambda t, x: np.asarray(x, dtype=t.dtype), template, state)


def restore(run_dir: str | os.PathLike, template: Any) -> tuple[int, Any]:
    """Read the newest usable checkpoint into the structure of ``template``: ``(step, state)``.

    A damaged newest checkpoint (checksum, msgpack, tree, shape or dtype) is skipped with a
    warning for the older kept one; ``TrainingCheckpointError`` when none is usable.
    """
    meta = latest(run_dir)
    ckpt_dir = Path(run_dir) / "checkpoints"
    if meta is None:
        raise FileNotFoundError(f"no training checkpoint in {ckpt_dir}")
    # Checkpoints written before checksums were recorded: the newest file, unchecked.
    kept = meta.get("kept") or [{"step": meta["step"], "file": meta["file"], "sha256": None}]
    problems = []
    for entry in kept:
        file = ckpt_dir / entry["file"]
        try:
            state = _read(file, entry.get("sha256"), template)
        except (TrainingCheckpointError, OSError) as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"resuming from the older checkpoint {file} (step {entry['step']}): "
                          + "; ".join(problems), stacklevel=2)
        return int(entry["step"]), state
    raise TrainingCheckpointError("no usable training checkpoint: " + "; ".join(problems))


_RUN_FILES = ("config.json",)
_RUN_DIRS = ("snapshots", "optimizer")


def _copy_run_files(src: Path, dest: Path) -> None:
    for name in _RUN_FILES:
        shutil.copy2(src / name, dest / name)
    for name in _RUN_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, dirs_exist_ok=True)


def export_run(run_dir: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Copy what resumes ``run_dir`` on another machine into ``dest`` (small enough to commit).

    ``dest`` gets ``config.json``, the newest checkpoint only (``checkpoints/``), the snapshots
    and final optimizer when present, and the metrics log as gzipped chunks (``metrics/``).
    Returns the checkpoint's outer step. The run may be running: the checkpoint copied is the
    one ``latest.json`` names when read (checksummed).
    """

    run_dir, dest = Path(run_dir), Path(dest)
    meta = latest(run_dir)
    if meta is None:
        raise FileNotFoundError(f"no training checkpoint in {run_dir / 'checkpoints'}")
    src = run_dir / "checkpoints" / meta["file"]
    blob = src.read_bytes()  # before anything is written: a newer save may delete src
    entry = {"step": meta["step"], "file": meta["file"], "sha256": meta["sha256"]}
    out = dest / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("step_*.msgpack"):
        old.unlink()
    write_atomic(out / meta["file"], blob)
    read_verified(out / meta["file"], meta["sha256"], "latest.json", TrainingCheckpointError)
    write_atomic(out / "latest.json", json.dumps(meta | {"kept": [entry]}, indent=2).encode())
    _copy_run_files(run_dir, dest)
    if (run_dir / "metrics.jsonl").exists():
        _export_metrics(run_dir / "metrics.jsonl", dest / "metrics")
    return int(meta["step"])


METRICS_CHUNK = 5000  # rows per exported metrics file: a finished chunk never changes again


def _export_metrics(path: Path, out: Path) -> None:
    """``metrics.jsonl`` as gzipped chunks of ``METRICS_CHUNK`` rows, written only when their
    bytes change: repeated exports of a growing log add only its newest chunk to git."""
    lines = [ln for ln in path.read_bytes().splitlines(keepends=True) if ln.endswith(b"\n")]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(lines), METRICS_CHUNK):
        file = out / f"rows_{i:08d}.jsonl.gz"
        blob = gzip.compress(b"".join(lines[i:i + METRICS_CHUNK]), mtime=0)
        if not file.exists() or file.read_bytes() != blob:
            write_atomic(file, blob)


def import_run(src: str | os.PathLike, run_dir: str | os.PathLike) -> int:
    """Lay out an :func:`export_run` copy as a run directory that ``--resume`` continues.

    Refuses a ``run_dir`` that already holds a checkpoint (nothing is overwritten). Returns the
    checkpoint's outer step.
    """
    src, run_dir = Path(src), Path(run_dir)
    meta = latest(src)
    if meta is None:
        raise FileNotFoundError(f"{src} holds no exported run (no checkpoints/latest.json)")
    if latest(run_dir, missing_ok=True) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; import into an empty directory")
    read_verified(src / "checkpoints" / meta["file"], meta["sha256"], "latest.json",
                  TrainingCheckpointError)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "checkpoints", run_dir / "checkpoints", dirs_exist_ok=True)
    _copy_run_files(src, run_dir)
    chunks = sorted((src / "metrics").glob("rows_*.jsonl.gz"))
    with (run_dir / "metrics.jsonl").open("wb") as f:
        for chunk in chunks:
            f.write(gzip.decompress(chunk.read_bytes()))
    return int(meta["step"])
