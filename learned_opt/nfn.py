"""The NP layer of neural functionals (Zhou et al. 2023, "Permutation equivariant neural
functionals"), for MLP and CNN weight spaces: a baseline for ``UNFLinear``.

An MLP/CNN weight space is a chain of layers, each a kernel ``(n_in, n_out)`` (dense) or
``(kh, kw, n_in, n_out)`` (convolution) and an optional bias ``(n_out,)``. The NP setting
permutes *every* neuron layer independently, the input and output neurons included (a
stronger assumption than the network's true symmetry, which fixes them; the NP layer is
therefore also equivariant to the true one), and treats a convolution's kernel offsets as
channels. ``NFNLinear`` is the space of all linear maps equivariant to that group: it is
``UNFLinear`` on the chain's NP spec (neuron layer k labelled ``("nfn", k)``, kernel offsets
``None``), so its parameter count depends on the depth and the kernel sizes only.
``io_fixed=True`` keeps the input and output neurons fixed instead (the HNP setting; its
parameter count grows with the numbers of input and output neurons).

Any other weight space (a recurrent matrix, attention kernels, a leaf that is neither a
kernel nor a bias, layers that do not form one chain) raises ``PermSpecError`` naming the leaf.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = {"Dense_0": {"kernel": jnp.ones((4, 3, 1)), "bias": jnp.ones((3, 1))},
  ...      "Dense_1": {"kernel": jnp.ones((3, 2, 1)), "bias": jnp.ones((2, 1))}}
  >>> spec = {"Dense_0": {"kernel": (None, "h"), "bias": ("h",)},
  ...         "Dense_1": {"kernel": ("h", None), "bias": (None,)}}
  >>> layer = NFNLinear(features=8)
  >>> y = layer.apply(layer.init(jax.random.key(0), x, spec), x, spec)
  >>> y["Dense_0"]["kernel"].shape
  (4, 3, 8)
  >>> nfn_spec(x, spec)["Dense_1"]["kernel"]
  (('nfn', 1), ('nfn', 2))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from learned_opt.spec import PermSpecError, flatten_with_spec, label_sizes
from learned_opt.unf import UNFLinear

PyTree = Any


def nfn_spec(x: PyTree, spec: PyTree, trailing_axes: int = 1, io_fixed: bool = False) -> PyTree:
    """The NP spec of an MLP/CNN weight space, found from the chain that ``spec`` describes.

    Args:
      x: the weight space (arrays with ``trailing_axes`` channel axes).
      spec: its permutation spec: kernels ``(in, out)`` or ``(None, None, in, out)``, biases
        ``(out,)``, consecutive layers sharing the hidden labels.
      io_fixed: keep the chain's first input and last output neurons fixed (``None``).

    Raises:
      PermSpecError: naming the leaf, when the weight space is not such a chain.
    """
    label_sizes(x, spec, trailing_axes=trailing_axes)
    paths, _, labels = flatten_with_spec(x, spec)
    layers: dict[str, dict] = {}
    for path, labs in zip(paths, labels, strict=True):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        rank = len(labs)
        role = "kernel" if rank in (2, 4) else "bias" if rank == 1 else None
        if role is None:
            raise PermSpecError(
                f"NFNLinear supports MLP/CNN weight spaces only (chains of dense (in, out) or "
                f"conv (kh, kw, in, out) kernels with (out,) biases); leaf {path} has rank {rank}"
            )
        if rank == 4 and (labs[0] is not None or labs[1] is not None):
            raise PermSpecError(
                f"NFNLinear treats convolution kernel offsets as channels, but the spec labels "
                f"them at leaf {path}: {labs}; use None for the two spatial axes"
            )
        if role in layers.setdefault(parent, {}):
            raise PermSpecError(
                f"NFNLinear expects one kernel and at most one bias per layer; {parent or 'root'}"
                f" has a second {role} at leaf {path}"
            )
        layers[parent][role] = (path, labs)
    for layer in layers.values():
        if "kernel" not in layer:
            raise PermSpecError(f"NFNLinear: leaf {layer['bias'][0]} is a bias without a kernel")
        if "bias" in layer and layer["bias"][1][0] != layer["kernel"][1][-1]:
            raise PermSpecError(
                f"NFNLinear: bias {layer['bias'][0]} is labelled {layer['bias'][1]} but its "
                f"kernel's output axis is {layer['kernel'][1][-1]!r}"
            )
    chain = _chain(layers)
    depth = len(chain)
    neuron = [("nfn", k) for k in range(depth + 1)]
    if io_fixed:
        neuron[0] = neuron[-1] = None
    new_labels = {}
    for k, parent in enumerate(chain):
        path, labs = layers[parent]["kernel"]
        new_labels[path] = (None,) * (len(labs) - 2) + (neuron[k], neuron[k + 1])
        if "bias" in layers[parent]:
            new_labels[layers[parent]["bias"][0]] = (neuron[k + 1],)
    out = [new_labels[p] for p in paths]
    treedef = jax.tree_util.tree_structure(spec, is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree_util.tree_unflatten(treedef, out)


def _chain(layers: dict) -> list[str]:
    """Order the layers so that each kernel's input label is the previous one's output label."""
    kernels = {parent: layer["kernel"] for parent, layer in layers.items()}
    producers: dict = {}
    for parent, (path, labs) in kernels.items():
        out = labs[-1]
        if out is not None and out == labs[-2]:
            raise PermSpecError(
                f"NFNLinear: kernel {path} reads and writes the same label {out!r} (a recurrent "
                f"matrix); not an MLP/CNN chain"
            )
        if out in producers:
            raise PermSpecError(
                f"NFNLinear: label {out!r} is the output of two kernels "
                f"({kernels[producers[out]][0]} and {path}); not a chain"
            )
        if out is not None:
            producers[out] = parent
    # First layer: its input label is fixed (None) or produced by no other kernel.
    starts = [p for p, (_, lab) in kernels.items() if lab[-2] is None or lab[-2] not in producers]
    if len(starts) != 1:
        raise PermSpecError(
            f"NFNLinear: the layers do not form one chain (first layers: {sorted(starts)}); "
            f"every kernel's input label must be the previous kernel's output label"
        )
    chain = [starts[0]]
    while True:
        out = kernels[chain[-1]][1][-1]
        nxt = [p for p, (_, labs) in kernels.items() if out is not None and labs[-2] == out]
        if not nxt:
            break
        if len(nxt) > 1 or nxt[0] in chain:
            raise PermSpecError(
                f"NFNLinear: label {out!r} is read by {len(nxt)} kernels or loops back "
                f"(at {kernels[nxt[0]][0]}); not a chain"
            )
        chain.append(nxt[0])
    missing = sorted(set(kernels) - set(chain))
    if missing:
        raise PermSpecError(
            f"NFNLinear: kernel {kernels[missing[0]][0]} is not part of the layer chain"
        )
    return chain


class NFNLinear(nn.Module):
    """The NP neural-functional layer on an MLP/CNN weight space (same calling convention as
    ``UNFLinear``). Parameters live in the submodule ``np`` (a ``UNFLinear`` on the NP spec).

    Attributes:
      features: output channels of every leaf.
      io_fixed: keep input/output neurons fixed (HNP setting) instead of permuting them (NP).
    """

    features: int
    io_fixed: bool = False

    @nn.compact
    def __call__(self, x: PyTree, spec: PyTree) -> PyTree:
        np_spec = nfn_spec(x, spec, io_fixed=self.io_fixed)
        return UNFLinear(self.features, name="np")(x, np_spec)
