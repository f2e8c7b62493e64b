"""Learned-optimizer checkpoints: a directory anyone can load into an optax optimizer.

Layout of ``path/``:

* ``optimizer.json``: format version, library version, method name, config, and the weight
  space (every leaf's key path, shape, dtype and spec labels), plus the SHA-256 of
  the meta-parameter file;
* ``meta_params.msgpack``: the meta-parameters, Flax msgpack serialisation (no pickle).

Example (five lines of ordinary optax code)::

    tx = learned_opt.load_optax("runs/mlp/optimizer")
    opt_state = tx.init(params)
    for batch in batches:
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.adapters import agnostic_optax
from learned_opt.direction import METHODS as DIRECTION_METHODS
from learned_opt.optimizer import LearnedOptimizer
from learned_opt.optimizers import learned_optimizer
from learned_opt.spec import is_spec_leaf

FORMAT = "learned_opt.optimizer"
FORMAT_VERSION = 1
JSON_FILE = "optimizer.json"
META_FILE = "meta_params.msgpack"


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, corrupted, or does not fit."""


def _library_version() -> str:
    try:
        return importlib.metadata.version("learned-opt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _keys(path) -> list[str]:
    keys = []
    for k in path:
        if not isinstance(k, jax.tree_util.DictKey) or not isinstance(k.key, str):
            raise CheckpointError(
                f"checkpoints support parameter trees of nested dicts with string keys (as Flax "
                f"produces); found the key {k!r}")
        keys.append(k.key)
    return keys


def _label_to_json(label, where: str):
    if label is None or isinstance(label, str) or (
            isinstance(label, int) and not isinstance(label, bool)):
        return label
    raise CheckpointError(f"spec label {label!r} at {where} cannot be saved: use str, int or None")


def _nest(entries: list[tuple[list[str], Any]]) -> dict:
    tree: dict = {}
    for keys, value in entries:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def _flat_arrays(tree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(str(getattr(k, "key", k)) for k in p), x) for p, x in flat]


def save(path: str | os.PathLike, lopt: LearnedOptimizer, meta_params: Any) -> str:
    """Write ``lopt`` and ``meta_params`` to the directory ``path`` (created if needed).

    Returns the directory path. Raises ``CheckpointError`` if ``meta_params`` do not have the
    structure and shapes of ``lopt.init``'s output.
    """
    expected = _flat_arrays(jax.eval_shape(lopt.init, jax.random.key(0)))
    got = _flat_arrays(meta_params)
    _compare_meta(expected, got, "meta_params given to save")
    for name, x in got:  # a diverged meta-training must not ship
        if not np.isfinite(np.asarray(x, np.float32)).all():
            raise CheckpointError(f"meta_params given to save: leaf {name} holds NaN or inf "
                                  "values; refusing to write them")
    spec_flat, _ = jax.tree_util.tree_flatten_with_path(lopt.perm_spec, is_leaf=is_spec_leaf)
    leaves = []
    for (p, labels), shape in zip(spec_flat, lopt.weight_space.shapes, strict=True):
        keys = _keys(p)
        leaves.append(dict(keys=keys, shape=list(shape),
                           labels=[_label_to_json(lab, "/".join(keys)) for lab in labels]))
    blob, sha = serialize(jax.tree.map(lambda x: np.asarray(x, np.float32), meta_params))
    header = dict(
        format=FORMAT, format_version=FORMAT_VERSION, library_version=_library_version(),
        name=lopt.name, config=dataclasses.asdict(lopt.config), weight_space=leaves,
        num_meta_params=int(sum(np.size(x) for _, x in got)),
        meta_params_file=META_FILE, meta_params_sha256=sha)
    header["header_sha256"] = _header_sha256(header)
    os.makedirs(path, exist_ok=True)
    # Write the data first and the header last, each through a temporary file, so that an
    # interrupted save never leaves a header that points at a half-written file.
    write_atomic(os.path.join(path, META_FILE), blob)
    write_atomic(os.path.join(path, JSON_FILE), json.dumps(header, indent=2).encode())
    return os.fspath(path)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` and ``os.replace``: a kill leaves the
    old file or the new one, never half of one (every checkpoint file of the project)."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def serialize(tree: Any) -> tuple[bytes, str]:
    """``tree`` as Flax msgpack (no pickle) and the SHA-256 (hex) of those bytes."""
    blob = flax.serialization.msgpack_serialize(tree)
    return blob, hashlib.sha256(blob).hexdigest()


def read_verified(path: str | os.PathLike, sha256: str | None, recorded_in: str,
                  error: type[Exception] = CheckpointError) -> Any:
    """The msgpack tree (state dict) in ``path``, after checking its SHA-256 against ``sha256``
    (``None``: files written before checksums were recorded, unchecked); ``error`` naming the
    file when it does not match or cannot be decoded (``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        blob = f.read()
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise error(f"corrupted checkpoint: {path} does not match the SHA-256 recorded in "
                    f"{recorded_in}")
    try:
        return flax.serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several types on malformed input
        raise error(f"corrupted checkpoint: cannot decode {path} ({e})") from e


def _compare_meta(expected, got, what: str) -> None:
    exp = dict(expected)
    got_d = dict(got)
    for p, x in expected:
        if p not in got_d:
            raise CheckpointError(f"{what}: missing meta-parameter {p}")
        if tuple(np.shape(got_d[p])) != tuple(x.shape):
            raise CheckpointError(f"{what}: meta-parameter {p} has shape "
                                  f"{tuple(np.shape(got_d[p]))}, expected {tuple(x.shape)}")
    extra = [p for p, _ in got if p not in exp]
    if extra:
        raise CheckpointError(f"{what}: unexpected meta-parameter {extra[0]}")


def _header_sha256(header: dict) -> str:
    """Checksum of every header field but itself (canonical JSON): covers the config too."""
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _read_header(path) -> dict:
    jpath = os.path.join(path, JSON_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not os.path.isfile(jpath):
        raise CheckpointError(f"partial checkpoint: {jpath} is missing")
    try:
        with open(jpath) as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint: {jpath} is not valid JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{jpath} is not a learned-optimizer checkpoint header")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{jpath} has format version {header.get('format_version')}; this "
                              f"library reads version {FORMAT_VERSION}")
    missing = [k for k in ("name", "config", "weight_space", "meta_params_sha256")
               if k not in header]
    if missing:
        raise CheckpointError(f"corrupted checkpoint: {jpath} lacks the field(s) {missing}")
    # Checkpoints written before the header checksum existed have none (still readable).
    if "header_sha256" in header and header["header_sha256"] != _header_sha256(header):
        raise CheckpointError(f"corrupted checkpoint: {jpath} was edited or damaged (its fields "
                              "do not match the header_sha256 it records)")
    return header


def load(path: str | os.PathLike) -> tuple[LearnedOptimizer, dict[str, Any]]:
    """Read a checkpoint written by :func:`save` (or a shipped optimizer's name): returns
    ``(lopt, meta_params)``, ``lopt`` built for the weight space it was saved with."""
    path = resolve(path)
    header = _read_header(path)
    try:
        leaves = [(list(e["keys"]), tuple(e["shape"]), tuple(e["labels"]))
                  for e in header["weight_space"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"corrupted checkpoint: bad weight_space entry in {path} "
                              f"({e!r})") from e
    params = _nest([(k, jax.ShapeDtypeStruct(s, jnp.float32)) for k, s, _ in leaves])
    spec = _nest([(k, labels) for k, _, labels in leaves])
    lopt = learned_optimizer(header["name"], params, spec, **header["config"])

    mpath = os.path.join(path, header.get("meta_params_file", META_FILE))
    if not os.path.isfile(mpath):
        raise CheckpointError(f"partial checkpoint: {mpath} is missing")
    state = read_verified(mpath, header["meta_params_sha256"], JSON_FILE)
    template = jax.eval_shape(lopt.init, jax.random.key(0))
    _compare_meta(_flat_arrays(template), _flat_arrays(state), f"checkpoint {path}")
    meta = flax.serialization.from_state_dict(template, state)
    meta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), meta)
    return lopt, meta


PRETRAINED_DIR = os.path.join(os.path.dirname(__file__), "pretrained")


def list_pretrained() -> list[str]:
    """Names of the optimizers shipped with the package (``load_optax(name)`` loads one).

    Their model card is docs/pretrained.md: what each was meta-trained on, with what budget, and
    how it does against tuned Adam. Every folder of the package's ``pretrained/`` is listed;
    loading one whose files are missing raises ``CheckpointError`` saying the copy is damaged.
    """
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    return sorted(d for d in os.listdir(PRETRAINED_DIR) if not d.startswith((".", "_"))
                  and os.path.isdir(os.path.join(PRETRAINED_DIR, d)))


def resolve(name_or_dir: str | os.PathLike) -> str:
    """The checkpoint directory of a shipped optimizer's name, or ``name_or_dir`` itself.

    A bare shipped name means the shipped optimizer even when the working directory holds a
    folder of that name (write ``./name`` for the folder).
    """
    text = os.fspath(name_or_dir)
    if text in list_pretrained():
        path = os.path.join(PRETRAINED_DIR, text)
        if not os.path.isfile(os.path.join(path, JSON_FILE)):
            raise CheckpointError(f"the shipped optimizer {text!r} is damaged: {path} has no "
                                  f"{JSON_FILE} (reinstall the package)")
        return path
    if os.path.isdir(text):
        return text
    if os.sep not in text and not text.startswith("."):
        raise CheckpointError(f"{text!r} is neither a checkpoint directory nor a shipped "
                              f"optimizer; shipped: {list_pretrained()}")
    return text  # load reports the missing directory


def load_optax(name_or_dir: str | os.PathLike, perm_spec=None, num_steps: int | None = None,
               learning_rate: float | optax.Schedule | None = None
               ) -> optax.GradientTransformationExtraArgs:
    """A checkpoint, or a shipped optimizer by name, as an optax optimizer.

    Its ``update`` needs ``params``: ``tx.update(grads, opt_state, params)``.

    * Weight-space-agnostic methods (``learned_opt.list_agnostic_optimizers()``, all shipped
      optimizers): any weight space; ``init(params)`` uses ``perm_spec``, or infers one with
      ``learned_opt.infer_perm_spec`` (``PermSpecError`` asking for a spec when it cannot).
    * The others: the checkpoint's structure at any label sizes; parameters named differently
      (``nn.Sequential``) are accepted when the structure is the same
      (``LearnedOptimizer.rekey``); ``PermSpecError`` naming the first mismatching leaf
      otherwise.

    ``num_steps`` (the run's total number of steps) is required by optimizers meta-trained with
    training progress (``progress_centres``) and ignored by the others.

    ``learning_rate`` (learned-direction optimizers only, whose step size is outside the
    network): a number replaces the peak of the default warm-up + cosine schedule, a schedule
    replaces the schedule; ``None`` keeps the optimizer's default.

    Example:
      >>> import jax, jax.numpy as jnp, learned_opt
      >>> tx = learned_opt.load_optax(learned_opt.list_pretrained()[0], num_steps=100)
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 16)), "bias": jnp.zeros(16)},
      ...           "Dense_1": {"kernel": jnp.ones((16, 3)), "bias": jnp.zeros(3)}}
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    """
    return optax_for(*load(resolve(name_or_dir)), num_steps=num_steps, perm_spec=perm_spec,
                     learning_rate=learning_rate)


def optax_for(lopt, meta_params, num_steps: int | None = None, perm_spec=None,
              learning_rate: float | optax.Schedule | None = None
              ) -> optax.GradientTransformationExtraArgs:
    """``lopt`` with ``meta_params`` as the optax optimizer :func:`load_optax` gives: the default
    chain of a learned-direction rule, the any-weight-space adapter of the other agnostic
    methods, the weight-space-bound adapter otherwise (``perm_spec``: of the parameters)."""
    if lopt.name in DIRECTION_METHODS:  # the default chain: direction, decay, schedule
        return lopt.as_optax(meta_params, num_steps=num_steps, perm_spec=perm_spec,
                             learning_rate=learning_rate)
    if learning_rate is not None:
        raise ValueError(f"learning_rate: {lopt.name!r} learns its own step size; only the "
                         f"learned-direction optimizers ({', '.join(DIRECTION_METHODS)}) take "
                         "an external one")
    if lopt.agnostic:
        return agnostic_optax(lopt.name, meta_params, perm_spec, num_steps,
                              **dataclasses.asdict(lopt.config))
    return lopt.as_optax(meta_params, num_steps=num_steps, perm_spec=perm_spec)
