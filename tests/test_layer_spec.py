"""pycompress.layer_spec: what the strict layer specs share. from_dict / to_dict (unknown keys and
non-mappings refused, round trip, deep copies), the layer selection (types, include, exclude) with
its validation errors naming the spec and the key, and selects(); on a spec defined here and on
the two real ones (QuantSpec, PruneSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from pycompress.layer_spec import LAYER_TYPES, LayerSelectionSpec, check_regex, check_regex_list
from pycompress.prune import PruneSpec
from pycompress.quant import QuantSpec


def _fail(key, msg):
    raise ValueError(f"ToySpec: {key}: {msg}")


@dataclass
class ToySpec(LayerSelectionSpec):
    """A minimal spec built like QuantSpec / PruneSpec: the selection fields plus one setting."""

    _fail = staticmethod(_fail)

    bits: int = 8
    types: List[str] = field(default_factory=lambda: list(LAYER_TYPES))
    include: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)

    def __post_init__(self):
        self._check_selection()


def raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- regex helpers


def collect():
    """A fail function that records instead of raising (to see every message check_* sends)."""
    seen = []

    def fail(key, msg):
        seen.append((key, msg))
        raise ValueError(f"{key}: {msg}")

    return seen, fail


def test_check_regex():
    seen, fail = collect()
    check_regex(fail, "include[0]", r"^layer\d+\.conv$")
    assert seen == []
    with pytest.raises(ValueError):
        check_regex(fail, "include[1]", "conv(")
    assert seen[-1][0] == "include[1]" and "is not a valid regular expression" in seen[-1][1]
    assert "'conv('" in seen[-1][1]
    with pytest.raises(ValueError):
        check_regex(fail, "exclude[0]", 3)
    assert seen[-1] == ("exclude[0]", "must be a string (a regular expression), got 3")


def test_check_regex_list():
    _, fail = collect()
    assert check_regex_list(fail, "exclude", ("a", "b.*"), allow_none=False) == ["a", "b.*"]
    assert check_regex_list(fail, "include", None, allow_none=True) is None
    for bad in (None, "fc", {"fc": 1}, 5):
        with pytest.raises(ValueError, match="exclude: must be a list of regular expressions"):
            check_regex_list(fail, "exclude", bad, allow_none=False)
    with pytest.raises(ValueError, match=r"include\[1\]: is not a valid regular expression"):
        check_regex_list(fail, "include", ["ok", "[unclosed"], allow_none=True)


# ----------------------------------------------------------------------------- from_dict / to_dict


def test_defaults_and_round_trip():
    spec = ToySpec()
    assert spec.types == ["conv", "linear"] and spec.include is None and spec.exclude == []
    d = {"bits": 4, "types": ["linear"], "include": ["^fc"], "exclude": ["head"]}
    spec = ToySpec.from_dict(d)
    assert (spec.bits, spec.types, spec.include, spec.exclude) == (4, ["linear"], ["^fc"], ["head"])
    assert spec.to_dict() == d
    assert ToySpec.from_dict(spec.to_dict()) == spec
    assert list(spec.to_dict()) == ["bits", "types", "include", "exclude"]  # field order


def test_from_dict_copies_its_input_and_to_dict_copies_the_spec():
    d = {"types": ["conv"], "exclude": ["a"]}
    spec = ToySpec.from_dict(d)
    d["exclude"].append("b")
    d["types"].append("linear")
    assert spec.exclude == ["a"] and spec.types == ["conv"]
    out = spec.to_dict()
    out["exclude"].append("c")
    assert spec.exclude == ["a"]


def test_from_dict_of_a_spec_is_a_deep_copy():
    spec = ToySpec(exclude=["x"])
    again = ToySpec.from_dict(spec)
    assert again == spec and again is not spec and again.exclude is not spec.exclude


def test_from_dict_refuses_unknown_keys_naming_the_allowed_ones():
    msg = raises("ToySpec: bitz: unknown key", ToySpec.from_dict, {"bits": 4, "bitz": 4})
    assert "allowed keys: bits, types, include, exclude" in msg


@pytest.mark.parametrize("value", [["types"], "types: [conv]", 3, None])
def test_from_dict_refuses_a_non_mapping(value):
    raises(f"ToySpec: expected a mapping of settings, got {type(value).__name__}", ToySpec.from_dict, value)


# ----------------------------------------------------------------------------- selection validation


@pytest.mark.parametrize(
    "kwargs,key,words",
    [
        ({"types": []}, "types", "must be a non-empty list drawn from ['conv', 'linear']"),
        ({"types": "conv"}, "types", "must be a non-empty list"),
        ({"types": None}, "types", "must be a non-empty list"),
        ({"types": ["conv", "bn"]}, "types[1]", "must be one of ['conv', 'linear'], got 'bn'"),
        ({"types": ["Conv"]}, "types[0]", "got 'Conv'"),
        ({"include": []}, "include", "an empty list selects nothing"),
        ({"include": "fc"}, "include", "must be a list of regular expressions, got 'fc'"),
        ({"include": ["fc", "("]}, "include[1]", "is not a valid regular expression"),
        ({"include": [1]}, "include[0]", "must be a string (a regular expression), got 1"),
        ({"exclude": None}, "exclude", "must be a list of regular expressions, got None"),
        ({"exclude": "head"}, "exclude", "must be a list of regular expressions"),
        ({"exclude": ["*"]}, "exclude[0]", "is not a valid regular expression"),
    ],
)
def test_bad_selection_is_refused_naming_spec_and_key(kwargs, key, words):
    msg = raises(words, ToySpec.from_dict, kwargs)
    assert msg.startswith(f"ToySpec: {key}: "), msg


def test_selection_is_normalised():
    spec = ToySpec.from_dict({"types": ("linear", "conv", "linear"), "include": ("a",), "exclude": ("b",)})
    assert spec.types == ["linear", "conv"]  # duplicates dropped, order kept
    assert spec.include == ["a"] and spec.exclude == ["b"]  # tuples become lists (YAML / JSON friendly)


# ----------------------------------------------------------------------------- selects


def test_selects_by_type():
    spec = ToySpec(types=["conv"])
    assert spec.selects("features.0", "conv")
    assert not spec.selects("features.0", "linear")
    assert not spec.selects("features.0", None)  # a layer of no selectable type


def test_selects_include_and_exclude_search_the_qualified_name():
    spec = ToySpec(include=[r"^layer\d", "classifier"], exclude=[r"\.downsample\."])
    assert spec.selects("layer1.0.conv1", "conv")
    assert spec.selects("model.classifier", "linear")  # re.search: anywhere in the name
    assert not spec.selects("stem.conv", "conv")  # matches no include
    assert not spec.selects("layer2.0.downsample.0", "conv")  # excluded wins over included
    everything = ToySpec(exclude=["fc$"])
    assert everything.selects("stem.conv", "conv") and not everything.selects("head.fc", "linear")


# ----------------------------------------------------------------------------- the real specs


@pytest.mark.parametrize(
    "cls,base",
    [(QuantSpec, {}), (PruneSpec, {"criterion": "layer_magnitude", "sparsity": 0.5})],
    ids=["QuantSpec", "PruneSpec"],
)
def test_real_specs_share_the_selection_rules(cls, base):
    name = cls.__name__
    raises(f"{name}: nope: unknown key", cls.from_dict, {**base, "nope": 1})
    raises(f"{name}: types[0]: must be one of ['conv', 'linear']", cls.from_dict, {**base, "types": ["norm"]})
    raises(f"{name}: include: an empty list selects nothing", cls.from_dict, {**base, "include": []})
    raises(f"{name}: exclude[0]: is not a valid regular expression", cls.from_dict, {**base, "exclude": ["("]})
    raises(f"{name}: expected a mapping of settings", cls.from_dict, ["conv"])
    spec = cls.from_dict({**base, "types": ["linear"], "exclude": ["head"]})
    assert cls.from_dict(spec.to_dict()) == spec
    assert spec.selects("body.fc", "linear") and not spec.selects("head", "linear")
    assert not spec.selects("body.conv", "conv")
