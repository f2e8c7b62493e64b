"""meta_train.benchmarks: the jaxpr FLOP counter and the hand-designed-rule adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_train.benchmarks import PlainUpdate, flops_and_bytes, matmul_flops


def test_matmul_flops_counts_products_convolutions_and_scan_bodies():
    a, b = jnp.ones((4, 3)), jnp.ones((3, 5))
    assert matmul_flops(jax.make_jaxpr(jnp.matmul)(a, b).jaxpr) == 2 * 4 * 5 * 3
    # A batched product: 2 x 4 x 5 outputs, each a sum over 3.
    batched = jax.make_jaxpr(lambda x, y: jnp.einsum("bij,bjk->bik", x, y))(
        jnp.ones((2, 4, 3)), jnp.ones((2, 3, 5)))
    assert matmul_flops(batched.jaxpr) == 2 * (2 * 4 * 5) * 3
    # Convolution NCHW/OIHW: 1 x 8 x 6 x 6 outputs, each a sum over 3 channels x 3 x 3 taps.
    conv = jax.make_jaxpr(lambda x, k: jax.lax.conv(x, k, (1, 1), "VALID"))(
        jnp.ones((1, 3, 8, 8)), jnp.ones((8, 3, 3, 3)))
    assert matmul_flops(conv.jaxpr) == 2 * (8 * 6 * 6) * (3 * 3 * 3)
    # A scan body counts once per step, also inside jit.
    scanned = jax.make_jaxpr(jax.jit(lambda a, b: jax.lax.scan(
        lambda c, _: (c, a @ b), 0.0, None, length=7)[1]))(a, b)
    assert matmul_flops(scanned.jaxpr) == 7 * 2 * 4 * 5 * 3
    assert matmul_flops(jax.make_jaxpr(jnp.sin)(a).jaxpr) == 0  # elementwise: not counted


def test_flops_and_bytes_reads_the_jaxpr_and_xla():
    flops, nbytes = flops_and_bytes(jnp.matmul, jnp.ones((4, 3)), jnp.ones((3, 5)))
    assert flops == 120 and nbytes > 0


def test_plain_update_is_the_optax_rule_behind_the_learned_optimizer_interface():
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.ones(3)}
    rule = PlainUpdate(optax.adam(0.1))
    state = rule.init_state("ignored meta-parameters", params)
    updates, state = rule.update(None, state, grads, params, num_steps=10)
    want, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params), params)
    np.testing.assert_allclose(updates["w"], want["w"])
