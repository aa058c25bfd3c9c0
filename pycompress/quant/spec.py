"""QuantSpec: which layers prepare_qat quantizes, and how.

Resolution for each layer, in ``model.named_modules()`` order:

1. Selection: the layer's type is in ``types`` ("conv" = every nn.Conv2d, depthwise and grouped
   included; "linear" = nn.Linear), its qualified name matches at least one ``include`` regex
   (``re.search``; None = every layer) and no ``exclude`` regex.
2. Bit widths: ``weight_bits`` / ``act_bits``, then every ``overrides`` entry whose ``pattern``
   matches, in order (later entries win, only the keys an entry gives), then ``first`` for the
   first selected layer and ``last`` for the last one ("skip" leaves that layer float; a dict
   overrides its bits). First / last are applied after the overrides, so they always hold.
3. A layer left with neither weight nor activation bits stays float.

Every quantized layer gets the same scale modes, ``act_signed``, ``act_observer`` ("minmax" |
"percentile": how ``calibrate`` turns the batches into an activation range, see
pycompress.quant.quantizer) and ``act_percentile`` (p in (50, 100], used by "percentile").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from ..layer_spec import LAYER_TYPES, LayerSelectionSpec, check_regex
from .quantizer import DEFAULT_PERCENTILE, OBSERVERS, check_percentile

__all__ = ["QuantSpec", "LAYER_TYPES", "WEIGHT_SCALES", "ACT_SCALES", "OBSERVERS", "DEFAULT_PERCENTILE"]

WEIGHT_SCALES = ("max", "lsq", "frozen", "als")
ACT_SCALES = ("frozen", "lsq")
_BITS_KEYS = ("weight_bits", "act_bits")

# Settings added after specs were first serialised, with their defaults (see QuantSpec.to_dict).
_LATER_DEFAULTS = {"act_observer": "minmax", "act_percentile": DEFAULT_PERCENTILE}

Position = Union[None, str, Dict[str, Optional[int]]]


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"QuantSpec: {key}: {msg}")


def _check_bits(key: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16):
        _fail(key, f"must be an int in 1..16 or null, got {value!r}")


def _check_regex(key: str, p) -> None:
    check_regex(_fail, key, p)


def _check_bits_dict(key: str, d, extra: tuple = ()) -> dict:
    if not isinstance(d, Mapping):
        _fail(key, f"must be a mapping, got {d!r}")
    allowed = extra + _BITS_KEYS
    unknown = [k for k in d if k not in allowed]
    if unknown:
        _fail(f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    for k in _BITS_KEYS:
        if k in d:
            _check_bits(f"{key}.{k}", d[k])
    if not any(k in d for k in _BITS_KEYS):
        _fail(key, "give weight_bits and/or act_bits")
    return dict(d)


def _check_position(key: str, value) -> Position:
    if value is None or value == "skip":
        return value
    if isinstance(value, str):
        _fail(key, f"must be null, 'skip' or a mapping with weight_bits / act_bits, got {value!r}")
    return _check_bits_dict(key, value)


@dataclass
class QuantSpec(LayerSelectionSpec):
    """Layer selection and settings for prepare_qat (see the module docstring for the resolution order).

    weight_bits / act_bits: int 1..16 or None (no quantizer). types: subset of {"conv", "linear"}.
    include / exclude: regexes on qualified names (include None = all). first / last: None, "skip" or
    {"weight_bits"?, "act_bits"?}. overrides: [{"pattern", "weight_bits"?, "act_bits"?}], later wins.
    weight_scale: "max" | "lsq" | "frozen" | "als" (MicroNet's alternating-least-squares scale, refit
    once per epoch by pycompress.quant.ALSRefit; see pycompress.quant.quantizer). act_scale:
    "frozen" | "lsq". act_signed: "auto" | True | False. act_observer: "minmax" | "percentile".
    act_percentile: p in (50, 100] (default 99.99).
    calib_batches: batches calibrate() uses by default.
    """

    _fail = staticmethod(_fail)

    weight_bits: Optional[int] = 8
    act_bits: Optional[int] = 8
    types: List[str] = field(default_factory=lambda: list(LAYER_TYPES))
    include: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)
    first: Position = None
    last: Position = None
    overrides: List[Dict[str, Any]] = field(default_factory=list)
    weight_scale: str = "max"
    act_scale: str = "frozen"
    act_signed: Union[str, bool] = "auto"
    act_observer: str = "minmax"
    act_percentile: float = DEFAULT_PERCENTILE
    calib_batches: int = 4

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        self._check_selection()
        self.first = _check_position("first", self.first)
        self.last = _check_position("last", self.last)
        if isinstance(self.overrides, (str, Mapping)) or not isinstance(self.overrides, (list, tuple)):
            _fail(
                "overrides",
                f"must be a list of mappings with pattern and weight_bits / act_bits, got {self.overrides!r}",
            )
        overrides = []
        for i, o in enumerate(self.overrides):
            key = f"overrides[{i}]"
            o = _check_bits_dict(key, o, extra=("pattern",))
            if "pattern" not in o:
                _fail(key, "needs a 'pattern' (a regular expression on the layer name)")
            _check_regex(f"{key}.pattern", o["pattern"])
            overrides.append(o)
        self.overrides = overrides
        if self.weight_scale not in WEIGHT_SCALES:
            _fail("weight_scale", f"must be one of {list(WEIGHT_SCALES)}, got {self.weight_scale!r}")
        if self.act_scale not in ACT_SCALES:
            _fail("act_scale", f"must be one of {list(ACT_SCALES)}, got {self.act_scale!r}")
        if not (self.act_signed == "auto" or isinstance(self.act_signed, bool)):
            _fail("act_signed", f"must be 'auto', true or false, got {self.act_signed!r}")
        if self.act_observer not in OBSERVERS:
            _fail("act_observer", f"must be one of {list(OBSERVERS)}, got {self.act_observer!r}")
        if not check_percentile(self.act_percentile):
            _fail("act_percentile", f"must be a number in (50, 100], got {self.act_percentile!r}")
        self.act_percentile = float(self.act_percentile)
        cb = self.calib_batches
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 1:
            _fail("calib_batches", f"must be an int >= 1, got {cb!r}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict; ``from_dict(spec.to_dict()) == spec``. act_observer /
        act_percentile (added later) are left out while at their defaults, so a spec written before
        they existed serialises exactly as it did."""
        d = super().to_dict()
        for key, default in _LATER_DEFAULTS.items():
            if d.get(key) == default:
                del d[key]
        return d

    # ---------------------------------------------------------------- resolution

    def bits_for(self, name: str, is_first: bool, is_last: bool) -> Optional[Dict[str, Optional[int]]]:
        """{"weight_bits", "act_bits"} for a selected layer, or None if it stays float."""
        bits = {"weight_bits": self.weight_bits, "act_bits": self.act_bits}
        for o in self.overrides:
            if re.search(o["pattern"], name):
                bits.update({k: o[k] for k in _BITS_KEYS if k in o})
        for applies, rule in ((is_first, self.first), (is_last, self.last)):
            if not applies or rule is None:
                continue
            if rule == "skip":
                return None
            bits.update({k: rule[k] for k in _BITS_KEYS if k in rule})
        if bits["weight_bits"] is None and bits["act_bits"] is None:
            return None
        return bits
