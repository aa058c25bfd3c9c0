"""The model registry: one name -> one factory, built with ``build(name, ...)``.

Every factory takes keyword-only ``in_channels`` and ``num_classes`` (the dataset decides them)
plus its own architecture arguments. ``build`` checks the arguments against the factory's
signature before calling it, so a typo is an error naming the model and the argument rather than
a silent default.

Names with a prefix (``torchvision:<name>``, ``timm:<name>``, ``import:<module>:<function>``) are
models from outside the zoo, resolved by :mod:`pycompress.models.external`; ``build``,
``check_name`` and ``accepted_kwargs`` take them too (``names`` lists the zoo only).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn

from . import external
from .external import is_external

__all__ = ["register", "register_alias", "build", "names", "accepted_kwargs", "check_name", "is_external"]

# The two arguments every model takes; build() supplies them.
_COMMON = ("in_channels", "num_classes")


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    fixed: Dict[str, Any] = field(default_factory=dict)  # set by an alias, not overridable
    target: str | None = None  # the model an alias points at


_REGISTRY: Dict[str, _Entry] = {}


def _check_new_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(*, in_channels, num_classes, **arch_kwargs) -> nn.Module``.

    The factory's own keyword parameters are the model's accepted arguments; ``build`` rejects
    anything else.
    """
    _check_new_name(name)

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = inspect.signature(factory).parameters
        missing = [a for a in _COMMON if a not in params]
        if missing:
            raise TypeError(f"model factory for {name!r} must accept {missing}")
        _REGISTRY[name] = _Entry(factory)
        return factory

    return deco


def register_alias(alias: str, target: str, **fixed: Any) -> None:
    """Register ``alias`` as ``target`` with some arguments fixed (e.g. resnet20 = cifar_resnet
    with depth=20). Passing a fixed argument to the alias is an error."""
    _check_new_name(alias)
    if target not in _REGISTRY:
        raise ValueError(f"alias {alias!r}: unknown target model {target!r}")
    base = _REGISTRY[target]
    allowed = _accepted(base)
    bad = sorted(set(fixed) - set(allowed))
    if bad:
        raise TypeError(f"alias {alias!r}: model {target!r} has no argument(s) {bad}")
    _REGISTRY[alias] = _Entry(base.factory, {**base.fixed, **fixed}, base.target or target)


def _accepted(entry: _Entry) -> List[str]:
    params = inspect.signature(entry.factory).parameters
    return [
        p.name
        for p in params.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in entry.fixed
    ]


def names() -> List[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(names())} (or torchvision:<name>, "
            f"timm:<name>, import:<package.module>:<function>)"
        ) from None


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a zoo model or a prefixed name that resolves (a known
    torchvision / timm model, an importable factory); builds nothing."""
    if is_external(name):
        external.check(name)
    else:
        _lookup(name)


def accepted_kwargs(name: str) -> Optional[Dict[str, Any]]:
    """The architecture arguments ``name`` accepts (besides in_channels / num_classes), with their
    defaults. None for a prefixed name whose arguments cannot be listed (torchvision, timm, a
    factory taking ``**kwargs``): building it decides."""
    if is_external(name):
        return external.accepted_kwargs(name)
    entry = _lookup(name)
    params = inspect.signature(entry.factory).parameters
    return {a: params[a].default for a in _accepted(entry) if a not in _COMMON}


def _check_positive_int(model: str, arg: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {model!r}: {arg} must be a positive int, got {value!r}")


def build(name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model, or one from outside the zoo (a prefixed name, see
    :mod:`pycompress.models.external`).

    Raises ValueError for an unknown name (listing the known ones) or an invalid argument value,
    and TypeError for an argument the model does not take (naming the model and the argument).
    """
    entry = None if is_external(name) else _lookup(name)
    _check_positive_int(name, "in_channels", in_channels)
    _check_positive_int(name, "num_classes", num_classes)
    if entry is None:
        model = external.build(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
        _record(model, name, kwargs, in_channels, num_classes)
        return model
    allowed = _accepted(entry)
    unknown = sorted(k for k in kwargs if k not in allowed or k in _COMMON)
    if unknown:
        fixed = sorted(k for k in unknown if k in entry.fixed)
        if fixed:
            raise TypeError(
                f"model {name!r} fixes argument(s) {fixed} (it is {entry.target!r} with "
                f"{ {k: entry.fixed[k] for k in fixed} }); build {entry.target!r} to change them"
            )
        extra = sorted(set(allowed) - set(_COMMON))
        raise TypeError(
            f"model {name!r} got unexpected argument(s) {unknown}; "
            f"it accepts: {', '.join(extra) if extra else '(none besides in_channels, num_classes)'}"
        )
    model = entry.factory(in_channels=in_channels, num_classes=num_classes, **entry.fixed, **kwargs)
    _record(model, name, kwargs, in_channels, num_classes)
    return model


def _record(model: nn.Module, name: str, kwargs: Dict[str, Any], in_channels: int, num_classes: int) -> None:
    # How to build it again (pycompress.export records it in artifacts); a plain attribute, so
    # deepcopy keeps it and state_dict ignores it.
    model._pycompress_build = {
        "model": name,
        "args": dict(kwargs),
        "in_channels": in_channels,
        "num_classes": num_classes,
    }
