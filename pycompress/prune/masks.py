"""Pruning masks attached to a model's layers, without changing the module classes.

A pruned layer (any module with a ``weight``: nn.Conv2d, nn.Linear, their QAT versions) carries

- ``weight_mask``: a persistent uint8 buffer, the bit-packed keep-mask of ``weight``
  (``pycompress.ops.pack_mask``: 1 bit per element, 32x smaller than a float mask);
- ``weight_shadow`` (only while masks are being re-selected, MicroNet's schedule): a persistent
  buffer with the dense weights that keep learning under the mask.

``weight`` itself always holds the masked weights (pruned entries exactly 0), so the forward pass,
the state_dict, evaluation, QAT and export see an ordinary layer with zeros in it; nothing runs in
the forward pass, which keeps ``torch.compile`` and deepcopy trivial. State-dict keys are
``<layer>.weight``, ``<layer>.weight_mask`` and ``<layer>.weight_shadow``; a fresh model gets the
buffers from a state dict with :func:`prepare_state_dict` before ``load_state_dict``.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..ops import apply_mask, pack_mask, packed_mask_bytes, unpack_mask

__all__ = [
    "MASK",
    "SHADOW",
    "attach_mask",
    "attach_masks",
    "get_mask",
    "masked_layers",
    "has_masks",
    "remove_masks",
    "apply_masks",
    "prepare_state_dict",
    "set_shadow",
    "drop_shadows",
    "shadowed_layers",
    "layer_weights",
]

MASK = "weight_mask"
SHADOW = "weight_shadow"


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight tensor to prune")
    return w


def masked_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers of ``model`` that carry a pruning mask, by qualified name."""
    return {n: m for n, m in model.named_modules() if MASK in m._buffers and m._buffers[MASK] is not None}


def has_masks(model: nn.Module) -> bool:
    return bool(masked_layers(model))


def shadowed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if SHADOW in m._buffers and m._buffers[SHADOW] is not None}


def layer_weights(model: nn.Module, names: Iterable[str], dense: bool = False) -> Dict[str, torch.Tensor]:
    """``{name: weight}`` of the named layers (detached); with ``dense`` the shadow weights where a
    layer has them."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in mods:
            raise ValueError(f"the model has no layer named {n!r}")
        m = mods[n]
        w = m._buffers.get(SHADOW) if dense else None
        out[n] = (w if w is not None else _weight(m, n)).detach()
    return out


def attach_mask(module: nn.Module, mask: torch.Tensor, name: str = "layer") -> None:
    """Attach (or replace) ``module``'s keep-mask and zero its pruned weights in place."""
    w = _weight(module, name)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask for {name!r} must be a bool tensor (True = keep)")
    if mask.shape != w.shape:
        raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}")
    packed = pack_mask(mask.to(w.device))
    old = module._buffers.get(MASK)
    if old is not None and old.shape == packed.shape and old.device == packed.device:
        old.copy_(packed)  # keep the buffer object (an optimizer or a compiled graph may hold it)
    else:
        module.register_buffer(MASK, packed, persistent=True)
    with torch.no_grad():
        apply_mask(w.detach(), module._buffers[MASK], inplace=True)


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach bool masks ``{layer name: mask}`` and zero the pruned weights."""
    mods = dict(model.named_modules())
    missing = [n for n in masks if n not in mods]
    if missing:
        raise ValueError(f"attach_masks: the model has no layer(s) {missing}")
    for n, mk in masks.items():
        attach_mask(mods[n], mk, n)


def get_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """The bool keep-mask of a layer (unpacked), or None when it has none."""
    packed = module._buffers.get(MASK)
    if packed is None:
        return None
    return unpack_mask(packed, module.weight.shape)


def apply_masks(model: nn.Module) -> None:
    """Zero the pruned weights of every masked layer again (after an optimizer that knows no masks)."""
    with torch.no_grad():
        for m in masked_layers(model).values():
            apply_mask(m.weight.detach(), m._buffers[MASK], inplace=True)


def set_shadow(module: nn.Module, dense: torch.Tensor) -> None:
    """Give a layer dense shadow weights (MicroNet's schedule)."""
    old = module._buffers.get(SHADOW)
    if old is not None and old.shape == dense.shape:
        old.copy_(dense)
    else:
        module.register_buffer(SHADOW, dense.detach().clone(), persistent=True)


def _drop_buffers(model: nn.Module, name: str) -> int:
    n = 0
    for m in model.modules():
        if name in m._buffers:
            del m._buffers[name]
            n += 1
    return n


def drop_shadows(model: nn.Module) -> int:
    """Remove every shadow buffer (the masks stay). Returns how many were removed."""
    return _drop_buffers(model, SHADOW)


def remove_masks(model: nn.Module) -> int:
    """Remove masks and shadows; the weights keep their zeros (they are now just a sparse tensor
    that training may fill again). Returns the number of layers unmasked."""
    drop_shadows(model)
    return _drop_buffers(model, MASK)


def prepare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Register empty mask / shadow buffers on the layers whose entries are in ``state_dict``, so
    ``model.load_state_dict(state_dict)`` restores a pruned model into a freshly built one."""
    mods = dict(model.named_modules())
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in (MASK, SHADOW):
            continue
        m = mods.get(prefix)
        if m is None:
            continue  # load_state_dict reports the unexpected key
        w = _weight(m, prefix)
        if leaf == MASK:
            want = packed_mask_bytes(w.numel())
            if value.dtype != torch.uint8 or value.shape != (want,):
                raise ValueError(
                    f"state dict entry {key!r} is not a packed mask for weight "
                    f"{tuple(w.shape)} (want uint8 [{want}], got {value.dtype} {tuple(value.shape)})"
                )
            if m._buffers.get(MASK) is None or m._buffers[MASK].shape != value.shape:
                m.register_buffer(MASK, torch.zeros(want, dtype=torch.uint8, device=w.device), persistent=True)
        elif m._buffers.get(SHADOW) is None or m._buffers[SHADOW].shape != value.shape:
            m.register_buffer(SHADOW, torch.zeros_like(w.detach()), persistent=True)
    # Layers with masks the state dict lacks are left alone: load_state_dict reports them missing.
