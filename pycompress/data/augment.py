"""The MicroNet CIFAR-100 augmentation policy (SPEC section 1) as a transform on PIL images.

Level -> magnitude mapping, exactly as AutoAugment's ``augmentation_transforms.py``
(``PARAMETER_MAX = 10``; ``float_parameter(l, m) = l * m / 10``;
``int_parameter(l, m) = int(l * m / 10)``):

==============  ==================================================================  =================
op              magnitude                                                           policy level ->
==============  ==================================================================  =================
Invert          (no magnitude) ``ImageOps.invert``                                  2 -> -
Contrast        factor ``float_parameter(l, 1.8) + 0.1``                            4 -> 0.82
Rotate          ``int_parameter(l, 30)`` degrees, random sign                       1 -> +-3 deg
TranslateX      ``int_parameter(l, 10)`` pixels, random sign                        3 -> +-3 px
Sharpness       factor ``float_parameter(l, 1.8) + 0.1``                            3 -> 0.64
ShearY          ``float_parameter(l, 0.3)``, random sign                            4 -> +-0.12
TranslateY      ``int_parameter(l, 10)`` pixels, random sign                        8 -> +-8 px
AutoContrast    (no magnitude) ``ImageOps.autocontrast``                            3 -> -
Equalize        (no magnitude) ``ImageOps.equalize``                                5 -> -
Solarize        threshold ``256 - int_parameter(l, 256)``                           4 -> 154
Color           factor ``float_parameter(l, 1.8) + 0.1``                            5 -> 1.0 (no-op)
Posterize       bits ``4 - int_parameter(l, 4)``                                    2 -> 4 bits
Brightness      factor ``float_parameter(l, 1.8) + 0.1``                            5 -> 1.0 (no-op)
Cutout          square side ``int_parameter(l, 20)`` px, filled grey                3 -> 6 px
ShearX          ``float_parameter(l, 0.3)``, random sign                            3 -> +-0.09
==============  ==================================================================  =================

(Color and Brightness at level 5 are identities: that is what the MicroNet policy asks for.)
Geometric ops use nearest-neighbour resampling like AutoAugment; pixels moved in from outside are
filled with ``fill`` (default the CIFAR mean colour, which is what AutoAugment's ``pil_unwrap``
produced: 0 after normalization). Cutout uses AutoAugment's grey ``(125, 122, 113)``; its centre is
uniform over the image and the square is clipped at the border.

Per image, :class:`MicroNetPolicy` draws 2 *distinct* sub-policies uniformly at random and applies
both in sequence, each with its own probability (the original code computed two but applied only the
second: a bug we do not copy); then a random 32x32 crop of the image zero-padded by 4, a horizontal
flip with probability 0.5, and a 16 px cutout.

Randomness comes from a ``torch.Generator`` passed in, or from torch's global RNG when none is
passed. Use the global RNG inside DataLoader workers (PyTorch seeds each worker's global RNG from the
loader's generator); a generator object passed in would be copied into every worker in the same
state.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageEnhance, ImageOps

PARAMETER_MAX = 10
#: AutoAugment's fill for pixels brought in by geometric ops (CIFAR-10 mean, 0..255).
DEFAULT_FILL = (125, 123, 114)
#: AutoAugment's cutout colour.
CUTOUT_FILL = (125, 122, 113)


def float_parameter(level: float, maxval: float) -> float:
    """AutoAugment: ``float(level) * maxval / PARAMETER_MAX``."""
    return float(level) * maxval / PARAMETER_MAX


def int_parameter(level: float, maxval: float) -> int:
    """AutoAugment: ``int(level * maxval / PARAMETER_MAX)``."""
    return int(level * maxval / PARAMETER_MAX)


def enhance_factor(level: float) -> float:
    """Contrast / Color / Brightness / Sharpness factor: ``level * 1.8 / 10 + 0.1``."""
    return float_parameter(level, 1.8) + 0.1


def solarize_threshold(level: float) -> int:
    return 256 - int_parameter(level, 256)


def posterize_bits(level: float) -> int:
    return 4 - int_parameter(level, 4)


# --------------------------------------------------------------------------- randomness helpers

def _rand(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=generator))


def _randint(high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))


def _signed(value, generator):
    """AutoAugment's random sign: negate with probability 0.5."""
    return -value if _rand(generator) > 0.5 else value


def _fill_for(img: Image.Image, fill):
    if fill is None:
        fill = DEFAULT_FILL
    if isinstance(fill, (int, float)):
        fill = (int(fill),) * 3
    if img.mode == "L":
        return int(round(sum(fill[:3]) / 3))
    if img.mode == "RGBA":
        return tuple(fill[:3]) + (255,)
    return tuple(fill[:3])


def _as_rgb_or_l(img: Image.Image) -> Image.Image:
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


# --------------------------------------------------------------------------- the ops

def invert(img, level, generator=None, fill=None):
    return ImageOps.invert(_as_rgb_or_l(img))


def auto_contrast(img, level, generator=None, fill=None):
    return ImageOps.autocontrast(_as_rgb_or_l(img))


def equalize(img, level, generator=None, fill=None):
    return ImageOps.equalize(_as_rgb_or_l(img))


def contrast(img, level, generator=None, fill=None):
    return ImageEnhance.Contrast(img).enhance(enhance_factor(level))


def color(img, level, generator=None, fill=None):
    return ImageEnhance.Color(img).enhance(enhance_factor(level))


def brightness(img, level, generator=None, fill=None):
    return ImageEnhance.Brightness(img).enhance(enhance_factor(level))


def sharpness(img, level, generator=None, fill=None):
    return ImageEnhance.Sharpness(img).enhance(enhance_factor(level))


def solarize(img, level, generator=None, fill=None):
    return ImageOps.solarize(_as_rgb_or_l(img), solarize_threshold(level))


def posterize(img, level, generator=None, fill=None):
    return ImageOps.posterize(_as_rgb_or_l(img), posterize_bits(level))


def rotate(img, level, generator=None, fill=None):
    degrees = _signed(int_parameter(level, 30), generator)
    return img.rotate(degrees, fillcolor=_fill_for(img, fill))


def _affine(img, coeffs, fill):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.NEAREST,
                         fillcolor=_fill_for(img, fill))


def shear_x(img, level, generator=None, fill=None):
    s = _signed(float_parameter(level, 0.3), generator)
    return _affine(img, (1, s, 0, 0, 1, 0), fill)


def shear_y(img, level, generator=None, fill=None):
    s = _signed(float_parameter(level, 0.3), generator)
    return _affine(img, (1, 0, 0, s, 1, 0), fill)


def translate_x(img, level, generator=None, fill=None):
    t = _signed(int_parameter(level, 10), generator)
    return _affine(img, (1, 0, t, 0, 1, 0), fill)


def translate_y(img, level, generator=None, fill=None):
    t = _signed(int_parameter(level, 10), generator)
    return _affine(img, (1, 0, 0, 0, 1, t), fill)


def cutout_box(size: int, width: int, height: int,
               center: Optional[Tuple[int, int]] = None,
               generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
    """The (left, upper, right, lower) box of a ``size`` px cutout, as AutoAugment's
    ``create_cutout_mask``: centre uniform over the image, square clipped at the border."""
    if center is None:
        center = (_randint(width, generator), _randint(height, generator))
    cx, cy = center
    half = size // 2
    return (max(0, cx - half), max(0, cy - half), min(width, cx - half + size),
            min(height, cy - half + size))


def apply_cutout(img: Image.Image, size: int, generator=None, fill=CUTOUT_FILL,
                 center: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Fill a ``size`` x ``size`` square (clipped at the border) with ``fill``; returns a copy."""
    if size <= 0:
        return img
    img = img.copy()
    box = cutout_box(size, img.width, img.height, center, generator)
    if box[2] > box[0] and box[3] > box[1]:
        img.paste(_fill_for(img, fill), box)
    return img


def cutout(img, level, generator=None, fill=None):
    return apply_cutout(img, int_parameter(level, 20), generator, CUTOUT_FILL)


#: op name -> fn(img, level, generator, fill) -> img
OPS: dict = {
    "Invert": invert, "Contrast": contrast, "Rotate": rotate, "TranslateX": translate_x,
    "Sharpness": sharpness, "ShearY": shear_y, "TranslateY": translate_y,
    "AutoContrast": auto_contrast, "Equalize": equalize, "Solarize": solarize, "Color": color,
    "Posterize": posterize, "Brightness": brightness, "Cutout": cutout, "ShearX": shear_x,
}


def apply_op(img: Image.Image, name: str, level: float, generator=None, fill=None) -> Image.Image:
    """Apply one AutoAugment op by name at ``level`` (0..10), unconditionally."""
    try:
        fn = OPS[name]
    except KeyError:
        raise ValueError(f"unknown augmentation op {name!r}; known: {sorted(OPS)}") from None
    return fn(img, level, generator, fill)


class SubPolicy(NamedTuple):
    op: str
    prob: float
    level: int


#: The 15 MicroNet sub-policies <op, probability, level> (SPEC section 1).
MICRONET_SUBPOLICIES: Tuple[SubPolicy, ...] = tuple(SubPolicy(*t) for t in [
    ("Invert", 0.2, 2), ("Contrast", 0.4, 4), ("Rotate", 0.5, 1), ("TranslateX", 0.4, 3),
    ("Sharpness", 0.5, 3), ("ShearY", 0.3, 4), ("TranslateY", 0.6, 8), ("AutoContrast", 0.6, 3),
    ("Equalize", 0.5, 5), ("Solarize", 0.4, 4), ("Color", 0.5, 5), ("Posterize", 0.2, 2),
    ("Brightness", 0.4, 5), ("Cutout", 0.3, 3), ("ShearX", 0.1, 3),
])


def random_crop(img: Image.Image, size: Tuple[int, int], padding: int, generator=None,
                fill=0) -> Image.Image:
    """Zero-pad by ``padding`` on every side, then crop ``size`` (w, h) at a uniform offset
    (torchvision RandomCrop(size, padding) semantics)."""
    w, h = size
    if padding > 0:
        padded = Image.new(img.mode, (img.width + 2 * padding, img.height + 2 * padding),
                           _fill_for(img, fill))
        padded.paste(img, (padding, padding))
        img = padded
    x = _randint(img.width - w + 1, generator)
    y = _randint(img.height - h + 1, generator)
    return img.crop((x, y, x + w, y + h))


class MicroNetPolicy:
    """MicroNet training augmentation on a PIL image; returns a PIL image of the same size/mode.

    Per call: choose ``num_subpolicies`` (2) distinct sub-policies uniformly at random, apply each in
    sequence with its probability; then random crop (zero pad ``crop_padding``), horizontal flip
    (p=0.5), and a ``cutout`` px cutout. ``generator``: a torch.Generator, or None for torch's
    global RNG (use None inside DataLoader workers).

    ``last_subpolicies`` holds the indices chosen for the latest image (for inspection/tests).
    """

    def __init__(self, subpolicies: Sequence[SubPolicy] = MICRONET_SUBPOLICIES,
                 num_subpolicies: int = 2, crop_padding: int = 4, flip: bool = True,
                 cutout: int = 16, fill=DEFAULT_FILL,
                 generator: Optional[torch.Generator] = None):
        self.subpolicies = tuple(SubPolicy(*s) for s in subpolicies)
        if not 0 <= num_subpolicies <= len(self.subpolicies):
            raise ValueError("num_subpolicies must be in [0, len(subpolicies)]")
        for s in self.subpolicies:
            if s.op not in OPS:
                raise ValueError(f"unknown augmentation op {s.op!r}")
        self.num_subpolicies = num_subpolicies
        self.crop_padding = crop_padding
        self.flip = flip
        self.cutout = cutout
        self.fill = fill
        self.generator = generator
        self.last_subpolicies: Tuple[int, ...] = ()

    def choose(self) -> Tuple[int, ...]:
        perm = torch.randperm(len(self.subpolicies), generator=self.generator)
        return tuple(int(i) for i in perm[: self.num_subpolicies])

    def apply_subpolicy(self, index: int, img: Image.Image) -> Image.Image:
        op, prob, level = self.subpolicies[index]
        if _rand(self.generator) < prob:
            img = apply_op(img, op, level, self.generator, self.fill)
        return img

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"MicroNetPolicy expects a PIL image, got {type(img).__name__}")
        mode, size = img.mode, img.size
        chosen = self.choose()
        self.last_subpolicies = chosen
        for i in chosen:
            img = self.apply_subpolicy(i, img)
        if img.mode != mode:
            img = img.convert(mode)
        if self.crop_padding:
            img = random_crop(img, size, self.crop_padding, self.generator)
        if self.flip and _rand(self.generator) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.cutout:
            img = apply_cutout(img, self.cutout, self.generator, self.fill)
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_subpolicies={self.num_subpolicies}, "
                f"crop_padding={self.crop_padding}, flip={self.flip}, cutout={self.cutout})")
