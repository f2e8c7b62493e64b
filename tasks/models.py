"""Flax linen models of the paper's four tasks.

Parameter names follow Flax's automatic naming (``Dense_0``, ``Conv_1``...), so that
:func:`learned_opt.infer_perm_spec` can read the models like any user's Flax model, and the
hand-written specs in :mod:`tasks.registry` name the same leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

# Output layers start small so that the initial loss is close to log(number of classes).
small_init = nn.initializers.variance_scaling(0.01, "fan_in", "truncated_normal")


def identity_init(key, shape, dtype=jnp.float32):
    """Identity matrix (for the recurrent kernel of the RNN task); ``key`` is unused."""
    del key
    return jnp.eye(*shape, dtype=dtype)


class MLP(nn.Module):
    """Flatten, ReLU hidden layers, linear output.

    >>> import jax
    >>> params = MLP((32,), 10).init(jax.random.key(0), jnp.zeros((1, 8, 8)))["params"]
    >>> params["Dense_0"]["kernel"].shape
    (64, 32)
    """

    hidden_sizes: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes, kernel_init=small_init)(x)


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
        return patches @ kernel.reshape(-1, self.features) + bias


class CNN(nn.Module):
    """3x3 convolutions (the first with stride 2), ReLU, global average pool, linear output."""

    channels: Sequence[int]
    strides: Sequence[int]
    num_classes: int
    conv_impl: str = "im2col"  # "im2col" or "lax" (flax nn.Conv); same parameters

    @nn.compact
    def __call__(self, x):
        for i, (c, s) in enumerate(zip(self.channels, self.strides, strict=True)):
            name = f"Conv_{i}"
            if self.conv_impl == "im2col":
                conv = Im2colConv(c, (3, 3), (s, s), name=name)
            elif self.conv_impl == "lax":
                conv = nn.Conv(c, (3, 3), (s, s), padding="SAME", name=name)
            else:
                raise ValueError(f"conv_impl must be 'im2col' or 'lax', got {self.conv_impl!r}")
            x = nn.relu(conv(x))
        x = x.mean(axis=(-3, -2))
        return nn.Dense(self.num_classes, kernel_init=small_init)(x)


class ReLURNN(nn.Module):
    """One ReLU recurrent layer with a learned initial state, over (batch, time, features).

    Parameters mirror ``flax.linen.SimpleCell``: ``i`` (input kernel and bias), ``h``
    (recurrent kernel, initialised to the identity), plus ``initial_state``.
    """

    hidden: int

    @nn.compact
    def __call__(self, xs):
        inputs = nn.Dense(self.hidden, name="i")(xs)  # all time steps at once
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

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        x = ReLURNN(self.hidden, name="RNN_0")(x)
        return nn.Dense(self.vocab_size, kernel_init=small_init)(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)) (causal), then x + MLP(LN(x)) with GELU."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        y = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(y, mask=mask)
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = nn.Dense(width, name="mlp_out")(nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y)))
        return x + y


class TransformerLM(nn.Module):
    """Causal Transformer language model without positional embedding (as in the paper)."""

    vocab_size: int
    width: int
    num_heads: int
    mlp_dim: int
    num_blocks: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_blocks):
            x = TransformerBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.vocab_size, kernel_init=small_init, name="unembed")(x)
