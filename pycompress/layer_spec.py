"""What the strict layer specs (pycompress.quant.QuantSpec, pycompress.prune.PruneSpec) share:
``from_dict`` / ``to_dict`` with unknown keys refused, and the layer selection by type and name
regexes (``types``, ``include``, ``exclude``), validated with errors that name the spec and the key."""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from typing import Any, Callable, Dict, List, Mapping, Optional

__all__ = ["LAYER_TYPES", "LayerSelectionSpec", "check_regex", "check_regex_list"]

LAYER_TYPES = ("conv", "linear")

Fail = Callable[[str, str], None]


def check_regex(fail: Fail, key: str, p) -> None:
    if not isinstance(p, str):
        fail(key, f"must be a string (a regular expression), got {p!r}")
    try:
        re.compile(p)
    except re.error as exc:
        fail(key, f"is not a valid regular expression ({exc}): {p!r}")


def check_regex_list(fail: Fail, key: str, value, allow_none: bool) -> Optional[List[str]]:
    if value is None and allow_none:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        fail(key, f"must be a list of regular expressions, got {value!r}")
    for i, p in enumerate(value):
        check_regex(fail, f"{key}[{i}]", p)
    return list(value)


class LayerSelectionSpec:
    """Mixin for a dataclass spec with ``types``, ``include`` and ``exclude`` fields. Subclasses set
    ``_fail`` (a function raising ValueError with the spec's name, the key and the message)."""

    _fail: Fail

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a plain dict (e.g. a recipe's YAML); unknown keys, bad types or values raise ValueError."""
        if isinstance(d, cls):
            return copy.deepcopy(d)
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping of settings, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            cls._fail(str(unknown[0]), f"unknown key; allowed keys: {', '.join(known)}")
        return cls(**copy.deepcopy(dict(d)))

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict; ``from_dict(spec.to_dict()) == spec``."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def _check_selection(self) -> None:
        fail = type(self)._fail
        if isinstance(self.types, str) or not isinstance(self.types, (list, tuple)) or not self.types:
            fail("types", f"must be a non-empty list drawn from {list(LAYER_TYPES)}, got {self.types!r}")
        for i, t in enumerate(self.types):
            if t not in LAYER_TYPES:
                fail(f"types[{i}]", f"must be one of {list(LAYER_TYPES)}, got {t!r}")
        self.types = list(dict.fromkeys(self.types))
        self.include = check_regex_list(fail, "include", self.include, allow_none=True)
        if self.include is not None and not self.include:
            fail("include", "an empty list selects nothing; leave it out (or null) to include every layer")
        self.exclude = check_regex_list(fail, "exclude", self.exclude, allow_none=False)

    def selects(self, name: str, layer_type: Optional[str]) -> bool:
        """Whether a layer of this type and qualified name is selected (before first / last)."""
        if layer_type not in self.types:
            return False
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)
