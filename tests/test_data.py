"""Tests of pycompress.data: file formats read back exactly, errors, MicroNet policy, loaders."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pycompress import data as D
from pycompress.data import augment as A
from pycompress.data import datasets as DS


def _pixels(ds, i):
    """Undo the normalization of ds[i] -> uint8 H x W x C numpy."""
    x, y = ds[i]
    return D.denormalize(x, ds.info.mean, ds.info.std).permute(1, 2, 0).numpy(), y


def _rng(seed=0):
    return np.random.RandomState(seed)


# --------------------------------------------------------------------------- IDX (MNIST family)


def _write_mnist_like(directory: Path, n_train=12, n_test=7, gz=True, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    r = _rng(seed)
    out = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        imgs = r.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        lbls = (np.arange(n) % 10).astype(np.uint8)
        r.shuffle(lbls)
        ext = ".gz" if gz else ""
        D.write_idx(directory / f"{stem}-images-idx3-ubyte{ext}", imgs)
        D.write_idx(directory / f"{stem}-labels-idx1-ubyte{ext}", lbls)
        out[split] = (imgs, lbls)
    return out


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,sub", [("fashion_mnist", "FashionMNIST/raw"), ("mnist", "MNIST/raw")])
def test_idx_datasets_read_back_exactly(tmp_path, name, sub, gz):
    written = _write_mnist_like(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        ds, info = D.build_dataset(name, split, data_root=tmp_path, augment=False)
        imgs, lbls = written[split]
        assert len(ds) == len(imgs)
        assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == (28, 28)
        assert len(info.classes) == 10 and info["num_classes"] == 10
        assert info.root == str(tmp_path / sub)
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
            px, y = _pixels(ds, i)
            np.testing.assert_array_equal(px[:, :, 0], imgs[i])
            assert y == int(lbls[i])
            raw, y2 = ds.raw(i)
            np.testing.assert_array_equal(raw[:, :, 0], imgs[i])
            assert y2 == y
    # normalized with the dataset mean/std
    x, _ = ds[0]
    expect = (torch.from_numpy(imgs[0]).float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x[0], expect)


def test_idx_files_directly_in_root_and_dot_spelling(tmp_path):
    imgs = _rng(1).randint(0, 256, size=(3, 28, 28)).astype(np.uint8)
    D.write_idx(tmp_path / "t10k-images.idx3-ubyte", imgs)
    D.write_idx(tmp_path / "t10k-labels.idx1-ubyte", np.array([1, 2, 3], np.uint8))
    ds, info = D.build_dataset("mnist", "test", data_root=tmp_path, augment=False)
    assert [ds[i][1] for i in range(3)] == [1, 2, 3]
    np.testing.assert_array_equal(_pixels(ds, 2)[0][:, :, 0], imgs[2])


def test_fashion_train_augmentation_changes_images_keeps_shape(tmp_path):
    _write_mnist_like(tmp_path / "FashionMNIST/raw", n_train=8)
    plain, _ = D.build_dataset("fashion_mnist", "train", data_root=tmp_path, augment=False)
    aug, _ = D.build_dataset("fashion_mnist", "train", data_root=tmp_path, augment=True)
    torch.manual_seed(0)
    changed = 0
    for i in range(len(plain)):
        xa, ya = aug[i]
        xp, yp = plain[i]
        assert xa.shape == xp.shape == (1, 28, 28) and ya == yp
        changed += int(not torch.equal(xa, xp))
    assert changed >= len(plain) // 2
    # the test split is never augmented
    t1, _ = D.build_dataset("fashion_mnist", "test", data_root=tmp_path, augment=True)
    assert t1.augment is None and torch.equal(t1[0][0], t1[0][0].clone())


def test_read_idx_errors(tmp_path):
    good = tmp_path / "good-idx3-ubyte"
    D.write_idx(good, np.zeros((2, 3, 4), np.uint8))
    assert D.read_idx(good).shape == (2, 3, 4)
    blob = good.read_bytes()

    bad = tmp_path / "bad_magic"
    bad.write_bytes(b"\x01\x02" + blob[2:])
    with pytest.raises(D.IDXFormatError, match="magic"):
        D.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x03" + blob[4:])  # unknown type code
    with pytest.raises(D.IDXFormatError, match="magic"):
        D.read_idx(bad)

    trunc = tmp_path / "trunc"
    trunc.write_bytes(blob[:-5])
    with pytest.raises(D.IDXFormatError, match="truncated"):
        D.read_idx(trunc)
    trunc.write_bytes(blob[:6])  # inside the header
    with pytest.raises(D.IDXFormatError, match="truncated"):
        D.read_idx(trunc)
    trunc.write_bytes(b"\x00\x00")
    with pytest.raises(D.IDXFormatError, match="truncated"):
        D.read_idx(trunc)

    tgz = tmp_path / "trunc.gz"
    tgz.write_bytes(gzip.compress(blob)[:-12])
    with pytest.raises(D.IDXFormatError):
        D.read_idx(tgz)

    long = tmp_path / "long"
    long.write_bytes(blob + b"\x00")
    with pytest.raises(D.IDXFormatError, match="trailing"):
        D.read_idx(long)

    with pytest.raises(D.IDXFormatError, match="dimensions"):
        D.read_idx(good, expect_ndim=1)


def test_corrupt_idx_in_dataset(tmp_path):
    d = tmp_path / "MNIST/raw"
    _write_mnist_like(d, gz=False)
    p = d / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(D.IDXFormatError, match="t10k-images-idx3-ubyte"):
        D.build_dataset("mnist", "test", data_root=tmp_path)
    # labels / images count mismatch
    D.write_idx(d / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(D.IDXFormatError, match="labels"):
        D.build_dataset("mnist", "train", data_root=tmp_path)


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian_package(tmp_path):
    ds, info = D.build_dataset("fashion_mnist", "test", data_root=tmp_path / "empty", augment=False)
    assert info.root == str(REAL_FMNIST)
    assert len(ds) == 10_000
    assert ds.data.shape == (10_000, 28, 28, 1) and ds.data.dtype == torch.uint8
    assert torch.bincount(ds.targets, minlength=10).tolist() == [1000] * 10
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    # whole-set statistics match the normalization constants
    m = ds.data.float().mean() / 255
    assert abs(float(m) - info.mean[0]) < 0.01


# --------------------------------------------------------------------------- missing datasets


def test_missing_mnist_error_names_files_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.build_dataset("mnist", "test", data_root=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, D.DatasetNotFoundError)
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "--data-root" in msg and str(tmp_path / "MNIST/raw") in msg


def test_missing_fashion_mnist_mentions_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(DS, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "no-such-dir")])
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.build_dataset("fashion-mnist", "train", data_root=tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "--data-root" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "FashionMNIST/raw") in msg and "no-such-dir" in msg


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cifar10", ["cifar-10-batches-py", "data_batch_1", "data_batch_5"]),
        ("cifar100", ["cifar-100-python", "train"]),
        ("food11", ["training", "<class>_<index>.jpg"]),
        ("imagefolder", ["<class>"]),
    ],
)
def test_missing_other_datasets(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as e:
        D.build_dataset(name, "train", data_root=tmp_path)
    msg = str(e.value)
    assert "--data-root" in msg
    for s in expected:
        assert s in msg


def test_names_and_unknown():
    assert set(D.names()) >= {"fashion_mnist", "mnist", "cifar10", "cifar100", "food11", "imagefolder", "synthetic"}
    assert D.canonical_name("Fashion-MNIST") == "fashion_mnist"
    assert D.canonical_name("food-11") == "food11"
    with pytest.raises(ValueError, match="unknown dataset"):
        D.build_dataset("nope", "train")
    with pytest.raises(ValueError, match="split"):
        D.build_dataset("synthetic", "bogus")


# --------------------------------------------------------------------------- CIFAR


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_arrays(n, classes, seed):
    r = _rng(seed)
    return r.randint(0, 256, size=(n, 3072)).astype(np.uint8), r.randint(0, classes, n).tolist()


def test_cifar10_reads_back(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [_cifar_arrays(3, 10, s) for s in range(5)]
    for i, (x, y) in enumerate(batches, 1):
        _pickle(d / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
    tx, ty = _cifar_arrays(4, 10, 9)
    _pickle(d / "test_batch", {b"data": tx, b"labels": ty})
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(d / "batches.meta", {b"label_names": names})

    ds, info = D.build_dataset("cifar10", "train", data_root=tmp_path, augment=False)
    assert len(ds) == 15 and info.num_classes == 10 and info.in_channels == 3
    assert info.image_size == (32, 32) and info.classes[3] == "c3"
    allx = np.concatenate([b[0] for b in batches])
    ally = sum((b[1] for b in batches), [])
    for i in range(len(ds)):
        px, y = _pixels(ds, i)
        assert px.shape == (32, 32, 3)
        np.testing.assert_array_equal(px, allx[i].reshape(3, 32, 32).transpose(1, 2, 0))
        assert y == ally[i]
    # <root> may also be the batches folder itself; test split
    ts, _ = D.build_dataset("cifar10", "test", data_root=d)
    assert len(ts) == 4 and [ts[i][1] for i in range(4)] == ty
    np.testing.assert_array_equal(_pixels(ts, 3)[0], tx[3].reshape(3, 32, 32).transpose(1, 2, 0))

    torch.manual_seed(0)
    aug, _ = D.build_dataset("cifar10", "train", data_root=tmp_path, augment=True)
    changed = sum(not torch.equal(aug[i][0], ds[i][0]) for i in range(len(ds)))
    assert aug[0][0].shape == (3, 32, 32) and changed >= 8

    torch.manual_seed(0)
    mn, info = D.build_dataset("cifar10", "train", data_root=tmp_path, policy="micronet")
    assert isinstance(mn.augment, D.MicroNetPolicy)
    changed = sum(not torch.equal(mn[i][0], ds[i][0]) for i in range(len(ds)))
    assert mn[0][0].shape == (3, 32, 32) and changed >= 8
    with pytest.raises(ValueError, match="policy"):
        D.build_dataset("cifar10", "train", data_root=tmp_path, policy="bogus")


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x, y = _cifar_arrays(6, 100, 3)
    _pickle(d / "train", {b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 6})
    tx, ty = _cifar_arrays(2, 100, 4)
    _pickle(d / "test", {"data": tx, "fine_labels": ty})  # str keys work too
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    ds, info = D.build_dataset("cifar100", "train", data_root=tmp_path, augment=False)
    assert info.num_classes == 100 and info.classes[99] == "f99" and len(ds) == 6
    for i in range(6):
        px, lab = _pixels(ds, i)
        np.testing.assert_array_equal(px, x[i].reshape(3, 32, 32).transpose(1, 2, 0))
        assert lab == y[i]
    ts, _ = D.build_dataset("cifar100", "test", data_root=tmp_path)
    assert [ts[i][1] for i in range(2)] == ty


# --------------------------------------------------------------------------- food-11, imagefolder


def _write_food11(root: Path, size=(32, 32)):
    r = _rng(5)
    for folder, items in (
        ("training", [(0, 0), (3, 1), (10, 2), (3, 0)]),
        ("validation", [(1, 0), (7, 5)]),
        ("testing", []),
    ):
        (root / folder).mkdir(parents=True)
        for c, k in items:
            p = root / folder / f"{c}_{k}.jpg"
            Image.fromarray(r.randint(0, 256, size=size[::-1] + (3,)).astype(np.uint8)).save(p)
    (root / "testing" / "0.jpg").write_bytes(b"")  # unlabeled, never read


def test_food11_reads_labels_and_pixels(tmp_path):
    _write_food11(tmp_path)
    ds, info = D.build_dataset("food11", "train", data_root=tmp_path, augment=False, image_size=32)
    assert info.num_classes == 11 and len(info.classes) == 11 and info.image_size == (32, 32)
    assert len(ds) == 4
    # sorted by (class, index); labels from the file-name prefix
    assert [Path(p).name for p, _ in ds.samples] == ["0_0.jpg", "3_0.jpg", "3_1.jpg", "10_2.jpg"]
    assert [ds[i][1] for i in range(4)] == [0, 3, 3, 10]
    for i in range(4):
        px, _ = _pixels(ds, i)
        with Image.open(ds.samples[i][0]) as im:
            np.testing.assert_array_equal(px, np.asarray(im.convert("RGB")))
    # test = validation (testing/ has no labels); valid too
    for split in ("test", "valid"):
        vs, vi = D.build_dataset("food11", split, data_root=tmp_path, image_size=32)
        assert [vs[i][1] for i in range(len(vs))] == [1, 7] and vi.extra["folder"] == "validation"
    torch.manual_seed(0)
    tr, _ = D.build_dataset("food11", "train", data_root=tmp_path, augment=True, image_size=32)
    xs = [tr[i][0] for i in range(4)]
    assert all(x.shape == (3, 32, 32) for x in xs)
    assert sum(not torch.equal(xs[i], ds[i][0]) for i in range(4)) >= 3


def test_food11_crop_and_resize(tmp_path):
    _write_food11(tmp_path / "food-11", size=(48, 40))
    # default 256 crop pads symmetric when the image is smaller (train) / center crop (test)
    tr, info = D.build_dataset("food11", "train", data_root=tmp_path)
    assert tr[0][0].shape == (3, 256, 256) and info.image_size == (256, 256)
    sm, _ = D.build_dataset("food11", "test", data_root=tmp_path, image_size=24)
    assert sm[0][0].shape == (3, 24, 24)


def test_imagefolder(tmp_path):
    r = _rng(7)
    written = {}
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "ant", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                arr = r.randint(0, 256, size=(20, 20, 3)).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")
                written[(split, cls, k)] = arr
    ds, info = D.build_dataset("imagefolder", "train", data_root=tmp_path, augment=False)
    assert info.classes == ["ant", "cat", "dog"] and info.num_classes == 3
    assert info.image_size == (20, 20) and len(ds) == 9
    for i, (path, lab) in enumerate(ds.samples):
        cls, k = Path(path).parent.name, int(Path(path).stem)
        assert info.classes[lab] == cls
        px, y = _pixels(ds, i)
        assert y == lab
        np.testing.assert_array_equal(px, written[("train", cls, k)])
    ts, _ = D.build_dataset("imagefolder", "test", data_root=tmp_path)  # falls back to val/
    assert len(ts) == 6 and ts[0][0].shape == (3, 20, 20)
    g, gi = D.build_dataset("imagefolder", "train", data_root=tmp_path, in_channels=1, image_size=16)
    assert g[0][0].shape == (1, 16, 16) and gi.in_channels == 1
    torch.manual_seed(0)
    au, _ = D.build_dataset("imagefolder", "train", data_root=tmp_path, augment=True)
    assert au[0][0].shape == (3, 20, 20)
    assert sum(not torch.equal(au[i][0], ds[i][0]) for i in range(9)) >= 5


# --------------------------------------------------------------------------- synthetic, loaders


def test_synthetic_deterministic_and_learnable():
    a, info = D.build_dataset("synthetic", "train", num_classes=4, image_size=8, in_channels=2, length=200, seed=3)
    b, _ = D.build_dataset("synthetic", "train", num_classes=4, image_size=8, in_channels=2, length=200, seed=3)
    c, _ = D.build_dataset("synthetic", "train", num_classes=4, image_size=8, in_channels=2, length=200, seed=4)
    assert len(a) == 200 and info.num_classes == 4 and info.in_channels == 2
    x0, y0 = a[5]
    assert x0.shape == (2, 8, 8) and x0.dtype == torch.float32 and 0 <= y0 < 4
    for i in (0, 5, 199):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert torch.equal(a[i][0], a[i][0])
    assert not torch.equal(a[0][0], c[0][0])
    t, _ = D.build_dataset("synthetic", "test", num_classes=4, image_size=8, in_channels=2, length=100, seed=3)
    assert not torch.equal(t[0][0], a[0][0])
    # learnable: nearest class mean (fit on train) classifies the test split
    X = torch.stack([a[i][0].flatten() for i in range(len(a))])
    Y = torch.tensor([a[i][1] for i in range(len(a))])
    assert len(torch.unique(Y)) == 4
    means = torch.stack([X[Y == k].mean(0) for k in range(4)])
    Xt = torch.stack([t[i][0].flatten() for i in range(len(t))])
    Yt = torch.tensor([t[i][1] for i in range(len(t))])
    acc = (torch.cdist(Xt, means).argmin(1) == Yt).float().mean()
    assert acc > 0.9


def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_make_loaders_reproducible():
    tr1, te1, info = D.make_loaders("synthetic", batch_size=16, seed=1, length=64, image_size=8)
    tr2, _, _ = D.make_loaders("synthetic", batch_size=16, seed=1, length=64, image_size=8)
    tr3, _, _ = D.make_loaders("synthetic", batch_size=16, seed=2, length=64, image_size=8)
    assert info.num_classes == 10
    a, b, c = _epoch(tr1), _epoch(tr2), _epoch(tr3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])
    x, y = _epoch(te1)
    assert x.shape == (64, 3, 8, 8)


def test_make_loaders_workers_augmentation_reproducible(tmp_path):
    _write_mnist_like(tmp_path / "FashionMNIST/raw", n_train=16)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # global state must not matter
        tr, te, _ = D.make_loaders("fashion_mnist", data_root=tmp_path, batch_size=4, seed=7, num_workers=2)
        runs.append(_epoch(tr))
        torch.manual_seed(999)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------- MicroNet policy


def _img(seed=0, size=(32, 32), mode="RGB"):
    r = _rng(seed)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    return Image.fromarray(r.randint(0, 256, size=shape).astype(np.uint8), mode=mode)


def test_micronet_subpolicy_table():
    ops = [(s.op, s.prob, s.level) for s in D.MICRONET_SUBPOLICIES]
    assert ops == [
        ("Invert", 0.2, 2),
        ("Contrast", 0.4, 4),
        ("Rotate", 0.5, 1),
        ("TranslateX", 0.4, 3),
        ("Sharpness", 0.5, 3),
        ("ShearY", 0.3, 4),
        ("TranslateY", 0.6, 8),
        ("AutoContrast", 0.6, 3),
        ("Equalize", 0.5, 5),
        ("Solarize", 0.4, 4),
        ("Color", 0.5, 5),
        ("Posterize", 0.2, 2),
        ("Brightness", 0.4, 5),
        ("Cutout", 0.3, 3),
        ("ShearX", 0.1, 3),
    ]


def test_level_mapping_matches_autoaugment():
    assert A.int_parameter(1, 30) == 3 and A.int_parameter(10, 30) == 30
    assert A.int_parameter(3, 10) == 3 and A.int_parameter(8, 10) == 8
    assert A.float_parameter(4, 0.3) == pytest.approx(0.12)
    assert A.solarize_threshold(4) == 256 - 102 == 154
    assert A.posterize_bits(2) == 4 and A.posterize_bits(10) == 0
    assert A.enhance_factor(4) == pytest.approx(0.82)
    assert A.enhance_factor(5) == pytest.approx(1.0)
    assert A.enhance_factor(0) == pytest.approx(0.1)
    assert A.int_parameter(3, 20) == 6  # cutout


def test_ops_pixel_values():
    img = _img(1)
    x = np.asarray(img).astype(int)
    np.testing.assert_array_equal(np.asarray(D.apply_op(img, "Invert", 2)), 255 - x)
    sol = np.asarray(D.apply_op(img, "Solarize", 4))
    np.testing.assert_array_equal(sol, np.where(x >= 154, 255 - x, x))
    post = np.asarray(D.apply_op(img, "Posterize", 2))
    np.testing.assert_array_equal(post, x & 0xF0)
    # Color / Brightness at level 5 are identities (factor 1.0)
    for op in ("Color", "Brightness"):
        np.testing.assert_array_equal(np.asarray(D.apply_op(img, op, 5)), x)
    # TranslateY level 8 shifts by 8 px (either way), filling with the mean colour
    g = torch.Generator().manual_seed(0)
    ty = np.asarray(D.apply_op(img, "TranslateY", 8, generator=g)).astype(int)
    assert np.array_equal(ty[:-8], x[8:]) or np.array_equal(ty[8:], x[:-8])
    tx = np.asarray(D.apply_op(img, "TranslateX", 3, generator=g)).astype(int)
    assert np.array_equal(tx[:, :-3], x[:, 3:]) or np.array_equal(tx[:, 3:], x[:, :-3])
    # every op keeps size and mode, also on grayscale
    for gimg in (img, _img(2, mode="L")):
        for op in A.OPS:
            out = D.apply_op(gimg, op, 7, generator=g)
            assert out.size == gimg.size and out.mode == gimg.mode, op
    with pytest.raises(ValueError):
        D.apply_op(img, "Nope", 1)


def test_cutout_size_16():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    out = np.asarray(A.apply_cutout(white, 16, center=(16, 16)))
    changed = np.argwhere((out != 255).any(-1))
    assert len(changed) == 256
    assert changed.min(0).tolist() == [8, 8] and changed.max(0).tolist() == [23, 23]
    corner = np.asarray(A.apply_cutout(white, 16, center=(0, 0)))
    assert int((corner != 255).any(-1).sum()) == 64  # clipped at the border
    # the policy's final cutout: only cutout enabled, full 16x16 squares away from the border
    pol = D.MicroNetPolicy(
        num_subpolicies=0, crop_padding=0, flip=False, cutout=16, generator=torch.Generator().manual_seed(0)
    )
    counts = []
    for _ in range(40):
        o = np.asarray(pol(white))
        m = (o != 255).any(-1)
        rows, cols = np.nonzero(m)
        assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
        counts.append(int(m.sum()))
    assert max(counts) == 256 and min(counts) > 0


def test_micronet_preserves_size_and_is_reproducible():
    imgs = [_img(s) for s in range(6)] + [_img(9, mode="L")]
    outs = []
    for _ in range(2):
        pol = D.MicroNetPolicy(generator=torch.Generator().manual_seed(42))
        outs.append([np.asarray(pol(im)) for im in imgs for _ in range(3)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    pol = D.MicroNetPolicy(generator=torch.Generator().manual_seed(42))
    for im in imgs:
        out = pol(im)
        assert isinstance(out, Image.Image) and out.size == im.size and out.mode == im.mode
    # global RNG when no generator is given
    res = []
    for _ in range(2):
        torch.manual_seed(5)
        pol = D.MicroNetPolicy()
        res.append([np.asarray(pol(im)) for im in imgs])
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(np.asarray(im), o) for im, o in zip(imgs, res[0]))
    with pytest.raises(TypeError):
        pol(torch.zeros(3, 32, 32))


def test_micronet_applies_exactly_two_distinct_subpolicies(monkeypatch):
    calls = []
    orig = D.MicroNetPolicy.apply_subpolicy

    def spy(self, index, img):
        calls.append(index)
        return orig(self, index, img)

    monkeypatch.setattr(D.MicroNetPolicy, "apply_subpolicy", spy)
    pol = D.MicroNetPolicy(generator=torch.Generator().manual_seed(0))
    img = _img(0)
    seen = set()
    for _ in range(60):
        calls.clear()
        pol(img)
        assert len(calls) == 2 and calls[0] != calls[1]
        assert tuple(calls) == pol.last_subpolicies
        seen.update(calls)
    assert len(seen) >= 12  # all sub-policies get picked


def test_micronet_applies_both_not_only_the_second():
    subs = [("Invert", 1.0, 2), ("Posterize", 1.0, 2)]
    pol = D.MicroNetPolicy(subs, crop_padding=0, flip=False, cutout=0, generator=torch.Generator().manual_seed(0))
    img = _img(3)
    x = np.asarray(img).astype(int)
    for _ in range(6):
        out = np.asarray(pol(img)).astype(int)
        if pol.last_subpolicies == (0, 1):
            expect = (255 - x) & 0xF0
        else:
            expect = 255 - (x & 0xF0)
        np.testing.assert_array_equal(out, expect)
    # probability 0 -> never applied
    pol0 = D.MicroNetPolicy([("Invert", 0.0, 2), ("Posterize", 0.0, 2)], crop_padding=0, flip=False, cutout=0)
    np.testing.assert_array_equal(np.asarray(pol0(img)), x)


def test_cropflip_batch_is_a_padded_crop_or_its_mirror():
    import torch

    from pycompress.data import CropFlip

    torch.manual_seed(0)
    x = torch.randint(1, 255, (64, 6, 5, 2), dtype=torch.uint8)
    aug = CropFlip((6, 5), padding=2, flip=True)
    out = aug.batch(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    xp = torch.nn.functional.pad(x, (0, 0, 2, 2, 2, 2))
    seen_offsets, flips = set(), 0
    for i in range(64):
        matches = [
            (oy, ox, f)
            for oy in range(5)
            for ox in range(5)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(1) if f else c)(xp[i, oy : oy + 6, ox : ox + 5]))
        ]
        assert matches, i
        seen_offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen_offsets) > 10 and 10 < flips < 54  # offsets and flips actually vary


def test_getitems_matches_getitem_without_augmentation(tmp_path):
    import numpy as np
    import torch

    from pycompress.data import DatasetInfo
    from pycompress.data.datasets import ArrayImageDataset

    info = DatasetInfo("t", "train", 3, 1, (4, 4), ["a", "b", "c"], (0.5,), (0.25,), None)
    data = np.random.RandomState(0).randint(0, 255, (10, 4, 4)).astype(np.uint8)
    ds = ArrayImageDataset(data, np.arange(10) % 3, info)
    batch = ds.__getitems__([3, 1, 7])
    for (xb, yb), i in zip(batch, [3, 1, 7]):
        xi, yi = ds[i]
        assert torch.equal(xb, xi) and yb == yi


def test_fashion_mnist_pad_option(tmp_path):
    import numpy as np
    import pytest

    from pycompress.data import build_dataset, write_idx

    d = tmp_path / "fashion-mnist"
    d.mkdir()
    imgs = np.full((3, 28, 28), 200, dtype=np.uint8)
    write_idx(d / "t10k-images-idx3-ubyte", imgs)
    write_idx(d / "t10k-labels-idx1-ubyte", np.array([0, 1, 2], dtype=np.uint8))
    ds, info = build_dataset("fashion_mnist", "test", data_root=tmp_path, pad=2)
    assert info.image_size == (32, 32)
    raw, _ = ds.raw(0)
    assert raw.shape == (32, 32, 1) and raw[:2].max() == 0 and raw[2:30, 2:30].min() == 200
    with pytest.raises(ValueError, match="pad must be an integer >= 0"):
        build_dataset("fashion_mnist", "test", data_root=tmp_path, pad=-1)
