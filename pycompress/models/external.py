"""Models from outside the zoo: ``torchvision:<name>``, ``timm:<name>`` and ``import:<module>:<function>``.

``pycompress.models.build`` (and every place that builds a model by name: recipes, checkpoints,
artifacts, ``pycompress eval``) sends a name with one of these prefixes here:

* ``torchvision:<name>``: a torchvision classification model (``torchvision.models.list_models(
  module=torchvision.models)``), built with ``weights=None`` (weights are never downloaded; start
  from a file with a recipe's ``weights``) and ``num_classes``; when ``in_channels != 3`` the first
  ``nn.Conv2d`` that takes 3 channels (the stem) is replaced by the same conv taking
  ``in_channels``, kaiming-initialised. ``args`` go to torchvision's builder (e.g. ``width_mult``
  for mobilenet_v2, ``dropout``).
* ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...,
  **args)``; needs timm (``pip install 'pycompress[timm]'``).
* ``import:<package.module>:<function>``: the user's own factory (any callable returning an
  ``nn.Module``, a class included; ``<function>`` may be dotted, ``Class.method``), called with the
  ``args`` as keyword arguments, plus ``in_channels=`` and ``num_classes=`` each when the
  factory's signature names that parameter (a ``**kwargs`` catch-all does not count: the dataset's
  values are passed only to a factory that asks for them by name). The module must be importable
  wherever the model is built again: when a run starts, when a checkpoint or an artifact is
  loaded (installed, or on PYTHONPATH).

Errors are ValueError (an unknown name, a missing module or package, a factory that returns
something other than an ``nn.Module``) or TypeError (an argument the factory does not take),
naming the model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["PREFIXES", "is_external", "check", "accepted_kwargs", "build", "check_device", "adapt_stem"]

PREFIXES = ("torchvision", "timm", "import")
TIMM_HINT = "pip install 'pycompress[timm]'"
# builder arguments that would load or download weights, or that the dataset decides
_TORCHVISION_RESERVED = ("weights", "weights_backbone", "progress", "num_classes", "in_channels")
_TIMM_RESERVED = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "num_classes",
    "in_chans",
)
_COMMON = ("in_channels", "num_classes")
# prefix -> (builder arguments refused in args, the builder's name for the input channels)
_RESERVED = {"torchvision": (_TORCHVISION_RESERVED, "in_channels"), "timm": (_TIMM_RESERVED, "in_chans")}


def is_external(name: Any) -> bool:
    """Whether ``name`` has one of the prefixes (``torchvision:``, ``timm:``, ``import:``)."""
    return isinstance(name, str) and name.split(":", 1)[0] in PREFIXES and ":" in name


def _split(name: str) -> Tuple[str, str]:
    prefix, _, rest = name.partition(":")
    if not rest:
        raise ValueError(f"model {name!r}: nothing after {prefix + ':'!r}; expected {_usage(prefix)}")
    return prefix, rest


def _usage(prefix: str) -> str:
    return {
        "torchvision": "torchvision:<model name>, e.g. torchvision:resnet18",
        "timm": "timm:<model name>, e.g. timm:resnet18",
        "import": "import:<package.module>:<function>, e.g. import:mypkg.nets:make_net",
    }[prefix]


# ------------------------------------------------------------------------------------ torchvision
def _torchvision_builder(name: str, target: str) -> Callable[..., nn.Module]:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if target not in known:
        import difflib

        close = difflib.get_close_matches(target, known, n=1)
        hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}: torchvision {torchvision.__version__} has no classification "
            f"model {target!r}; known: {', '.join(known)}"
        )
    return torchvision.models.get_model_builder(target)


def adapt_stem(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the first nn.Conv2d taking 3 channels by the same conv taking ``in_channels``."""
    for qual, m in model.named_modules():
        if type(m) is nn.Conv2d and m.in_channels == 3 and m.groups == 1:
            new = nn.Conv2d(
                in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                bias=m.bias is not None,
                padding_mode=m.padding_mode,
                device=m.weight.device,
                dtype=m.weight.dtype,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
            parent = model.get_submodule(qual.rpartition(".")[0]) if "." in qual else model
            setattr(parent, qual.rpartition(".")[2], new)
            return
    raise ValueError(
        f"model {name!r}: cannot adapt it to {in_channels} input channel(s): it has no plain nn.Conv2d "
        f"with 3 input channels to replace"
    )


def _build_torchvision(name: str, target: str, in_channels: int, num_classes: int, args: Dict[str, Any]):
    builder = _torchvision_builder(name, target)
    try:
        model = builder(weights=None, num_classes=num_classes, **args)
    except TypeError as exc:  # an argument the model class does not take
        raise TypeError(f"model {name!r}: {exc}") from None
    if in_channels != 3:
        adapt_stem(model, name, in_channels)
    return model


# ------------------------------------------------------------------------------------ timm
def _timm(name: str):
    try:
        import timm
    except ImportError as exc:
        raise ValueError(
            f"model {name!r} needs timm, which is not installed ({exc}): {TIMM_HINT}, or use a zoo, "
            f"torchvision: or import: model"
        ) from None
    return timm


def _check_timm(name: str, target: str):
    timm = _timm(name)
    is_model = getattr(timm, "is_model", None)
    known = is_model(target) if callable(is_model) else target in timm.list_models()
    if not known:
        raise ValueError(f"unknown model {name!r}: timm {getattr(timm, '__version__', '')} has no model {target!r}")
    return timm


def _build_timm(name: str, target: str, in_channels: int, num_classes: int, args: Dict[str, Any]):
    timm = _check_timm(name, target)
    return timm.create_model(target, pretrained=False, num_classes=num_classes, in_chans=in_channels, **args)


# ------------------------------------------------------------------------------------ import:
def _import_factory(name: str, target: str) -> Callable[..., Any]:
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(f"model {name!r}: expected {_usage('import')}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(
            f"model {name!r}: cannot import module {module!r} ({type(exc).__name__}: {exc}); the module "
            f"must be importable wherever the model is built or loaded (installed, or on PYTHONPATH)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {module}.{attr} is a {type(obj).__name__}, not a callable factory")
    return obj


def _signature(factory: Callable[..., Any]) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: pass the args and let the call decide
        return None


def _named(sig: Optional[inspect.Signature]) -> Dict[str, inspect.Parameter]:
    if sig is None:
        return {}
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p for p in sig.parameters.values() if p.kind in kinds}


def _takes_any(sig: Optional[inspect.Signature]) -> bool:
    return sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _build_import(name: str, target: str, in_channels: int, num_classes: int, args: Dict[str, Any]):
    factory = _import_factory(name, target)
    sig = _signature(factory)
    named = _named(sig)
    unknown = sorted(k for k in args if k not in named or k in _COMMON)
    if unknown and not _takes_any(sig):
        accepted = [k for k in named if k not in _COMMON]
        raise TypeError(
            f"model {name!r} got unexpected argument(s) {unknown}; it accepts: "
            f"{', '.join(accepted) if accepted else '(none besides in_channels, num_classes)'}"
        )
    common = {"in_channels": in_channels, "num_classes": num_classes}
    kwargs = {k: v for k, v in common.items() if k in named}
    try:
        model = factory(**kwargs, **args)
    except Exception as exc:  # noqa: BLE001 - the user's code: say whose call failed
        raise ValueError(f"model {name!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {name!r}: the factory returned {type(model).__name__} {str(model)[:80]!r}, not a torch.nn.Module"
        )
    return model


# ------------------------------------------------------------------------------------ public
def check(name: str) -> None:
    """Raise ValueError unless ``name`` resolves: a known torchvision / timm model (timm installed)
    or an importable callable. Builds nothing."""
    prefix, target = _split(name)
    if prefix == "torchvision":
        _torchvision_builder(name, target)
    elif prefix == "timm":
        _check_timm(name, target)
    else:
        _import_factory(name, target)


def accepted_kwargs(name: str) -> Optional[Dict[str, Any]]:
    """The architecture arguments ``name`` accepts with their defaults, or None when they cannot be
    listed (torchvision and timm builders pass ``**kwargs`` on; a factory with ``**kwargs``): the
    build then decides."""
    prefix, target = _split(name)
    if prefix != "import":
        return None
    sig = _signature(_import_factory(name, target))
    if _takes_any(sig):
        return None
    return {k: p.default for k, p in _named(sig).items() if k not in _COMMON}


def build(name: str, *, in_channels: int, num_classes: int, **args: Any) -> nn.Module:
    """Build the model a prefixed name describes (see the module docstring)."""
    prefix, target = _split(name)
    if prefix in _RESERVED:
        reserved, channels = _RESERVED[prefix]
        bad = sorted(k for k in args if k in reserved)
        if bad:
            raise ValueError(
                f"model {name!r}: {bad} cannot be set in args ({channels} and num_classes come from the "
                f"dataset; weights are never downloaded: start from a file with 'weights: PATH')"
            )
        builder = _build_torchvision if prefix == "torchvision" else _build_timm
        return builder(name, target, in_channels, num_classes, args)
    return _build_import(name, target, in_channels, num_classes, args)


@contextlib.contextmanager
def check_device(name: str) -> Iterator[None]:
    """Where a model built only to check a recipe is built: torchvision and timm models on the meta
    device (no memory, no initialisation: a check of a large model costs nothing), the zoo and
    ``import:`` factories (the user's code may compute with its tensors) on the CPU."""
    if is_external(name) and name.split(":", 1)[0] in ("torchvision", "timm"):
        with torch.device("meta"):
            yield
    else:
        yield
