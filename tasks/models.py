"""Flax linen models of the paper's four tasks.

Parameter names follow Flax's automatic naming (``Dense_0``, ``Conv_1``...), so that
:func:`learned_opt.infer_perm_spec` can read the models like any user's Flax model, and the
hand-written specs in :mod:`tasks.registry` name the same leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Output layers start small so that the initial loss is close to log(number of classes).
small_init = nn.initializers.variance_scaling(0.01, "fan_in", "truncated_normal")


def identity_init(key, shape, dtype=jnp.float32):
    """Identity matrix (for the recurrent kernel of the RNN task); ``key`` is unused."""
    del key
    return jnp.eye(*shape, dtype=dtype)


# ----------------------------------------------------------------------------- matmuls
# ``matmul_impl`` of the models: "vjp" (default) computes x @ w with the custom backward below,
# "flax" with flax's nn.Dense / plain ``@`` and JAX's own transpose rules (the previous path;
# same parameters, same values to float rounding, tests/test_tasks.py).
MATMUL_IMPLS = ("vjp", "flax")


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` (x: (..., k), w: (k, n)) whose backward is two plain row-major matmuls:
    ``dx = g @ w.T`` and ``dw = x2.T @ g2`` with x, g flattened to (tokens, features).

    The values are JAX's transpose rules' (the same products and sums); what changes is the
    layout XLA gets. For the RNN task's output layer under the population vmap, JAX's rules let
    XLA's CPU backend pick a weight-gradient dot that first transposes the (tokens x 256)
    output gradient and runs 3x slower than the forward product; with this one the task's
    forward + backward took 0.67x the time (``scripts/bench_tasks.py --compare-matmul``).
    """
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    dx = g @ w.T
    dw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check_matmul_impl(impl: str) -> None:
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul_impl must be one of {MATMUL_IMPLS}, got {impl!r}")


class Dense(nn.Module):
    """``nn.Dense`` computed with :func:`matmul`: same parameter names (``kernel``, ``bias``),
    shapes, initialisers and automatic name (``Dense_i``), so parameters are interchangeable."""

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = matmul(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return y


def dense(matmul_impl: str, features: int, **kwargs) -> nn.Module:
    """This module's :class:`Dense` (``"vjp"``) or ``flax.linen.Dense`` (``"flax"``)."""
    _check_matmul_impl(matmul_impl)
    return (Dense if matmul_impl == "vjp" else nn.Dense)(features, **kwargs)


class MLP(nn.Module):
    """Flatten, ReLU hidden layers, linear output.

    >>> import jax
    >>> params = MLP((32,), 10).init(jax.random.key(0), jnp.zeros((1, 8, 8)))["params"]
    >>> params["Dense_0"]["kernel"].shape
    (64, 32)
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    matmul_impl: str = "vjp"  # MATMUL_IMPLS; same parameters

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(dense(self.matmul_impl, width)(x))
        return dense(self.matmul_impl, self.num_classes, kernel_init=small_init)(x)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA/Flax "SAME" padding (low, high) of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Im2colConv(nn.Module):
    """A 2-D "SAME" convolution computed as patches @ kernel (faster than XLA's CPU convolution
    inside scans and vmaps). Parameters are exactly ``nn.Conv``'s: ``kernel`` (kh, kw, c_in,
    c_out) with the same initialiser, and ``bias`` (c_out,).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    matmul_impl: str = "vjp"  # MATMUL_IMPLS: the patches @ kernel product

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        sh, sw = self.strides
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        h, w = x.shape[-3], x.shape[-2]
        ph, pw = same_padding(h, kh, sh), same_padding(w, kw, sw)
        xp = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [ph, pw, (0, 0)])
        oh, ow = -(-h // sh), -(-w // sw)
        # Patch order (di, dj, c) matches the kernel's (kh, kw, c_in) layout. Concatenating
        # along channels measured 1.7x faster than stacking a new axis and reshaping.
        patches = jnp.concatenate(
            [
                xp[..., di : di + sh * (oh - 1) + 1 : sh, dj : dj + sw * (ow - 1) + 1 : sw, :]
                for di in range(kh)
                for dj in range(kw)
            ],
            axis=-1,
        )
        _check_matmul_impl(self.matmul_impl)
        mm = matmul if self.matmul_impl == "vjp" else jnp.matmul
        return mm(patches, kernel.reshape(-1, self.features)) + bias


class CNN(nn.Module):
    """3x3 convolutions (the first with stride 2), ReLU, global average pool, linear output."""

    channels: Sequence[int]
    strides: Sequence[int]
    num_classes: int
    conv_impl: str = "im2col"  # "im2col" or "lax" (flax nn.Conv); same parameters
    matmul_impl: str = "vjp"  # MATMUL_IMPLS (im2col products and output layer); same parameters

    @nn.compact
    def __call__(self, x):
        for i, (c, s) in enumerate(zip(self.channels, self.strides, strict=True)):
            name = f"Conv_{i}"
            if self.conv_impl == "im2col":
                conv = Im2colConv(c, (3, 3), (s, s), self.matmul_impl, name=name)
            elif self.conv_impl == "lax":
                conv = nn.Conv(c, (3, 3), (s, s), padding="SAME", name=name)
            else:
                raise ValueError(f"conv_impl must be 'im2col' or 'lax', got {self.conv_impl!r}")
            x = nn.relu(conv(x))
        x = x.mean(axis=(-3, -2))
        return dense(self.matmul_impl, self.num_classes, kernel_init=small_init)(x)


class ReLURNN(nn.Module):
    """One ReLU recurrent layer with a learned initial state, over (batch, time, features).

    Parameters mirror ``flax.linen.SimpleCell``: ``i`` (input kernel and bias), ``h``
    (recurrent kernel, initialised to the identity), plus ``initial_state``.
    """

    hidden: int
    matmul_impl: str = "vjp"  # MATMUL_IMPLS of the input projection

    @nn.compact
    def __call__(self, xs):
        inputs = dense(self.matmul_impl, self.hidden, name="i")(xs)  # all time steps at once
        recurrent = nn.Dense(
            self.hidden, use_bias=False, kernel_init=identity_init, name="h"
        )
        h = self.param("initial_state", nn.initializers.zeros_init(), (self.hidden,))
        h = jnp.broadcast_to(h, xs.shape[:-2] + (self.hidden,))
        outputs = []
        for t in range(xs.shape[-2]):  # short sequences: unrolled
            h = nn.relu(inputs[..., t, :] + recurrent(h))
            outputs.append(h)
        return jnp.stack(outputs, axis=-2)


class RNNLM(nn.Module):
    """Byte-level language model: embedding, ReLU RNN, linear output to the vocabulary."""

    vocab_size: int
    embed_dim: int
    hidden: int
    matmul_impl: str = "vjp"  # MATMUL_IMPLS (input projection and output layer); same parameters

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        x = ReLURNN(self.hidden, self.matmul_impl, name="RNN_0")(x)
        return dense(self.matmul_impl, self.vocab_size, kernel_init=small_init)(x)


# Flax recurrent cells a CellLM can use: gated cells, each gate its own Dense.
CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}


class CellLM(nn.Module):
    """Byte-level language model: embedding, one layer of a Flax cell (``CELLS``), output layer."""

    vocab_size: int = 256
    embed_dim: int = 32
    hidden: int = 64
    cell: str = "gru"

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        x = nn.RNN(CELLS[self.cell](self.hidden))(x)
        return nn.Dense(self.vocab_size)(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)) (causal), then x + MLP(LN(x)) with GELU."""

    num_heads: int
    mlp_dim: int
    matmul_impl: str = "vjp"  # MATMUL_IMPLS of the MLP

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        y = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(y, mask=mask)
        y = nn.LayerNorm(name="ln_mlp")(x)
        mm = self.matmul_impl
        y = dense(mm, width, name="mlp_out")(nn.gelu(dense(mm, self.mlp_dim, name="mlp_in")(y)))
        return x + y


class TransformerLM(nn.Module):
    """Causal Transformer language model without positional embedding (as in the paper)."""

    vocab_size: int
    width: int
    num_heads: int
    mlp_dim: int
    num_blocks: int
    matmul_impl: str = "vjp"  # MATMUL_IMPLS (MLPs and output layer); same parameters

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_blocks):
            x = TransformerBlock(self.num_heads, self.mlp_dim, self.matmul_impl,
                                 name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_final")(x)
        return dense(self.matmul_impl, self.vocab_size, kernel_init=small_init,
                     name="unembed")(x)
