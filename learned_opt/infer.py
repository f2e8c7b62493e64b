"""Infer the permutation spec of a sequential Flax model from its parameter tree.

Reads the layers in the order of the parameter dict (Flax creates it in call order; when that
order does not chain, e.g. after ``jit``/``eval_shape``/``tree_map`` sorted the keys, the unique
order of the top-level layers that chains and keeps Flax's numbering is used) and chains hidden
labels through them: the output units of each layer carry a label named after the layer's
path (``"Dense_0"``, ``"Conv_1"``, ``"RNN_0"``), which the next layer's input axis shares. The
first layer's input and the last layer's output are ``None`` (pixels, vocabulary and classes
are fixed).

Recognised layers (Flax linen parameter layouts):
  * ``Dense``: ``kernel`` (in, out), optional ``bias`` (out,)
  * ``Conv``: ``kernel`` (*window, in, out), optional ``bias``; spatial axes ``None``. A
    following Dense must read the channels (global pooling), not a flattened image.
  * ``Embed``: ``embedding`` (vocab, features); must be the first layer
  * ``LayerNorm``/``RMSNorm``-style: only 1-D ``scale``/``bias``; keeps the current label
  * recurrent cells (``SimpleCell``, ``GRUCell``, ``LSTMCell``, or any module whose children
    are Dense layers named ``i*`` (input) and ``h*`` (hidden)): all share one hidden label,
    both axes of the hidden-to-hidden kernels; extra 1-D parameters of the hidden size (a
    learned initial state) carry it too.
  * containers (e.g. ``nn.Sequential``'s ``layers_0``...) are read recursively in order.

Anything else (attention, residual connections, reshapes) raises :class:`PermSpecError`: write
the spec by hand. Residual connections cannot be seen in a parameter tree, so always check an
inferred spec numerically with :func:`learned_opt.check_perm_spec` (``tasks.from_flax`` does).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  >>> infer_perm_spec(params)
  {'layers_0': {'kernel': (None, 'layers_0'), 'bias': ('layers_0',)}, 'layers_2': {'kernel': ('layers_0', None), 'bias': (None,)}}
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learned_opt.spec import PermSpecError

PyTree = Any
ATTENTION_KEYS = {"query", "key", "value", "out"}


def _is_array(x) -> bool:
    return hasattr(x, "shape") and not isinstance(x, Mapping)


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _kind(node: Mapping) -> str | None:
    """Which layer a dict of parameters is, from its leaf names and ranks."""
    if not isinstance(node, Mapping) or not node:
        return None
    keys = set(node)
    arrays = {k: v for k, v in node.items() if _is_array(v)}
    children = {k: v for k, v in node.items() if isinstance(v, Mapping)}
    if keys == {"embedding"} and len(_shape(node["embedding"])) == 2:
        return "embed"
    if "kernel" in arrays and keys <= {"kernel", "bias"}:
        rank = len(_shape(node["kernel"]))
        if "bias" in arrays and len(_shape(node["bias"])) >= 2:
            return "stacked"  # a conv's bias has rank 1: a leading layer axis (nn.scan)
        return "dense" if rank == 2 else "conv" if rank >= 3 else None
    if arrays and not children and keys <= {"scale", "bias"}:
        if all(len(_shape(v)) == 1 for v in arrays.values()):
            return "norm"
    if ATTENTION_KEYS <= keys:
        return "attention"
    if children and all(k[:1] in ("i", "h") and _kind(v) == "dense" for k, v in children.items()):
        if any(k.startswith("i") for k in children) and any(k.startswith("h") for k in children):
            if all(len(_shape(v)) == 1 for v in arrays.values()):
                return "recurrent"
    return None


def _layers(node: Mapping, prefix: str, out: list) -> None:
    """Flatten containers into a list of (path, kind, node) in dict order."""
    for name, child in node.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if not isinstance(child, Mapping):
            raise PermSpecError(
                f"cannot infer a spec: parameter {path} (shape {_shape(child)}) is not part of a "
                f"recognised layer (Dense, Conv, Embed, LayerNorm, recurrent cell); pass the "
                f"spec by hand"
            )
        kind = _kind(child)
        if kind == "attention":
            raise PermSpecError(
                f"cannot infer a spec for the attention layer at {path}: heads and residual "
                f"connections are not visible in a parameter tree. Write the spec by hand "
                f"(see tasks.registry.transformer_lm_spec for a Transformer)"
            )
        if kind == "stacked":
            raise PermSpecError(
                f"cannot infer a spec: layer {path} holds stacked parameters (kernel "
                f"{_shape(child['kernel'])}, bias {_shape(child['bias'])}: a leading layer axis, "
                f"as nn.scan or nn.vmap make). Pass the spec by hand, e.g. kernel (None, 'h', 'h') "
                f"and bias (None, 'h') for stacked layers of one width that feed each other"
            )
        if kind is None:
            _layers(child, path, out)
        else:
            out.append((path, kind, child))


def infer_perm_spec(params: PyTree, order: Sequence[str] | None = None) -> dict:
    """Permutation spec of a sequential model built from standard Flax linen layers.

    Args:
      params: the model's parameters (the ``"params"`` collection, or the whole variables dict
        with a single ``"params"`` entry). Layers are read in dict order, which is Flax's call
        order. ``jit``, ``eval_shape`` and ``tree_map`` sort dict keys: if the dict order does
        not chain, the one order of the top-level layers that chains (sizes match, an Embed
        first, ``X_0`` before ``X_1``) is used; if several do, an error asks for ``order``.
      order: optional top-level layer names in call order.

    Returns:
      A spec (nested dicts of label tuples) with the structure of ``params``.

    Raises:
      PermSpecError: naming the layer when the structure is not a recognised sequential chain
        (unknown parameters, attention, an Embed that is not first, sizes that do not chain).
    """
    if not isinstance(params, Mapping):
        raise PermSpecError(
            f"cannot infer a spec for parameters held in a {type(params).__name__}: inference "
            "reads the nested dicts Flax makes (layer names, call order); pass perm_spec=..., a "
            "tree like the parameters whose leaves are tuples of axis labels")
    if set(params) == {"params"}:
        return {"params": infer_perm_spec(params["params"], order)}
    if order is not None:
        missing = sorted(set(params) - set(order)) + sorted(set(order) - set(params))
        if missing:
            raise PermSpecError(f"order must list every top-level key once; differs at {missing}")
        params = {k: params[k] for k in order}
        return _chain_spec(params, _flat_layers(params))
    try:
        return _chain_spec(params, _flat_layers(params))
    except _ChainError as error:
        # jit, eval_shape and tree_map return dicts with sorted keys: look for the call order.
        orders = _chain_orders(params)
        if len(orders) == 1:
            params = {k: params[k] for k in orders[0]}
            return _chain_spec(params, _flat_layers(params))
        if not orders:
            raise PermSpecError(
                f"cannot infer a spec: {error}; no order of the top-level layers chains "
                f"(pass the spec by hand)"
            ) from None
        raise PermSpecError(
            f"cannot infer a spec: {error}; the layers chain in {len(orders)} orders, e.g. "
            f"{orders[0]} and {orders[1]}: pass order=[...] (the call order)"
        ) from None


class _ChainError(PermSpecError):
    """The layers, read in the given order, do not form a chain."""


def _flat_layers(params: Mapping) -> list:
    layers: list = []
    _layers(params, "", layers)
    if not layers:
        raise PermSpecError("cannot infer a spec: no recognised layers in the parameters")
    return layers


def _io(layer) -> tuple[int | None, int | None, bool]:
    """(input size or None if any, output size or None if unchanged, is an embedding)."""
    _, kind, node = layer
    if kind == "embed":
        return None, _shape(node["embedding"])[1], True
    if kind == "norm":
        return _shape(next(iter(node.values())))[0], None, False
    if kind in ("dense", "conv"):
        return _shape(node["kernel"])[-2], _shape(node["kernel"])[-1], False
    kernel = next(v["kernel"] for k, v in node.items() if isinstance(v, Mapping) and k[0] == "i")
    return _shape(kernel)[-2], _shape(kernel)[-1], False


def _number(name: str) -> tuple[str, int] | None:
    prefix, _, idx = name.rpartition("_")
    return (prefix, int(idx)) if prefix and idx.isdigit() else None


def _chain_orders(params: Mapping, limit: int = 2) -> list[list[str]]:
    """Orders of the top-level keys whose layers chain (sizes match, Embed first) and that keep
    Flax's numbering (``Dense_0`` before ``Dense_1``). At most ``limit`` are returned."""
    groups = {k: _flat_layers({k: v}) for k, v in params.items()}
    found: list[list[str]] = []

    def extend(order, size, used):
        if len(found) >= limit:
            return
        if len(order) == len(groups):
            found.append(list(order))
            return
        for k in groups:
            if k in used:
                continue
            num = _number(k)
            if num and any(_number(u) and _number(u)[0] == num[0] and _number(u)[1] > num[1]
                           for u in used):
                continue
            s, ok = size, True
            for layer in groups[k]:
                fan_in, fan_out, embed = _io(layer)
                if (embed and (order or s is not None)) or (
                    fan_in is not None and s is not None and fan_in != s
                ):
                    ok = False
                    break
                s = s if fan_out is None else fan_out
            if ok:
                extend([*order, k], s, used | {k})

    extend([], None, frozenset())
    return found


def _chain_spec(params: Mapping, layers: list) -> dict:
    specs: dict[str, dict] = {}
    cur, cur_size, prev = None, None, "the inputs"
    for i, (path, kind, node) in enumerate(layers):
        if kind == "embed":
            if i > 0:
                raise _ChainError(
                    f"Embed layer {path} is not the first layer (after {prev}); if the dict "
                    f"order is not the call order, pass order=[...]"
                )
            specs[path] = {"embedding": (None, path)}
            cur, cur_size = path, _shape(node["embedding"])[1]
        elif kind == "norm":
            for k, v in node.items():
                if cur_size is not None and _shape(v)[0] != cur_size:
                    raise _ChainError(
                        f"{path}/{k} has size {_shape(v)[0]} but {prev} gives {cur_size} features"
                    )
            specs[path] = {k: (cur,) for k in node}
        else:
            kernels = (
                {"kernel": node["kernel"]}
                if kind in ("dense", "conv")
                else {
                    k: v["kernel"]
                    for k, v in node.items()
                    if isinstance(v, Mapping) and k.startswith("i")
                }
            )
            for k, kern in kernels.items():
                fan_in = _shape(kern)[-2]
                if cur_size is not None and fan_in != cur_size:
                    raise _ChainError(
                        f"layer {path} ({k}) reads {fan_in} features but {prev} gives "
                        f"{cur_size}: a reshape, flatten or skip connection between them cannot "
                        f"be inferred; pass the spec by hand (or order=[...] if the dict order "
                        f"is not the call order)"
                    )
            if kind in ("dense", "conv"):
                window = (None,) * (len(_shape(node["kernel"])) - 2)
                specs[path] = {"kernel": (*window, cur, path)}
                if "bias" in node:
                    specs[path]["bias"] = (path,)
                cur_size = _shape(node["kernel"])[-1]
            else:
                hidden = _shape(next(iter(kernels.values())))[-1]
                spec: dict[str, Any] = {}
                for k, v in node.items():
                    if _is_array(v):
                        if _shape(v) != (hidden,):
                            raise PermSpecError(
                                f"{path}/{k} has shape {_shape(v)}, not the hidden size "
                                f"({hidden},) of the recurrent cell"
                            )
                        spec[k] = (path,)
                        continue
                    first = cur if k.startswith("i") else path
                    spec[k] = {"kernel": (first, path)}
                    if "bias" in v:
                        spec[k]["bias"] = (path,)
                specs[path] = spec
                cur_size = hidden
            cur = path
        prev = f"layer {path}"

    # The network's output units are fixed: the last label becomes None.
    final = cur

    def relabel(labels: tuple) -> tuple:
        return tuple(None if lab == final else lab for lab in labels)

    def nest(node: Mapping, prefix: str) -> dict:
        out = {}
        for name, child in node.items():
            path = f"{prefix}/{name}" if prefix else str(name)
            if path in specs:
                out[name] = _map_spec(specs[path], relabel)
            else:
                out[name] = nest(child, path)
        return out

    return nest(params, "")


def _map_spec(spec: dict, fn) -> dict:
    return {k: _map_spec(v, fn) if isinstance(v, dict) else fn(v) for k, v in spec.items()}
