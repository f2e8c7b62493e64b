"""Datasets for the paper's tasks: offline files first, tensorflow-datasets as the online path.

Offline layout (the directory given as ``data_dir`` or by the environment variable
``LOPT_DATA_DIR``)::

    fashion_mnist/train-images-idx3-ubyte.gz   (and the three other IDX .gz files)
    cifar10/cifar10_16x16.npz                  (x_train, y_train, x_test, y_test; uint8)
    text/tiny_shakespeare.txt                  (the offline language corpus, read as bytes)

Without a data directory the loaders use tensorflow-datasets (``fashion_mnist``, ``cifar10``,
``lm1b``). They never let tfds retry downloads for minutes: an already prepared dataset is read
with ``download=False``; otherwise the network is probed for a few seconds and, if it is
unreachable, :class:`DataNotFoundError` says how to get the data.

Loaded arrays are cached per (dataset, data directory) for the life of the process, so building
several tasks does not reload or copy the data.

Example:
  >>> data = load_fashion_mnist()   # from $LOPT_DATA_DIR if set, else tensorflow-datasets
  >>> data["train"]["inputs"].shape, data["train"]["inputs"].dtype
  ((60000, 8, 8), dtype('uint16'))
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import socket
import zipfile
from pathlib import Path

import numpy as np

from learned_opt.extras import import_optional

ENV_VAR = "LOPT_DATA_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_FILE = "cifar10/cifar10_16x16.npz"
TEXT_FILE = "text/tiny_shakespeare.txt"
# The 8x8 Fashion-MNIST images are stored as sums of 4x4 pixel blocks (exact in uint16); the
# sampler multiplies by this to get the block mean of pixels / 255.
FMNIST_8X8_SCALE = 1.0 / (16 * 255)
FMNIST_RESOLUTIONS = (8, 28)  # 8: 4x4 block sums of the zero-padded image; 28: the files' pixels
TEST_FRACTION = 0.1  # last 10% of a text corpus is its test split
LM1B_MAX_BYTES = 1 << 24  # online lm1b: the first 16 MiB of sentences of each split


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither in the data directory nor available through tensorflow-datasets."""


class DataFileError(DataNotFoundError):
    """A data file is there but cannot be read (truncated, damaged or of another format)."""


@contextlib.contextmanager
def _reading(path: Path):
    """Turn any failure to parse ``path`` into a :class:`DataFileError` naming it."""
    try:
        yield
    except DataFileError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataFileError(
            f"data file {path} cannot be read ({type(e).__name__}: {e}); it is damaged or "
            "incomplete: replace it with a fresh copy (sources in the data directory's README, "
            f"layout in tasks/data.py), or unset ${ENV_VAR} to use tensorflow-datasets") from e


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$LOPT_DATA_DIR`` if set, else None (tfds, online)."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    return None if data_dir is None else Path(data_dir).expanduser().resolve()


def _missing_files_error(what: str, data_dir: Path, missing: list[Path]) -> DataNotFoundError:
    return DataNotFoundError(
        f"{what}: data directory {data_dir} lacks {[str(m) for m in missing]}. Put the files "
        f"there in the offline layout (see tasks/data.py or docs/tasks.md), point data_dir / "
        f"${ENV_VAR} at a directory that has them, or pass data_dir=None with {ENV_VAR} unset "
        f"to use tensorflow-datasets online."
    )


def _network_reachable(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _tfds_source(name: str, split: str):
    """Random-access tfds source; fails within seconds (never a minutes-long retry loop)."""
    try:
        tfds = import_optional("tensorflow_datasets", "tasks")
    except ImportError as e:
        raise DataNotFoundError(f"cannot load {name} without {ENV_VAR} (offline files): {e}") from e
    how = (
        f"Either set {ENV_VAR} (or pass data_dir=) to a directory in the offline layout "
        f"(fashion_mnist/*.gz IDX files, {CIFAR10_FILE}, {TEXT_FILE}; see docs/tasks.md), or "
        f"prepare the tfds dataset on a machine with network access: "
        f"python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
        f"download=True)\" (preparing needs TensorFlow installed)."
    )
    try:
        return tfds.data_source(name, split=split, download=False)
    except Exception as first_error:  # DatasetNotFoundError, or a missing reader
        if not _network_reachable():
            raise DataNotFoundError(
                f"dataset '{name}' not found: no data directory given, tfds has not prepared "
                f"it, and the network is unreachable. {how}"
            ) from first_error
    try:
        return tfds.data_source(name, split=split, download=True)
    except Exception as e:
        raise DataNotFoundError(f"tfds could not provide '{name}': {e}. {how}") from e


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with _reading(path):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        header = np.frombuffer(raw, dtype=">i4", count=1)
        if header[0] != magic:
            raise ValueError(f"IDX magic number {header[0]} != expected {magic}")
        ndim = magic & 0xFF
        shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != np.prod(shape):
            raise ValueError(f"{data.size} bytes of data for shape {shape}")
        return data.reshape(shape)


def downsample_fmnist(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> 8x8 block sums (uint16): zero-pad to 32x32, sum 4x4 blocks.

    Multiplying by ``FMNIST_8X8_SCALE`` gives the 4x4 area average of pixels / 255 (exact).
    """
    x = np.pad(images.astype(np.uint16), ((0, 0), (2, 2), (2, 2)))
    return x.reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4), dtype=np.uint16)


@functools.cache
def _load_fashion_mnist(data_dir: Path | None, resolution: int = 8) -> dict:
    if resolution not in FMNIST_RESOLUTIONS:
        raise ValueError(f"Fashion-MNIST resolution={resolution!r}: choose from "
                         f"{FMNIST_RESOLUTIONS}")
    out = {}
    for split, (img_name, lab_name) in FASHION_MNIST_FILES.items():
        if data_dir is not None:
            paths = [data_dir / "fashion_mnist" / n for n in (img_name, lab_name)]
            missing = [p for p in paths if not p.exists()]
            if missing:
                raise _missing_files_error("Fashion-MNIST", data_dir, missing)
            images, labels = _read_idx(paths[0], 2051), _read_idx(paths[1], 2049)
            if len(images) != len(labels):
                raise DataFileError(f"{paths[0]} holds {len(images)} images but {paths[1]} "
                                    f"{len(labels)} labels: replace both with fresh copies")
        else:
            src = _tfds_source("fashion_mnist", split)
            items = [src[i] for i in range(len(src))]
            images = np.stack([np.asarray(ex["image"])[..., 0] for ex in items])
            labels = np.asarray([ex["label"] for ex in items])
        inputs = downsample_fmnist(images) if resolution == 8 else images
        out[split] = {"inputs": inputs, "labels": labels.astype(np.int32)}
    return out


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, resolution: int = 8) -> dict:
    """Fashion-MNIST: ``{split: {"inputs", "labels"}}``; at ``resolution=8`` (the tasks' size)
    the inputs are uint16 [N, 8, 8] block sums, at 28 the files' uint8 [N, 28, 28] pixels.

    Images are in the files' order (the first training label is 9, "ankle boot").
    """
    return _load_fashion_mnist(resolve_data_dir(data_dir), resolution)


@functools.cache
def _load_cifar10(data_dir: Path | None) -> dict:
    if data_dir is not None:
        path = data_dir / CIFAR10_FILE
        if not path.exists():
            raise _missing_files_error("CIFAR-10", data_dir, [path])
        with _reading(path), np.load(path) as z:
            raw = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in ("train", "test")}
    else:
        raw = {}
        for split in ("train", "test"):
            src = _tfds_source("cifar10", split)
            items = [src[i] for i in range(len(src))]
            x = np.stack([np.asarray(ex["image"]) for ex in items]).astype(np.float32)
            # 2x2 area average to 16x16, rounded to uint8 like the offline file.
            x = x.reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4))
            raw[split] = (np.round(x).astype(np.uint8), np.asarray([ex["label"] for ex in items]))
    out = {}
    for i, (split, (x, y)) in enumerate(raw.items()):
        # The offline file groups rows by class: a fixed shuffle makes "the first n test
        # examples" a fair evaluation subset.
        order = np.random.default_rng(i).permutation(len(y))
        out[split] = {"inputs": x[order], "labels": y[order].astype(np.int32)}
    return out


def load_cifar10(data_dir: str | os.PathLike | None = None) -> dict:
    """CIFAR-10 at 16x16: ``{split: {"inputs": uint8 [N, 16, 16, 3], "labels": int32 [N]}}``.

    Rows are shuffled with a fixed seed (the offline file is sorted by class).
    """
    return _load_cifar10(resolve_data_dir(data_dir))


@functools.cache
def _load_text(data_dir: Path | None) -> tuple[dict, str]:
    if data_dir is not None:
        path = data_dir / TEXT_FILE
        if not path.exists():
            raise _missing_files_error("text corpus", data_dir, [path])
        stream = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if len(stream) < 1000:  # far too short to hold a train and a test split of sequences
            raise DataFileError(f"data file {path} holds only {len(stream)} bytes: replace it "
                                "with a fresh copy")
        cut = int(len(stream) * (1 - TEST_FRACTION))
        return {"train": stream[:cut], "test": stream[cut:]}, f"tiny_shakespeare bytes ({path})"
    out = {}
    for split in ("train", "test"):
        src = _tfds_source("lm1b", split)
        chunks, total = [], 0
        for i in range(len(src)):
            text = src[i]["text"]
            chunk = (text if isinstance(text, bytes) else str(text).encode()) + b"\n"
            chunks.append(chunk)
            total += len(chunk)
            if total >= LM1B_MAX_BYTES:
                break
        out[split] = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return out, f"lm1b bytes (tfds, first {LM1B_MAX_BYTES} bytes of each split)"


def load_text(data_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """Byte streams ``{"train": uint8 [N], "test": uint8 [M]}`` and a description of the source.

    Offline: tiny_shakespeare, split deterministically (last 10% is the test split). Online:
    tfds ``lm1b`` sentences joined with newlines, as bytes.
    """
    return _load_text(resolve_data_dir(data_dir))
