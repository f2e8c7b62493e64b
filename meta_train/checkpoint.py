"""Training checkpoints: the whole estimator state as msgpack, metadata as JSON (no pickle).

Layout under the run directory::

    checkpoints/step_00000100.msgpack   estimator state (meta-parameters = the ES mean, outer
                                        optimizer state, perturbation accumulators, inner runs)
    checkpoints/latest.json             {"step", "file", "seed", "config"}

Randomness is not stored as a generator state: the key of outer step ``t`` is a pure function
of ``(seed, t)`` (``meta_train.train.step_key``), so the seed and the step fix it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

KEEP = 2  # training checkpoints kept on disk (the newest ones)


def _to_host(tree: Any) -> Any:
    if jax.process_count() > 1:  # multi-host: gather the sharded population first
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(run_dir: str | os.PathLike, step: int, state: Any, config_json: str, seed: int) -> Path:
    """Write the estimator state after ``step`` outer steps; returns the checkpoint's path."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    host = _to_host(serialization.to_state_dict(state))
    if jax.process_index() != 0:
        return ckpt_dir / f"step_{step:08d}.msgpack"
    path = ckpt_dir / f"step_{step:08d}.msgpack"
    _write_atomic(path, serialization.msgpack_serialize(host))
    meta = {"step": step, "file": path.name, "seed": seed, "config": json.loads(config_json)}
    _write_atomic(ckpt_dir / "latest.json", json.dumps(meta, indent=2).encode())
    for old in sorted(ckpt_dir.glob("step_*.msgpack"))[:-KEEP]:
        old.unlink()
    return path


def latest(run_dir: str | os.PathLike) -> dict | None:
    """The metadata of the newest checkpoint, or None when the run has none."""
    path = Path(run_dir) / "checkpoints" / "latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def restore(run_dir: str | os.PathLike, template: Any) -> tuple[int, Any]:
    """Read the newest checkpoint into the structure of ``template``: ``(step, state)``."""
    meta = latest(run_dir)
    if meta is None:
        raise FileNotFoundError(f"no training checkpoint in {Path(run_dir) / 'checkpoints'}")
    data = (Path(run_dir) / "checkpoints" / meta["file"]).read_bytes()
    raw = serialization.msgpack_restore(data)
    state = serialization.from_state_dict(template, raw)
    # Leaves come back as numpy arrays; keep the template's dtypes exactly.
    state = jax.tree.map(lambda t, x: np.asarray(x, dtype=t.dtype), template, state)
    return int(meta["step"]), state
