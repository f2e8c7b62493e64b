"""The permutation specs of the paper authors' public learned-optimizer code, which reproduce the
paper's optimizer-network sizes (issue 12, item 13).

Source: github.com/google/learned_optimization,
``learned_optimization/research/univ_nfn/learned_opt/learned_opts.py`` (``make_hk_perm_spec``,
``make_hk_cnn_perm_spec``, ``make_hk_irnn_perm_spec``, ``make_hk_transformer_perm_spec``; the
paper's optimizer is ``ResidualOptNFN(hybrid=True)``: three per-parameter Dense layers, then one
``NFLinear`` to 1 channel, the ``f`` of :func:`learned_opt.learned_optimizer`'s ``unf``). Those
specs are written for the authors' Haiku weight spaces, with integer labels on every axis, all
of them permuted (no fixed axes). Two consequences:

* The CNN spec labels conv ``i``'s kernel as ``(-i, -(L + i), i, i + 1)`` with ``L`` the number
  of top-level modules, so the first kernel's height gets label ``-0 = 0``, the label of the
  image channels: with 3x3 kernels on RGB images both axes have size 3 and are permuted
  together. That collision is what gives 7,369 (without it: 5,513).
* The RNN and Transformer figures need the authors' leaves: the IRNN has a bias on its
  recurrent matrix and a ``(1, hidden)`` initial state; the Transformer has 2-D attention
  kernels (heads x head dims merged), and its spec shares one label between attention and MLP
  hidden units and gives each block's residual stream its own label. :func:`weight_space` gives
  those weight spaces (shapes only); the same spec on this project's ``rnn_lm`` leaves gives
  6,954, and the Transformer spec has no counterpart for its per-head 3-D kernels.

The specs are over-symmetric (they permute axes that no symmetry permutes, such as kernel
offsets and vocabularies). For the CNN, the MLP and the RNN every true label keeps a label of its
own, so the group contains the true one and an optimizer built on them is still equivariant to
the task's symmetries (tested for the CNN); the Transformer spec is not a symmetry of its network.

Example:
  >>> import learned_opt
  >>> params, spec = weight_space("cnn")
  >>> learned_opt.learned_optimizer("unf", params, spec).num_meta_params()
  7369
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The paper's meta-parameter counts of the UNF optimizer, per weight space of :func:`weight_space`.
PAPER_COUNTS = {"mlp": 3783, "cnn": 7369, "rnn": 8043, "transformer": 64168}


def mlp_spec(num_layers: int) -> dict:
    """``make_hk_perm_spec`` on this project's MLP leaves (``Dense_i``): layer ``i`` maps label
    ``i`` to ``i + 1`` (pixels 0, classes ``num_layers``)."""
    return {f"Dense_{i}": {"kernel": (i, i + 1), "bias": (i + 1,)} for i in range(num_layers)}


def cnn_spec(num_conv: int) -> dict:
    """``make_hk_cnn_perm_spec`` on this project's CNN leaves (``Conv_i``, ``Dense_0``, no
    LayerNorm): channels after conv ``i`` are ``i + 1`` (image channels 0), conv ``i``'s kernel
    height ``-i`` and width ``-(L + i)`` with ``L = num_conv + 1`` modules, classes
    ``num_conv + 1``. Conv 0's height shares label 0 with the image channels."""
    n_modules = num_conv + 1
    spec = {f"Conv_{i}": {"kernel": (-i, -(n_modules + i), i, i + 1), "bias": (i + 1,)}
            for i in range(num_conv)}
    spec["Dense_0"] = {"kernel": (num_conv, num_conv + 1), "bias": (num_conv + 1,)}
    return spec


def rnn_lm_spec() -> dict:
    """``make_hk_irnn_perm_spec`` on this project's ``rnn_lm`` leaves: vocabulary -1 (input and
    output tied), embedding features 0, hidden units 1. This weight space has no recurrent bias
    and a 1-D initial state, so its count is not the paper's (6,954 against 8,043)."""
    return {
        "Embed_0": {"embedding": (-1, 0)},
        "RNN_0": {"i": {"kernel": (0, 1), "bias": (1,)}, "h": {"kernel": (1, 1)},
                  "initial_state": (1,)},
        "Dense_0": {"kernel": (1, -1), "bias": (-1,)},
    }


def for_task(task) -> dict:
    """The authors' spec for one of this project's tasks (``tasks.get_task(...)``): pass it as
    ``perm_spec`` to :func:`learned_opt.learned_optimizer` instead of ``task.perm_spec``."""
    from tasks.registry import CNNConfig, MLPConfig, RNNLMConfig

    config = task.config
    if isinstance(config, MLPConfig):
        return mlp_spec(len(config.hidden_sizes) + 1)
    if isinstance(config, CNNConfig):
        return cnn_spec(len(config.channels))
    if isinstance(config, RNNLMConfig):
        return rnn_lm_spec()
    raise ValueError(
        f"task {task.name!r}: the authors' spec has no counterpart for its weight space (their "
        "Transformer has 2-D attention kernels, this one per-head 3-D ones); "
        "learned_opt.testing.authors_specs.weight_space('transformer') gives theirs")


def _shapes(spec: dict, sizes: dict) -> dict:
    return jax.tree.map(lambda labels: jax.ShapeDtypeStruct(tuple(sizes[x] for x in labels),
                                                            jnp.float32),
                        spec, is_leaf=lambda x: isinstance(x, tuple))


def weight_space(name: str) -> tuple[dict, dict]:
    """(parameter shapes, spec) of the authors' weight space ``name`` (``"mlp"``, ``"cnn"``,
    ``"rnn"`` or ``"transformer"``), with their Haiku leaf names. Sizes do not change the count
    (every axis is labelled); they are the authors' where their code names them (IRNN 128 /
    embedding 64 on bytes; Transformer width 32, hidden 128, vocabulary 32,100), else this
    project's (MLP 64-32-10, CNN 16 and 32 channels)."""
    if name == "mlp":
        spec = {f"mlp/~/linear_{i}": {"w": (i, i + 1), "b": (i + 1,)} for i in range(2)}
        return _shapes(spec, {0: 64, 1: 32, 2: 10}), spec
    if name == "cnn":
        spec = {"conv2_d": {"w": (0, -3, 0, 1), "b": (1,)},
                "conv2_d_1": {"w": (-1, -4, 1, 2), "b": (2,)},
                "linear": {"w": (2, 3), "b": (3,)}}
        return _shapes(spec, {0: 3, -3: 3, 1: 16, -1: 3, -4: 3, 2: 32, 3: 10}), spec
    if name == "rnn":
        spec = {"embed": {"embeddings": (-1, 0)},
                "irnn/linear": {"b": (1,), "w": (0, 1)},
                "irnn/linear_1": {"b": (1,), "w": (1, 1)},
                "linear": {"b": (-1,), "w": (1, -1)},
                "~": {"initial_state_0": (-2, 1)}}
        return _shapes(spec, {-2: 1, -1: 256, 0: 64, 1: 128}), spec
    if name == "transformer":
        # -1, -2: vocabulary; 0, 2, 4: the residual stream before block 0, 1 and the end;
        # 1, 3: attention and MLP hidden units of block 0, 1.
        spec = {"transformer/embed": {"embeddings": (-1, 0)}}
        for block, (res, hid, nxt) in enumerate(((0, 1, 2), (2, 3, 4))):
            h = f"transformer/h{block}"
            for proj in ("key", "query", "value"):
                spec[f"{h}_attn/{proj}"] = {"b": (hid,), "w": (res, hid)}
            spec[f"{h}_attn/linear"] = {"b": (res,), "w": (hid, res)}
            spec[f"{h}_ln_1"] = {"offset": (res,), "scale": (res,)}
            spec[f"{h}_ln_2"] = {"offset": (res,), "scale": (res,)}
            spec[f"{h}_mlp/linear"] = {"b": (hid,), "w": (res, hid)}
            spec[f"{h}_mlp/linear_1"] = {"b": (nxt,), "w": (hid, nxt)}
        spec["transformer/h_f"] = {"offset": (4,), "scale": (4,)}
        spec["transformer/linear"] = {"b": (-2,), "w": (4, -2)}
        return _shapes(spec, {-1: 32100, -2: 32100, 0: 32, 1: 128, 2: 32, 3: 128, 4: 32}), spec
    raise ValueError(f"unknown weight space {name!r}; choose one of {sorted(PAPER_COUNTS)}")
