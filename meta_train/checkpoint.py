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

import json
import os
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
