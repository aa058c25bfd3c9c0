"""Datasets: Fashion-MNIST, MNIST, CIFAR-10/100, food-11, ImageFolder trees and a synthetic set.

Everything is read from local files; nothing is ever downloaded. Where each dataset is looked for
(``data_root`` is ``--data-root DIR``; when it is None the candidates are ``$PYCOMPRESS_DATA_ROOT``
and ``./data``):

* ``fashion_mnist``: IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``; the
  ``train-images.idx3-ubyte`` spelling is accepted too) in ``<root>/FashionMNIST/raw/``
  (torchvision's layout), ``<root>/fashion-mnist/``, ``<root>/fashion_mnist/`` or ``<root>/``; then
  Debian's ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``).
* ``mnist``: the same file names in ``<root>/MNIST/raw/``, ``<root>/mnist/`` or ``<root>/``.
* ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (the python
  pickle version); ``<root>`` itself may be that folder.
* ``cifar100``: ``<root>/cifar-100-python/{train,test,meta}``, fine labels (100 classes).
* ``food11``: ``<root>/{training,validation,testing}/<class>_<index>.jpg`` (also under
  ``<root>/food-11/`` or ``<root>/food11/``). Splits: ``train`` = training/, ``valid`` =
  validation/, and ``test`` = validation/ as well, because testing/ has no labels.
* ``imagefolder``: ``<root>/<split>/<class>/*.{jpg,jpeg,png,bmp,...}``; split folder ``train``, for
  ``test`` the first of ``test``, ``val``, ``valid``, ``validation``; for ``valid`` the first of
  ``val``, ``valid``, ``validation``.
* ``synthetic``: generated, deterministic under ``seed``.

``__getitem__`` returns ``(float tensor C x H x W normalized with the dataset mean/std, int label)``.
``dataset.raw(i)`` returns the stored/decoded uint8 pixels ``H x W x C`` and the label, before any
transform.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

ENV_DATA_ROOT = "PYCOMPRESS_DATA_ROOT"
#: Where Debian's dataset-fashion-mnist package installs its files (module-level so tests can
#: monkeypatch it).
FASHION_MNIST_SYSTEM_DIRS: List[str] = ["/usr/share/datasets/fashion-mnist"]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# CIFAR-10: the values pytorch-classification (the seeds' base) normalizes with.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
FOOD11_CLASSES = ["Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles/Pasta", "Rice", "Seafood", "Soup", "Vegetable/Fruit"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says what was expected and where."""


class IDXFormatError(ValueError):
    """An IDX file is corrupt: bad magic number, wrong shape, or truncated."""


@dataclass
class DatasetInfo:
    name: str
    split: str
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]  # (H, W) of the tensors __getitem__ returns
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    root: Optional[str] = None  # where the files were found
    extra: Dict = field(default_factory=dict)

    def __getitem__(self, key):  # info["num_classes"] works too
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "split", "num_classes", "in_channels",
                                              "image_size", "classes", "mean", "std", "root")}


# =========================================================================== helpers

def _candidate_roots(data_root: Optional[PathLike]) -> List[Path]:
    if data_root is not None:
        return [Path(data_root).expanduser()]
    roots = []
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path("data"))
    return roots


def _where(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def pil_to_uint8(img) -> np.ndarray:
    """PIL image -> uint8 array H x W x C (C = 1 for mode L)."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def to_normalized_tensor(arr_or_img, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 H x W x C array (or PIL image) -> float C x H x W, ``(x/255 - mean) / std``
    (what torchvision's ToTensor + Normalize compute)."""
    arr = arr_or_img if isinstance(arr_or_img, np.ndarray) else pil_to_uint8(arr_or_img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`to_normalized_tensor`, back to 0..255 uint8 (C x H x W or N x C x H x W)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return ((x * s + m) * 255.0).round().clamp_(0, 255).to(torch.uint8)


# =========================================================================== IDX format

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (plain or gzip, detected from its first bytes) into a numpy array.

    Header: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), a byte with the number of dimensions, then each dimension as a big-endian
    uint32; the data follows. Raises :class:`IDXFormatError` on a bad magic number, an unexpected
    number of dimensions, or a truncated / over-long / corrupt file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                buf = f.read()
        else:
            buf = path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated / corrupt gzip stream
        raise IDXFormatError(f"{path}: corrupt gzip stream ({e})") from e
    if len(buf) < 4:
        raise IDXFormatError(f"{path}: truncated IDX file ({len(buf)} bytes, no header)")
    zero0, zero1, type_code, ndim = buf[0], buf[1], buf[2], buf[3]
    magic = int.from_bytes(buf[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x000008NN "
                             "for uint8 data, e.g. 2051 for images, 2049 for labels)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXFormatError(f"{path}: IDX magic number {magic} says {ndim} dimensions, expected "
                             f"{expect_ndim} (magic {0x800 + expect_ndim})")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(buf)} < {header} bytes)")
    dims = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got < expected:
        raise IDXFormatError(f"{path}: truncated IDX file: header says shape {dims} "
                             f"({expected} data bytes) but only {got} bytes follow")
    if got > expected:
        raise IDXFormatError(f"{path}: IDX file has {got - expected} trailing bytes after shape "
                             f"{dims}; corrupt?")
    arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def write_idx(path: PathLike, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write a uint8 array as IDX (gzip if ``compress`` or the name ends with .gz). For tests/tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx_file(directory: Path, stem: str) -> Optional[Path]:
    alt = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte spelling
    for name in (stem + ".gz", stem, alt + ".gz", alt):
        p = directory / name
        if p.is_file():
            return p
    return None


def load_idx_pair(images_path: PathLike, labels_path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IDXFormatError(f"{images_path} / {labels_path}: expected uint8 IDX data")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} has {len(images)} images but {labels_path} has "
                             f"{len(labels)} labels")
    return images, labels


# =========================================================================== dataset classes

class CropFlip:
    """Random crop with zero padding + optional horizontal flip (torchvision's
    ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``), for in-memory uint8 images.

    ``__call__`` works on one PIL image (the torchvision transforms); :meth:`batch` does a whole
    batch of uint8 N x H x W x C tensors at once with the same distribution (offsets uniform in
    [0, 2 * padding], flip with probability 1/2, from torch's global RNG), which is what
    :class:`ArrayImageDataset` uses through ``__getitems__``: ~30x cheaper than PIL per sample.
    """

    def __init__(self, size, padding: int, flip: bool):
        self.size = tuple(size)
        self.padding = int(padding)
        self.flip = bool(flip)
        T = _tv_transforms()
        self._pil = _compose([T.RandomCrop(self.size, padding=self.padding),
                              T.RandomHorizontalFlip() if self.flip else None])

    def __call__(self, img):
        return self._pil(img)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        ch, cw = self.size
        p = self.padding
        xp = torch.nn.functional.pad(x, (0, 0, p, p, p, p)) if p else x
        oy = torch.randint(0, h + 2 * p - ch + 1, (n,)).tolist()
        ox = torch.randint(0, w + 2 * p - cw + 1, (n,)).tolist()
        flips = (torch.rand(n) < 0.5).tolist() if self.flip else [False] * n
        out = torch.empty((n, ch, cw, c), dtype=x.dtype)
        # Plain slicing per image: cheaper than one advanced-indexing gather at these sizes.
        for i in range(n):
            crop = xp[i, oy[i]:oy[i] + ch, ox[i]:ox[i] + cw]
            out[i] = crop.flip(1) if flips[i] else crop
        return out

    def __repr__(self) -> str:
        return f"CropFlip(size={self.size}, padding={self.padding}, flip={self.flip})"


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 tensor N x H x W x C with int64 labels.

    ``augment``: optional PIL -> PIL transform (training augmentation); without it __getitem__ skips
    PIL entirely.
    """

    def __init__(self, data: np.ndarray, targets: np.ndarray, info: DatasetInfo,
                 augment: Optional[Callable] = None):
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim == 3:
            data = data[:, :, :, None]
        self.data = torch.from_numpy(np.ascontiguousarray(data))
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        self.info = info
        self.classes = info.classes
        self.augment = augment
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.data.shape[0]

    def raw(self, index: int) -> Tuple[np.ndarray, int]:
        return self.data[index].numpy(), int(self.targets[index])

    def pil(self, index: int):
        from PIL import Image
        arr = self.data[index].numpy()
        return Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else \
            Image.fromarray(arr, mode="RGB")

    def __getitem__(self, index: int):
        if self.augment is None:
            x = self.data[index].permute(2, 0, 1).float().div_(255.0)
            x = (x - self._mean) / self._std
        else:
            x = to_normalized_tensor(self.augment(self.pil(index)), self.info.mean, self.info.std)
        return x, int(self.targets[index])

    def __getitems__(self, indices):
        """Batched fetch (DataLoader calls this with a whole batch of indices): one vectorised
        augmentation and normalisation instead of one PIL round trip per image, when the
        augmentation is a :class:`CropFlip` or there is none."""
        if self.augment is not None and not isinstance(self.augment, CropFlip):
            return [self[i] for i in indices]
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self.data[idx]
        if self.augment is not None:
            x = self.augment.batch(x)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        y = self.targets[idx]
        return [(x[i], int(y[i])) for i in range(len(idx))]


class ImageFileDataset(Dataset):
    """Images decoded from files on each access. ``transform``: PIL -> PIL (crops, augmentation);
    then ToTensor + Normalize with ``info.mean/std``."""

    def __init__(self, samples: List[Tuple[str, int]], info: DatasetInfo,
                 transform: Optional[Callable] = None):
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.info = info
        self.classes = info.classes
        self.transform = transform
        self._mode = "L" if info.in_channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        from PIL import Image
        path = self.samples[index][0]
        with Image.open(path) as img:
            return img.convert(self._mode)

    def raw(self, index: int) -> Tuple[np.ndarray, int]:
        return pil_to_uint8(self.load(index)), self.samples[index][1]

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return to_normalized_tensor(img, self.info.mean, self.info.std), self.samples[index][1]


class SyntheticDataset(Dataset):
    """Deterministic random images: sample i of a split is ``prototype[label_i] + noise * N(0,1)``,
    where the class prototypes are shared by all splits (so a model trained on ``train`` generalizes
    to ``test``) and everything is generated from ``seed``. Tensors are returned already
    "normalized" (roughly zero mean, unit scale)."""

    def __init__(self, info: DatasetInfo, length: int, seed: int = 0, noise: float = 0.5,
                 split_offset: int = 0):
        self.info = info
        self.classes = info.classes
        self.length = int(length)
        self.seed = int(seed)
        self.noise = float(noise)
        self.split_offset = int(split_offset)
        h, w = info.image_size
        g = torch.Generator().manual_seed(self.seed)
        # smooth-ish class patterns: low-res noise upsampled, so small convnets pick them up
        low = torch.randn(info.num_classes, info.in_channels, max(1, h // 4), max(1, w // 4),
                          generator=g)
        self.prototypes = torch.nn.functional.interpolate(low, size=(h, w), mode="nearest")
        gl = torch.Generator().manual_seed(self.seed * 1_000_003 + 17 + self.split_offset)
        self.targets = torch.randint(info.num_classes, (self.length,), generator=gl)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(index)
        index %= self.length
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.split_offset * 7_919 + index * 104_729 + 1) % (2 ** 63))
        y = int(self.targets[index])
        x = self.prototypes[y] + self.noise * torch.randn(self.prototypes.shape[1:], generator=g)
        return x, y


# =========================================================================== builders

_BUILDERS: Dict[str, Callable] = {}
_ALIASES: Dict[str, str] = {}


def register(name: str, *aliases: str):
    """Decorator registering ``fn(split, data_root, augment, **kwargs) -> (dataset, info)``."""
    def deco(fn):
        _BUILDERS[name] = fn
        for a in (name,) + aliases:
            _ALIASES[_norm(a)] = name
        return fn
    return deco


def _norm(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def names() -> List[str]:
    """The registered dataset names."""
    return sorted(_BUILDERS)


def canonical_name(name: str) -> str:
    try:
        return _ALIASES[_norm(name)]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names())}") from None


def build_dataset(name: str, split: str = "train", *, data_root: Optional[PathLike] = None,
                  augment: bool = True, **kwargs):
    """Build dataset ``name`` for ``split`` ("train" or "test"; food11/imagefolder also "valid").

    Returns ``(dataset, info)``; ``dataset[i] = (float tensor C x H x W normalized, int label)``;
    ``info`` is a :class:`DatasetInfo` (num_classes, in_channels, image_size, classes, mean, std,
    root). ``augment`` turns on the training augmentation (only for the train split).
    Missing files raise :class:`DatasetNotFoundError` (a FileNotFoundError). Nothing downloads.
    """
    cname = canonical_name(name)
    split = split.lower()
    if split in ("val", "validation"):
        split = "valid"
    return _BUILDERS[cname](split, data_root, augment and split == "train", **kwargs)


def _check_split(name, split, allowed=("train", "test")):
    if split not in allowed:
        raise ValueError(f"{name}: unknown split {split!r}; use one of {allowed}")


def _tv_transforms():
    import torchvision.transforms as T  # lazy: importing torchvision costs seconds
    return T


def _compose(ts):
    ts = [t for t in ts if t is not None]
    if not ts:
        return None
    return _tv_transforms().Compose(ts)


# --------------------------------------------------------------------------- (fashion-)MNIST

def _build_idx(name, pretty, subdirs, system_dirs, classes, mean, std, hint, split, data_root,
               augment, *, flip, padding=2, pad=0, **kwargs):
    _check_split(name, split)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"{name}: pad must be an integer >= 0, got {pad!r}")
    if kwargs:
        raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)}")
    img_stem, lbl_stem = _IDX_STEMS[split]
    roots = _candidate_roots(data_root)
    dirs = [r / s for r in roots for s in subdirs] + [Path(d) for d in system_dirs]
    found = None
    for d in dirs:
        ip, lp = _find_idx_file(d, img_stem), _find_idx_file(d, lbl_stem)
        if ip and lp:
            found = (d, ip, lp)
            break
    if found is None:
        raise DatasetNotFoundError(
            f"{pretty} ({split} split) not found: expected the IDX files {img_stem}[.gz] and "
            f"{lbl_stem}[.gz] in one directory; looked in: {_where(dirs)}. Provide them with "
            f"--data-root DIR (torchvision layout DIR/{subdirs[0]}/, or the files directly in DIR)"
            f"{hint}. Nothing is downloaded.")
    d, ip, lp = found
    images, labels = load_idx_pair(ip, lp)
    if labels.size and int(labels.max()) >= len(classes):
        raise IDXFormatError(f"{lp}: label {int(labels.max())} out of range for {len(classes)} "
                             "classes")
    if pad:  # zero (background) border on every side, e.g. 28x28 -> 32x32 as LeNet-5 expects
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    h, w = images.shape[1:]
    info = DatasetInfo(name, split, len(classes), 1, (h, w), list(classes), mean, std, str(d),
                       {"images": str(ip), "labels": str(lp)})
    aug = CropFlip((h, w), padding, flip) if augment else None
    return ArrayImageDataset(images, labels, info, aug), info


@register("fashion_mnist", "fashionmnist", "fmnist")
def _fashion_mnist(split, data_root, augment, **kwargs):
    """Train augmentation: RandomCrop 28 pad 2 + horizontal flip. Option ``pad=N`` adds an N-pixel
    zero border to every image first (``pad=2``: 32 x 32)."""
    return _build_idx("fashion_mnist", "Fashion-MNIST",
                      ["FashionMNIST/raw", "fashion-mnist", "fashion_mnist", "."],
                      FASHION_MNIST_SYSTEM_DIRS, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN,
                      FASHION_MNIST_STD,
                      ", or on Debian/Ubuntu install the package: apt-get install "
                      "dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist)",
                      split, data_root, augment, flip=True, **kwargs)


@register("mnist")
def _mnist(split, data_root, augment, **kwargs):
    """Train augmentation: RandomCrop 28 pad 2 only (digits are not flip-invariant). DeepHoyer used
    no augmentation on MNIST: pass augment=False to reproduce it."""
    return _build_idx("mnist", "MNIST", ["MNIST/raw", "mnist", "."], [], MNIST_CLASSES,
                      MNIST_MEAN, MNIST_STD, "", split, data_root, augment, flip=False, **kwargs)


# --------------------------------------------------------------------------- CIFAR

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: cannot read CIFAR pickle batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _names_from_meta(path: Path, key: str, n: int) -> List[str]:
    if path.is_file():
        try:
            names_ = _unpickle(path).get(key)
            if names_ is not None and len(names_) == n:
                return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in names_]
        except ValueError:
            pass
    return [str(i) for i in range(n)]


def _build_cifar(name, folder, files, label_key, meta, meta_key, num_classes, mean, std, split,
                 data_root, augment, *, policy="standard", generator=None):
    _check_split(name, split)
    roots = _candidate_roots(data_root)
    dirs = [r / folder for r in roots] + [r for r in roots]
    wanted = files[split]
    found = next((d for d in dirs if all((d / f).is_file() for f in wanted)), None)
    if found is None:
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found: expected the CIFAR python pickle files "
            f"{folder}/{{{','.join(wanted)}}}; looked in: {_where(dirs)}. Provide them with "
            f"--data-root DIR where DIR/{folder}/ holds the extracted python version of the "
            "dataset (e.g. tar xzf " + folder.split('-batches')[0].replace('-python', '')
            + "-python.tar.gz -C DIR). Nothing is downloaded.")
    data, labels = [], []
    for f in wanted:
        d = _unpickle(found / f)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{found / f}: CIFAR batch lacks 'data' or {label_key!r} "
                             f"(keys: {sorted(d)})")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072:
            raise ValueError(f"{found / f}: 'data' has shape {x.shape}, expected [N, 3072]")
        y = np.asarray(d[label_key], dtype=np.int64)
        if len(y) != len(x):
            raise ValueError(f"{found / f}: {len(x)} images but {len(y)} labels")
        data.append(x)
        labels.append(y)
    x = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.concatenate(labels)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name}: labels outside [0, {num_classes})")
    classes = _names_from_meta(found / meta, meta_key, num_classes)
    info = DatasetInfo(name, split, num_classes, 3, (32, 32), classes, mean, std, str(found),
                       {"policy": policy if augment else None})
    aug = None
    if augment:
        if policy == "standard":
            aug = CropFlip((32, 32), 4, True)
        elif policy == "micronet":
            from .augment import MicroNetPolicy
            aug = MicroNetPolicy(generator=generator)  # includes crop 32 pad 4, flip, cutout 16
        else:
            raise ValueError(f"{name}: unknown policy {policy!r}; use 'standard' or 'micronet'")
    return ArrayImageDataset(x, y, info, aug), info


@register("cifar10", "cifar-10")
def _cifar10(split, data_root, augment, **kwargs):
    """Train: RandomCrop 32 pad 4 + flip (policy="standard") or the MicroNet policy
    (policy="micronet"); normalize with the CIFAR-10 mean/std."""
    return _build_cifar("cifar10", "cifar-10-batches-py",
                        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                        "labels", "batches.meta", "label_names", 10, CIFAR10_MEAN, CIFAR10_STD,
                        split, data_root, augment, **kwargs)


@register("cifar100", "cifar-100")
def _cifar100(split, data_root, augment, **kwargs):
    """Fine labels (100 classes). Same transforms as cifar10 with the CIFAR-100 mean/std."""
    return _build_cifar("cifar100", "cifar-100-python", {"train": ["train"], "test": ["test"]},
                        "fine_labels", "meta", "fine_label_names", 100, CIFAR100_MEAN,
                        CIFAR100_STD, split, data_root, augment, **kwargs)


# --------------------------------------------------------------------------- image files

def _image_files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


_FOOD11_NAME = re.compile(r"^(\d+)_(\d+)$")


@register("food11", "food-11")
def _food11(split, data_root, augment, *, image_size: int = 256, resize: Optional[int] = None,
            rotation: float = 15.0):
    """food-11. Train: [Resize] -> RandomCrop(image_size, pad_if_needed, symmetric) -> flip ->
    RandomRotation(15); test/valid: [Resize] -> CenterCrop(image_size); ImageNet mean/std.
    ``resize`` (shorter side) defaults to none at image_size 256 (the homework's transforms) and
    to ``image_size`` when a smaller image_size is asked for (shrink the whole image for speed)."""
    _check_split("food11", split, ("train", "valid", "test"))
    folder = {"train": "training", "valid": "validation", "test": "validation"}[split]
    roots = _candidate_roots(data_root)
    bases = [b for r in roots for b in (r, r / "food-11", r / "food11")]
    base = next((b for b in bases if (b / folder).is_dir() and _image_files(b / folder)), None)
    if base is None:
        raise DatasetNotFoundError(
            f"food11 ({split} split) not found: expected images named <class>_<index>.jpg "
            f"(class 0..10) in a folder {folder}/ (food-11 has training/, validation/, testing/; "
            f"'test' uses validation/ because testing/ has no labels); looked in: "
            f"{_where([b / folder for b in bases])}. Provide it with --data-root DIR where "
            f"DIR/{folder}/ exists. Nothing is downloaded.")
    samples = []
    for p in _image_files(base / folder):
        m = _FOOD11_NAME.match(p.stem)
        if not m:
            raise ValueError(f"food11: file name {p} is not <class>_<index>.<ext>")
        label = int(m.group(1))
        if not 0 <= label < 11:
            raise ValueError(f"food11: class {label} of {p} outside 0..10")
        samples.append((int(m.group(1)), int(m.group(2)), str(p)))
    samples.sort()
    if resize is None and image_size != 256:
        resize = image_size
    info = DatasetInfo("food11", split, 11, 3, (image_size, image_size), list(FOOD11_CLASSES),
                       IMAGENET_MEAN, IMAGENET_STD, str(base), {"folder": folder})
    T = _tv_transforms()
    pre = [T.Resize(resize)] if resize else []
    if augment:
        tf = _compose(pre + [T.RandomCrop(image_size, pad_if_needed=True,
                                          padding_mode="symmetric"),
                             T.RandomHorizontalFlip(), T.RandomRotation(rotation)])
    else:
        tf = _compose(pre + [T.CenterCrop(image_size)])
    return ImageFileDataset([(p, c) for c, _, p in samples], info, tf), info


@register("imagefolder", "image_folder")
def _imagefolder(split, data_root, augment, *, image_size: Optional[int] = None,
                 in_channels: int = 3, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
    """``<root>/<split>/<class>/*.jpg|png``; classes = sorted sub-folder names (shared by all
    splits when the train folder exists). Images are resized (shorter side) and center-cropped to
    ``image_size`` when it is given, otherwise they must all have the size of the first one.
    Train augmentation: RandomCrop(image_size, padding=image_size//8) + horizontal flip."""
    _check_split("imagefolder", split, ("train", "test", "valid"))
    if in_channels not in (1, 3):
        raise ValueError("imagefolder: in_channels must be 1 or 3")
    if data_root is None:
        raise DatasetNotFoundError("imagefolder needs --data-root DIR with DIR/<split>/<class>/"
                                   "*.jpg|png (e.g. DIR/train/cat/001.jpg)")
    root = Path(data_root).expanduser()
    options = {"train": ["train"], "test": ["test", "val", "valid", "validation"],
               "valid": ["val", "valid", "validation"]}[split]
    split_dir = next((root / o for o in options if (root / o).is_dir()), None)
    if split_dir is None:
        raise DatasetNotFoundError(
            f"imagefolder ({split} split) not found: expected a folder "
            f"{' or '.join(str(root / o) for o in options)} holding one sub-folder per class with "
            f"images, i.e. DIR/{options[0]}/<class>/*.jpg|png ({', '.join(IMAGE_EXTENSIONS)}). "
            "Provide it with --data-root DIR. Nothing is downloaded.")
    class_src = root / "train" if (root / "train").is_dir() else split_dir
    classes = sorted(p.name for p in class_src.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"imagefolder: no class sub-folders in {class_src}")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
        if c not in index:
            raise ValueError(f"imagefolder: class folder {split_dir / c} not among the training "
                             f"classes {classes}")
        samples += [(str(p), index[c]) for p in _image_files(split_dir / c)]
    if not samples:
        raise DatasetNotFoundError(f"imagefolder: no images under {split_dir}/<class>/")
    if image_size is None:
        from PIL import Image
        with Image.open(samples[0][0]) as im:
            w, h = im.size
        size = (h, w)
    else:
        size = (image_size, image_size)
    if mean is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.5,), (0.5,))
    info = DatasetInfo("imagefolder", split, len(classes), in_channels, size, classes,
                       tuple(mean), tuple(std), str(split_dir))
    T = _tv_transforms()
    pre = [T.Resize(image_size), T.CenterCrop(image_size)] if image_size else []
    aug = [T.RandomCrop(size, padding=max(1, min(size) // 8)), T.RandomHorizontalFlip()] \
        if augment else []
    return ImageFileDataset(samples, info, _compose(pre + aug)), info


# --------------------------------------------------------------------------- synthetic

@register("synthetic")
def _synthetic(split, data_root, augment, *, num_classes: int = 10, image_size: int = 32,
               in_channels: int = 3, length: Optional[int] = None, seed: int = 0,
               noise: float = 0.5):
    """Deterministic, learnable random images (for tests). ``length`` defaults to 512 (train) /
    256 (test, valid). ``augment`` is ignored."""
    _check_split("synthetic", split, ("train", "test", "valid"))
    if length is None:
        length = 512 if split == "train" else 256
    info = DatasetInfo("synthetic", split, num_classes, in_channels, (image_size, image_size),
                       [str(i) for i in range(num_classes)], (0.0,) * in_channels,
                       (1.0,) * in_channels, None, {"seed": seed, "length": length})
    offset = {"train": 0, "test": 1, "valid": 2}[split]
    return SyntheticDataset(info, length, seed, noise, offset), info
