"""Tasks: real offline data, initial losses near log(classes), SGD lowers the loss."""

import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from learned_opt.spec import PermSpecError
from tasks import data as datasets

DATA_DIR = os.environ.get("LOPT_DATA_DIR", "/work/shared/data")
# Every registered task has a tiny variant for tests (checked in test_tasks.py).
TINY = [name for name in tasks.list_tasks() if name.endswith("_tiny")]


def get(name, **kw):
    return tasks.get_task(name, data_dir=DATA_DIR, **kw)


def test_registry_lists_the_four_tasks_and_tiny_variants():
    names = tasks.list_tasks()
    for base in ["mlp_fmnist", "cnn_cifar10", "rnn_lm", "transformer_lm"]:
        assert base in names and base + "_tiny" in names
    with pytest.raises(KeyError, match="unknown task 'nope'.*mlp_fmnist"):
        tasks.get_task("nope")
    with pytest.raises(TypeError, match="no config field.*widht"):
        get("mlp_fmnist_tiny", widht=3)


def test_fashion_mnist_offline_loader_reads_the_real_files():
    data = datasets.load_fashion_mnist(DATA_DIR)
    train, test = data["train"], data["test"]
    assert train["inputs"].shape == (60000, 8, 8) and test["inputs"].shape == (10000, 8, 8)
    assert int(train["labels"][0]) == 9
    np.testing.assert_array_equal(np.bincount(train["labels"]), np.full(10, 6000))
    # Block means of pixels / 255 are in [0, 1] and images are not blank.
    pixels = train["inputs"][:100] * datasets.FMNIST_8X8_SCALE
    assert pixels.max() <= 1.0 and pixels.mean() > 0.1
    # The 28x28 files' pixels, whose padded 4x4 block sums are the 8x8 inputs.
    full = datasets.load_fashion_mnist(DATA_DIR, resolution=28)
    assert full["test"]["inputs"].shape == (10000, 28, 28)
    np.testing.assert_array_equal(full["train"]["labels"], train["labels"])
    np.testing.assert_array_equal(datasets.downsample_fmnist(full["train"]["inputs"][:50]),
                                  train["inputs"][:50])
    with pytest.raises(ValueError, match="resolution=16.*choose from"):
        datasets.load_fashion_mnist(DATA_DIR, resolution=16)
    # The MLP task at 28x28: 784 inputs of pixels / 255, the same labels.
    task = get("mlp_fmnist", hidden_sizes=(4,), resolution=28)
    assert task.init(jax.random.key(0))["Dense_0"]["kernel"].shape == (784, 4)
    assert task.input_scale == pytest.approx(1 / 255) and "28x28" in task.config.data_source


def test_downsample_is_the_area_average_of_the_padded_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    padded = np.pad(img.astype(float), ((0, 0), (2, 2), (2, 2)))
    expected = np.array([[[padded[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean() / 255
                           for j in range(8)] for i in range(8)] for n in range(2)])
    got = datasets.downsample_fmnist(img) * datasets.FMNIST_8X8_SCALE
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_damaged_data_files_are_named(tmp_path):
    import gzip

    from tasks import data as datasets

    fm = tmp_path / "fashion_mnist"
    fm.mkdir()
    header = np.array([2051, 3, 28, 28], ">i4").tobytes()
    files = {
        "train-images-idx3-ubyte.gz":  # truncated: EOFError inside gzip
            gzip.compress(header + bytes(3 * 28 * 28))[:-12],
        "train-labels-idx1-ubyte.gz": gzip.compress(np.array([2049, 3], ">i4").tobytes()
                                                    + bytes(3)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(b"not an IDX file at all"),
        "t10k-labels-idx1-ubyte.gz": b"",
    }
    for name, raw in files.items():
        (fm / name).write_bytes(raw)
    with pytest.raises(tasks.DataFileError, match="train-images-idx3-ubyte.gz cannot be read"):
        datasets.load_fashion_mnist(tmp_path)
    (fm / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(3 * 28 * 28)))
    with pytest.raises(tasks.DataFileError, match="t10k-images-idx3-ubyte.gz.*magic number"):
        datasets.load_fashion_mnist(tmp_path)
    (tmp_path / "cifar10").mkdir()
    (tmp_path / datasets.CIFAR10_FILE).write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(tasks.DataFileError, match="cifar10_16x16.npz cannot be read"):
        datasets.load_cifar10(tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / datasets.TEXT_FILE).write_bytes(b"to be")
    with pytest.raises(tasks.DataFileError, match="tiny_shakespeare.txt holds only 5 bytes"):
        datasets.load_text(tmp_path)
    # Through the task registry the error is the data's, not the task arguments'.
    with pytest.raises(tasks.DataFileError, match="tiny_shakespeare.txt"):
        tasks.get_task("rnn_lm_tiny", data_dir=tmp_path)


def test_missing_data_error_is_fast_and_says_what_to_do(tmp_path):
    start = time.perf_counter()
    with pytest.raises(tasks.DataNotFoundError, match="train-images-idx3-ubyte.gz.*LOPT_DATA_DIR"):
        tasks.get_task("mlp_fmnist_tiny", data_dir=tmp_path)
    assert time.perf_counter() - start < 5


def test_every_task_has_a_tiny_variant():
    family = tasks.family.FAMILY  # already small: meta-training's task family
    full = [name for name in tasks.list_tasks()
            if not name.endswith("_tiny") and name not in family]
    assert sorted(f"{name}_tiny" for name in full) == sorted(TINY)


@pytest.mark.parametrize("name", TINY)
def test_initial_loss_near_log_classes_and_sgd_lowers_it(name):
    task = get(name)
    num_classes = getattr(task.config, "num_classes", None) or task.config.vocab_size
    params = task.init(jax.random.key(0))
    batches = [task.sample_batch(jax.random.key(i)) for i in range(4)]
    batch = jax.tree.map(lambda *x: jnp.concatenate(x), *batches)
    loss = jax.jit(task.loss)  # eager Flax dispatches (and compiles) op by op: slower
    loss0 = float(loss(params, batch))
    assert abs(loss0 - math.log(num_classes)) < 0.02 * math.log(num_classes)

    @jax.jit
    def sgd_steps(params):
        def step(p, _):
            g = jax.grad(task.loss)(p, batch)
            return jax.tree.map(lambda a, b: a - 1.0 * b, p, g), None

        return jax.lax.scan(step, params, None, length=25)[0]

    assert float(loss(sgd_steps(params), batch)) < loss0 - 0.05


def test_sample_batch_is_pure_and_vmappable():
    task = get("mlp_fmnist_tiny")
    keys = jax.random.split(jax.random.key(0), 3)
    batches = jax.jit(jax.vmap(task.sample_batch))(keys)
    assert batches["inputs"].shape == (3, 16, 8, 8) and batches["labels"].shape == (3, 16)
    again = task.sample_batch(keys[1])
    np.testing.assert_array_equal(batches["inputs"][1], again["inputs"])
    assert not np.array_equal(batches["labels"][0], batches["labels"][1])
    # Passing the data explicitly gives the same batch (no constants embedded in the program).
    explicit = jax.jit(lambda k, d: task.sample_batch(k, data=d))(keys[1], task.data)
    np.testing.assert_array_equal(explicit["labels"], again["labels"])


def test_evaluate_matches_a_direct_computation():
    task = get("mlp_fmnist_tiny")
    task.eval_chunk = 300  # exercise the chunked path and the remainder
    params = task.init(jax.random.key(0))
    metrics = task.evaluate(params, "test", max_examples=1000)
    test = task.data["test"]
    logits = task.apply(params, task.prepare_inputs(test["inputs"][:1000]))
    labels = test["labels"][:1000]
    np.testing.assert_allclose(metrics["loss"], tasks.cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == labels).mean())


def test_im2col_convolution_equals_flax_conv():
    from tasks.models import Im2colConv

    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    for strides in [(1, 1), (2, 2)]:
        flax_conv = nn.Conv(5, (3, 3), strides, padding="SAME")
        params = flax_conv.init(jax.random.key(1), x)
        ours = Im2colConv(5, (3, 3), strides)
        assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
            jnp.shape, params
        )
        np.testing.assert_allclose(
            jax.jit(ours.apply)(params, x), jax.jit(flax_conv.apply)(params, x), atol=1e-5
        )


def test_from_flax_infers_and_checks_the_spec():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(2)])
    task = tasks.from_flax(model, tasks.cross_entropy, (x[:150], y[:150]),
                           dict(inputs=x[150:], labels=y[150:]), batch_size=32, name="xor")
    assert task.name == "xor" and task.config.num_train == 150
    assert task.perm_spec["layers_2"]["kernel"] == ("layers_0", "layers_2")
    params = task.init(jax.random.key(0))
    loss0 = task.evaluate(params)["loss"]

    def step(params, key):
        grads = jax.grad(task.loss)(params, task.sample_batch(key))
        return jax.tree.map(lambda p, g: p - 0.3 * g, params, grads), None

    params = jax.lax.scan(step, params, jax.random.split(jax.random.key(1), 50))[0]
    metrics = task.evaluate(params)
    assert metrics["loss"] < loss0 - 0.2 and metrics["accuracy"] > 0.8
    # A wrong spec given by the user is rejected.
    bad = {"layers_0": {"kernel": (None, "h"), "bias": ("h",)},
           "layers_2": {"kernel": (None, None), "bias": (None,)},
           "layers_4": {"kernel": (None, None), "bias": (None,)}}
    with pytest.raises(PermSpecError, match="label 'h'"):
        tasks.from_flax(model, tasks.cross_entropy, (x, y), (x, y), 32, perm_spec=bad)


class _NormMLP(nn.Module):
    norm: str = "layer"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x = nn.LayerNorm()(x) if self.norm == "layer" else nn.BatchNorm(False)(x)
        return nn.Dense(2)(nn.relu(x))


class _ResidualMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x = x + nn.Dense(16)(nn.relu(x))
        return nn.Dense(2)(x)


def test_from_flax_on_common_models():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    # Dense -> LayerNorm -> Dense: the jitted (sorted) tree chains two ways; Flax's call order
    # settles it, and the norm carries the hidden label.
    task = tasks.from_flax(_NormMLP(), tasks.cross_entropy, (x, y), (x, y), 8)
    assert task.perm_spec["LayerNorm_0"] == {"scale": ("Dense_0",), "bias": ("Dense_0",)}
    assert task.perm_spec["Dense_1"]["kernel"] == ("Dense_0", None)
    # BatchNorm's batch_stats: refused, naming the collection, the module and what to do.
    with pytest.raises(ValueError, match=r"\['batch_stats'\] \(modules \['BatchNorm_0'\]\).*"
                       "LayerNorm"):
        tasks.from_flax(_NormMLP("batch"), tasks.cross_entropy, (x, y), (x, y), 8)
    # A residual MLP: the inferred chain is not a symmetry and the error says what to write.
    with pytest.raises(PermSpecError, match="residual connections.*share one label"):
        tasks.from_flax(_ResidualMLP(), tasks.cross_entropy, (x, y), (x, y), 8)
    stream = {"Dense_0": {"kernel": (None, "r"), "bias": ("r",)},
              "Dense_1": {"kernel": ("r", "r"), "bias": ("r",)},
              "Dense_2": {"kernel": ("r", None), "bias": (None,)}}
    task = tasks.from_flax(_ResidualMLP(), tasks.cross_entropy, (x, y), (x, y), 8,
                           perm_spec=stream)
    assert task.perm_spec == stream


def test_missing_data_without_data_dir_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_network_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(tasks.DataNotFoundError, match="network is unreachable.*LOPT_DATA_DIR"):
        datasets._load_cifar10.__wrapped__(None)
    assert time.perf_counter() - start < 5


def test_tfds_online_path_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        fmnist = datasets._load_fashion_mnist.__wrapped__(None)
        cifar = datasets._load_cifar10.__wrapped__(None)
        text, source = datasets._load_text.__wrapped__(None)
    assert fmnist["train"]["inputs"].shape == (6, 8, 8)
    assert fmnist["train"]["inputs"].dtype == np.uint16
    assert cifar["test"]["inputs"].shape == (6, 16, 16, 3)
    assert cifar["test"]["inputs"].dtype == np.uint8
    assert text["train"].dtype == np.uint8 and text["train"].size > 6 and "lm1b" in source


def test_language_batches_are_teacher_forced_windows_of_the_corpus():
    task = get("rnn_lm_tiny")
    streams, source = datasets.load_text(DATA_DIR)
    raw = os.path.join(DATA_DIR, "text", "tiny_shakespeare.txt")
    with open(raw, "rb") as f:
        corpus = f.read()
    assert "tiny_shakespeare" in source and "tiny_shakespeare" in task.config.data_source
    assert bytes(streams["train"]) + bytes(streams["test"]) == corpus
    assert len(streams["test"]) == len(corpus) - int(len(corpus) * 0.9)
    batch = task.sample_batch(jax.random.key(0))
    inputs, labels = np.asarray(batch["inputs"]), np.asarray(batch["labels"])
    assert inputs.shape == labels.shape == (8, 8)
    np.testing.assert_array_equal(labels[:, :-1], inputs[:, 1:])
    for row_in, row_lab in zip(inputs, labels, strict=True):
        assert bytes(row_in.astype(np.uint8)) + bytes(row_lab[-1:].astype(np.uint8)) in corpus


@pytest.mark.parametrize("name", TINY)
def test_custom_vjp_matmuls_equal_the_flax_path(name):
    """matmul_impl="vjp" (the default, tasks.models.matmul) computes the same parameters, loss
    and gradients as "flax" (nn.Dense and JAX's transpose rules), also vmapped over members."""
    import copy
    import dataclasses

    task = get(name)
    old = copy.copy(task)
    old.model = dataclasses.replace(task.model, matmul_impl="flax")
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(task.init)(keys)
    assert jax.tree.structure(old.model.init(keys[0], task.dummy_inputs())["params"]) == \
        jax.tree.structure(task.model.init(keys[0], task.dummy_inputs())["params"])
    batch = jax.vmap(lambda k: task.sample_batch(k))(keys)
    grad = lambda t: jax.jit(jax.vmap(jax.value_and_grad(t.loss)))(params, batch)  # noqa: E731
    (l_old, g_old), (l_new, g_new) = grad(old), grad(task)
    np.testing.assert_allclose(l_new, l_old, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_matmul_gradient_is_the_plain_one():
    from tasks.models import matmul

    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (2, 4, 6))
    f = lambda mm: jax.vmap(jax.grad(lambda x, w: jnp.sin(mm(x, w)).sum(), (0, 1)))  # noqa: E731
    for a, b in zip(f(matmul)(x, w), f(jnp.matmul)(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
