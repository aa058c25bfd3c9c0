"""FakeQuantizer: fake-quantization of one tensor (a weight or an activation) for QAT.

Math (zero point is always 0, so the grid is symmetric around 0):

    grid     signed:   [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
             unsigned: [qmin, qmax] = [0, 2^b - 1]
    forward  y = s_c * clamp(rint(x / s_c), qmin, qmax)         (pycompress.ops.fake_quantize)
    backward dy/dx = 1 inside the clamp range, 0 outside (straight-through estimator);
             for a learned scale (LSQ) dL/ds_c = g * sum over channel c of
             (y - x)/s_c inside, qmin or qmax where clamped, with g = 1 / sqrt(n * max(qmax, 1)).

Scale from a range (``scale_from_range``): with m = max|x_c| (signed) or max(x_c, 0) (unsigned),

    s_c = m / qmax      with qmax = 2^(b-1) - 1 (signed; 1 for 1 bit, whose grid is [-1, 0]) or
                        2^b - 1 (unsigned: MicroNet's activation scale max|x| / (2^b - 1))
    s_c = 1.0           when m == 0 (an all-zero / fully pruned channel: every code is 0, so the
                        output is exactly 0 and no NaN or inf can appear)

Why qmax and not 2^(b-1) for signed grids (MicroNet's initial a_c = max|w_c| / 2^(b-1)): with
2^(b-1), the largest positive value of every channel maps to 2^(b-1), is clamped to qmax, and so
gets no straight-through gradient; in mode "max" that weight would never receive the task gradient.
Dividing by qmax keeps every value inside the clamp range (the symmetric "narrow range"
[-qmax, qmax] of TensorRT-style weight quantization; the code -2^(b-1) stays unused by "max").

Scale modes:
    "max"     recomputed from the tensor on every forward (detached, no gradient). For weights.
    "frozen"  computed once (``init_from`` for weights, ``calibrate`` for activations), a buffer.
    "lsq"     an ``nn.Parameter`` initialised like "frozen", then learned with the LSQ gradient.
              The forward uses ``max(s, eps)`` (eps = 2^-23, torch.ao's choice) with a
              straight-through gradient, so an optimizer step that pushes s below eps never
              produces a non-positive scale and the parameter can still recover.
    "als"     weights only (signed): MicroNet's alternating-least-squares scale, a buffer set by
              ``als_scale`` from the weight when the quantizer is initialised (``init_from``) and
              again on every ``refit`` (pycompress.quant.ALSRefit: once per epoch), frozen in
              between; the gradient reaches the weight straight through, as in every mode.

ALS scale (``als_scale``; mode "als"), per channel c, w = the channel's values (one row of
w.reshape(C, -1)), [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]:

    a   = max|w| / 2^(b-1)                                  (MicroNet's init; floored at fp32's tiny)
    repeat ALS_ITERS (100) times:
        B = clamp(rint(w * (1 / a)), qmin, qmax)            (fp32, exactly the forward's codes)
        a = <w, B> / <B, B>                                 (sums in fp64, the result rounded to fp32)
    stopping early once a no longer changes (a fixed point: more iterations would not change it).

Each half-step minimises sum (w - a B)^2 over one of a, B (the least-squares a for fixed codes;
the nearest clamped grid point for a fixed a), so the squared error never exceeds the init's
(up to floating-point rounding).
Unlike "max", the init divides by 2^(b-1), not by qmax: the largest weight starts clamped to qmax
(MicroNet's formula; ALS moves a from there). A row whose update would divide by <B, B> = 0 keeps
its previous a (cannot happen for a nonzero row after the init with b >= 2; guarded). An all-zero
(fully pruned) row gets scale 0: stored, reported by ``weight_codes`` and exported as 0, with
codes 0. fake_quantize needs positive scales, so the forward passes ``kernel_scale(scale)``:
ZERO_SCALE_STANDIN = 2^64 in place of a 0. Every finite value of magnitude below 2^63 then has
code 0, so a scale-0 channel is exactly 0 in the forward whatever its weights (the a -> 0 limit
of a * clamp(rint(w / a)); a channel that is all zero stays 0 with any stand-in), and its
gradient passes straight through (code 0 lies inside the clamp range), so a zero row that
training revives gets a positive scale at the next refit. The result depends on the weight alone
(deterministic: the same on every process of a DDP run).

n in the LSQ factor g is the number of elements per channel for a weight (LSQ's N_W) and the
number of elements per sample (per channel, if per-channel) for an activation (LSQ's N_F).

Observers (how calibration turns the batches it sees into a range; ``observer=``):
    "minmax"      min_val = min over batches of min(x), max_val = max over batches of max(x).
    "percentile"  with p = ``percentile`` in (50, 100], for each calibration batch
                      q_lo = quantile(x, 1 - p/100),   q_hi = quantile(x, p/100)
                  (torch.quantile, linear interpolation; per channel along ``axis`` for a
                  per-channel quantizer, per tensor otherwise), computed in fp32 on at most 2^24
                  elements: a larger batch is subsampled deterministically, every k-th element of
                  the flattened tensor (per channel: every k-th element of each channel), with
                  k = ceil(numel / 2^24). Over the batches q_lo and q_hi are averaged (the mean
                  of the per-batch percentiles, as NNCF's / TensorRT's "mean percentile"), and
                  the scale is ``scale_from_range(mean q_lo, mean q_hi, ...)``, exactly as for
                  min-max. The true minimum is tracked as well: "auto" signedness is decided by
                  it (unsigned iff the true observed minimum is >= 0), not by q_lo. min_val /
                  max_val hold the averaged q_lo / q_hi, what the scale was computed from.
                  p = 100 is min-max exactly (the extremes over all batches, not the mean of the
                  per-batch extremes; no subsampling), so p = 100 gives the min-max result bit
                  for bit; for p < 100 the batch means apply, so p -> 100 is not continuous at
                  100 when there are several batches.
The observer governs calibration only (``begin_calibration`` / ``end_calibration``, driven by
pycompress.quant.calibrate); ``init_from`` (weights) and mode "max" always use the exact min / max.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from ..ops import fake_quantize, quant_range
from ..ops.fake_quantize import check_scale_values

__all__ = [
    "FakeQuantizer",
    "als_scale",
    "kernel_scale",
    "ALS_ITERS",
    "ZERO_SCALE_STANDIN",
    "scale_from_range",
    "scale_divisor",
    "LSQ_EPS",
    "MODES",
    "KINDS",
    "OBSERVERS",
    "DEFAULT_PERCENTILE",
    "QUANTILE_MAX_ELEMENTS",
    "check_percentile",
]

LSQ_EPS = 2.0**-23  # torch.finfo(torch.float32).eps, as torch.ao's _LearnableFakeQuantize
_TINY = torch.finfo(torch.float32).tiny  # floor of computed scales: keeps 1/s finite in fp32
MODES = ("max", "frozen", "lsq", "als")
ALS_ITERS = 100  # MicroNet's alternating-least-squares iterations (mode "als")
ZERO_SCALE_STANDIN = 2.0**64  # what fake_quantize gets for an "als" scale of 0 (see kernel_scale)
KINDS = ("weight", "act")
OBSERVERS = ("minmax", "percentile")
DEFAULT_PERCENTILE = 99.99
QUANTILE_MAX_ELEMENTS = 2**24  # the percentile observer subsamples larger batches to this many

Signed = Union[bool, str]


def scale_divisor(bits: int, signed: bool) -> int:
    """The divisor of the range, the grid's qmax: 2^(b-1) - 1 signed (1 for 1 bit), 2^b - 1 unsigned."""
    return max(2 ** (bits - 1) - 1, 1) if signed else 2**bits - 1


def scale_from_range(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """fp32 scale per channel from observed min / max (see the module docstring); 1.0 where the range is 0."""
    mn, mx = min_val.float(), max_val.float()
    m = torch.maximum(-mn, mx) if signed else mx.clamp_min(0.0)
    s = (m / scale_divisor(bits, signed)).clamp_min(_TINY)
    return torch.where(m > 0, s, torch.ones_like(s))


def kernel_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale to pass to fake_quantize for a stored scale that may hold 0 (mode "als": an
    all-zero row): ``scale`` where it is > 0, ZERO_SCALE_STANDIN (2^64) where it is 0. Every
    finite value of magnitude below 2^63 gets code 0 under the stand-in, so the output of such a
    channel is exactly 0 and its gradient passes straight through. Identity on positive scales."""
    return torch.where(scale == 0, torch.full_like(scale, ZERO_SCALE_STANDIN), scale)


def als_scale(w: torch.Tensor, bits: int, iters: int = ALS_ITERS) -> torch.Tensor:
    """MicroNet's alternating-least-squares scale of each row of ``w.reshape(C, -1)``, C = w.shape[0]:
    fp32, shape [C], on w's device (the module docstring gives the iteration). Signed grid
    [-2^(b-1), 2^(b-1) - 1]; init max|w_c| / 2^(b-1); ``iters`` ALS iterations (0: the init);
    an all-zero row gives 0. Vectorised over the rows and deterministic. w is read in fp32
    (detached) and must be finite (ValueError otherwise)."""
    from ..ops import quant_range

    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"als_scale: bits must be an int in 1..16, got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"als_scale: iters must be an int >= 0, got {iters!r}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() == 0:
        raise ValueError(
            "als_scale: w must be a floating-point tensor with at least 1 dimension (rows = w.shape[0]), got "
            + (f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__)
        )
    c = w.shape[0]
    rows = w.detach().reshape(c, -1).float()
    if rows.shape[1] == 0:
        return torch.zeros(c, dtype=torch.float32, device=w.device)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("als_scale: w holds inf or NaN")
    qmin, qmax = quant_range(bits, True)
    m = rows.abs().amax(dim=1)
    live = m > 0  # rows with a nonzero entry; the others keep scale 0
    zero = torch.zeros_like(m)
    a = torch.where(live, (m / 2 ** (bits - 1)).clamp_min(_TINY), zero)
    rows64 = rows.double()
    for _ in range(iters):
        inv = torch.reciprocal(torch.where(live, a, torch.ones_like(a)))  # same fp32 product as the kernels
        b = torch.round(rows * inv[:, None]).clamp_(qmin, qmax).double()
        num = (rows64 * b).sum(dim=1)
        den = (b * b).sum(dim=1)
        fit = (num / den.clamp_min(1.0)).float().clamp_min(_TINY)
        new = torch.where(live & (den > 0), fit, a)
        if torch.equal(new, a):
            break
        a = new
    return a


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"FakeQuantizer: bits must be an int in 1..16, got {bits!r}")
    return bits


def check_percentile(value) -> bool:
    """Whether value is a valid percentile: a real number in (50, 100] (not a bool)."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 50 < value <= 100
    )


def _percentiles(x: torch.Tensor, axis: Optional[int], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (quantile(x, 1 - p/100), quantile(x, p/100)) per channel along axis, shape [C]; per
    tensor: shape [1]. At most QUANTILE_MAX_ELEMENTS elements enter torch.quantile (a strided,
    deterministic subsample of larger tensors)."""
    xd = x.detach()
    rows = xd.reshape(1, -1) if axis is None else xd.movedim(axis, 0).reshape(xd.shape[axis], -1)
    c, n = rows.shape
    step = max(1, -(-c * n // QUANTILE_MAX_ELEMENTS))  # ceil
    if step > 1:
        rows = rows[:, ::step]
    rows = rows.float()
    q = torch.tensor([1.0 - p / 100.0, p / 100.0], dtype=torch.float32, device=rows.device)
    lo, hi = torch.quantile(rows, q, dim=1)
    return lo, hi


def _minmax(x: torch.Tensor, axis: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (min, max) of x per channel along axis, shape [C]; per tensor: shape [1]."""
    if axis is None:
        mn, mx = torch.aminmax(x.detach())
        return mn.float().reshape(1), mx.float().reshape(1)
    dims = [d for d in range(x.dim()) if d != axis]
    xd = x.detach()
    if not dims:
        return xd.float(), xd.float()
    return xd.amin(dim=dims).float(), xd.amax(dim=dims).float()


class _ClampMinSTE(torch.autograd.Function):
    """max(s, eps) in the forward, identity gradient: the scale used is never <= 0, and a learned
    scale an optimizer pushed below eps still gets its gradient, so it can recover."""

    @staticmethod
    def forward(ctx, s, eps):
        return s.clamp_min(eps)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor: ``y = s * clamp(rint(x / s), qmin, qmax)``, zero point 0.

    Args:
        bits: 1..16.
        signed: True, False, or "auto" (decided at calibration: unsigned iff the observed minimum
            is >= 0, e.g. after a ReLU; MicroNet's rule). "auto" needs mode "frozen" or "lsq".
        axis: None for one scale per tensor, else the channel axis (one scale per channel).
        num_channels: x.shape[axis] (the length of the per-channel scale); ignored when axis is None.
        mode: "max" | "frozen" | "lsq" | "als" (see the module docstring; "als" needs kind "weight"
            and signed=True).
        kind: "weight" or "act"; decides the LSQ gradient factor and the error messages.
        eps: the floor of a learned (lsq) scale.
        name: the module's qualified name, used in error messages (prepare_qat / calibrate set it).
        observer: "minmax" | "percentile": how calibration derives the range (module docstring);
            "percentile" needs mode "frozen" or "lsq".
        percentile: p in (50, 100] for observer "percentile" (kept, unused, for "minmax").

    State (in the state dict): ``scale`` [C] (a Parameter in "lsq" mode, else a buffer; in "max"
    mode the scale of the last forward; in "als" mode 0 for an all-zero row), ``signed`` and
    ``calibrated`` (0-d bool), ``min_val`` / ``max_val`` [C] (the range of the last calibration,
    ``init_from`` or ``refit``; for the percentile
    observer the averaged percentiles the scale came from). bits / mode / axis / observer are
    configuration, recorded by ``pycompress.quant.qat_plan``.

    An activation quantizer is calibrated by ``pycompress.quant.calibrate`` (it observes min / max
    over a few batches, passing data through unchanged, then sets the scale); a weight quantizer
    is initialised from its weight with ``init_from`` (QuantConv2d / QuantLinear do it); an "als"
    one is refit from its (current) weight with ``refit`` (pycompress.quant.refit_als /
    ALSRefit); loading a state dict keeps the loaded scale. Using a "frozen", "lsq" or "als"
    quantizer before that raises RuntimeError.
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: Signed = True,
        axis: Optional[int] = None,
        num_channels: int = 1,
        mode: str = "frozen",
        kind: str = "act",
        eps: float = LSQ_EPS,
        name: str = "",
        observer: str = "minmax",
        percentile: float = DEFAULT_PERCENTILE,
        device=None,
    ):
        super().__init__()
        self.bits = _check_bits(bits)
        if signed not in (True, False, "auto") or (signed != "auto" and not isinstance(signed, bool)):
            raise ValueError(f"FakeQuantizer: signed must be True, False or 'auto', got {signed!r}")
        if mode not in MODES:
            raise ValueError(f"FakeQuantizer: mode must be one of {MODES}, got {mode!r}")
        if kind not in KINDS:
            raise ValueError(f"FakeQuantizer: kind must be one of {KINDS}, got {kind!r}")
        if mode == "max" and signed == "auto":
            raise ValueError("FakeQuantizer: mode 'max' needs signed=True or False ('auto' is decided at calibration)")
        if mode == "als" and (kind != "weight" or signed is not True):
            raise ValueError(
                f"FakeQuantizer: mode 'als' fits a signed weight scale; it needs kind='weight' and signed=True, "
                f"got kind={kind!r}, signed={signed!r}"
            )
        if observer not in OBSERVERS:
            raise ValueError(f"FakeQuantizer: observer must be one of {OBSERVERS}, got {observer!r}")
        if not check_percentile(percentile):
            raise ValueError(f"FakeQuantizer: percentile must be a number in (50, 100], got {percentile!r}")
        if mode in ("max", "als") and observer != "minmax":
            raise ValueError(
                f"FakeQuantizer: mode {mode!r} computes its scale from the tensor itself; observer "
                f"{observer!r} needs mode 'frozen' or 'lsq'"
            )
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ValueError(f"FakeQuantizer: axis must be an int or None, got {axis!r}")
        if axis is None:
            num_channels = 1
        elif isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"FakeQuantizer: num_channels must be an int >= 1, got {num_channels!r}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
            raise ValueError(f"FakeQuantizer: eps must be a positive number, got {eps!r}")
        self.signed_config: Signed = signed
        self.axis = axis
        self.num_channels = num_channels
        self.mode = mode
        self.kind = kind
        self.eps = float(eps)
        self.name = name
        self.observer = observer
        self.percentile = float(percentile)
        self.observing = False
        # minmax: (min, max); percentile: (sum q_lo, sum q_hi, batches, true min, true max)
        self._obs: Optional[tuple] = None

        c = num_channels
        ones = torch.ones(c, dtype=torch.float32, device=device)
        if mode == "lsq":
            self.scale = nn.Parameter(ones)
        else:
            self.register_buffer("scale", ones)
        self.register_buffer("signed", torch.tensor(signed is True, device=device))
        # "max" computes its scale from the tensor itself, so it never needs calibration.
        self.register_buffer("calibrated", torch.tensor(mode == "max", device=device))
        self.register_buffer("min_val", torch.full((c,), math.inf, dtype=torch.float32, device=device))
        self.register_buffer("max_val", torch.full((c,), -math.inf, dtype=torch.float32, device=device))
        if axis is not None:
            self.register_buffer("zero_point", torch.zeros(c, dtype=torch.int32, device=device), persistent=False)
        else:
            self.zero_point = 0
        # Python mirrors of the bool buffers: reading a CUDA buffer each forward would sync.
        self._signed: Optional[bool] = None if signed == "auto" else bool(signed)
        self._calibrated: bool = mode == "max"

    # ------------------------------------------------------------------ configuration

    def config(self) -> dict:
        """The configuration (not the state): what it takes to build an identical quantizer."""
        return {
            "bits": self.bits,
            "signed": self.signed_config,
            "axis": self.axis,
            "num_channels": self.num_channels,
            "mode": self.mode,
            "kind": self.kind,
            "eps": self.eps,
            "observer": self.observer,
            "percentile": self.percentile,
        }

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    @property
    def is_signed(self) -> Optional[bool]:
        """The signedness in use; None while "auto" is undecided."""
        return self._signed

    def qrange(self) -> tuple[int, int]:
        if self._signed is None:
            raise RuntimeError(self._not_ready_message())
        return quant_range(self.bits, self._signed)

    def extra_repr(self) -> str:
        signed = self.signed_config if self.signed_config != "auto" else f"auto({self._signed})"
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis}, {self.num_channels})"
        obs = "" if self.observer == "minmax" else f", observer=percentile({self.percentile:g})"
        return (
            f"bits={self.bits}, signed={signed}, {where}, mode={self.mode}, kind={self.kind}{obs}, "
            f"calibrated={self._calibrated}"
        )

    def _label(self) -> str:
        what = "activation quantizer" if self.kind == "act" else "weight quantizer"
        return f"{what} {self.name!r}" if self.name else f"{what} (unnamed FakeQuantizer, {self.bits}-bit)"

    def _not_ready_message(self) -> str:
        if self.kind == "act":
            return (
                f"{self._label()} is not calibrated; run pycompress.quant.calibrate(model, batches) "
                f"first (or load a checkpoint that holds its scale)"
            )
        return f"{self._label()} is not initialised; call .init_from(weight) (QuantConv2d/QuantLinear do it)"

    # ------------------------------------------------------------------ state

    def _set_state(self, min_val: torch.Tensor, max_val: torch.Tensor, signed: Optional[bool] = None) -> None:
        """Record a range and derive signedness and scale from it (the end of a calibration).
        signed: the "auto" decision when it was made elsewhere (default: from min_val)."""
        if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
            raise RuntimeError(
                f"{self._label()}: the observed range is not finite (min {min_val.min().item()}, "
                f"max {max_val.max().item()}); the data holds inf or NaN"
            )
        if self.signed_config != "auto":
            signed = self.signed_config
        elif signed is None:
            signed = bool((min_val < 0).any())
        scale = scale_from_range(min_val, max_val, self.bits, signed)
        with torch.no_grad():
            self.min_val.copy_(min_val)
            self.max_val.copy_(max_val)
            self.scale.copy_(scale)
            self.signed.fill_(signed)
            self.calibrated.fill_(True)
        self._signed = signed
        self._calibrated = True

    def init_from(self, x: torch.Tensor) -> "FakeQuantizer":
        """Set the range, signedness and scale from tensor x (a weight: all of it at once); in mode
        "als" this is ``refit(x)``."""
        if self.mode == "als":
            return self.refit(x)
        if x.numel() == 0:
            raise ValueError(f"{self._label()}: init_from got an empty tensor")
        self._check_channels(x)
        mn, mx = _minmax(x, self.axis)
        self._set_state(mn.to(self.min_val.device), mx.to(self.max_val.device))
        return self

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x with the channel axis first (one channel per row of ``.reshape(C, -1)``)."""
        if self.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0)

    def refit(self, x: torch.Tensor) -> "FakeQuantizer":
        """Mode "als": set the scale to ``als_scale`` of x (the weight as the layer uses it: pruned
        entries 0) and the range to x's min / max; the quantizer counts as initialised. No
        gradient; deterministic (it depends on x alone). RuntimeError if x holds inf or NaN."""
        if self.mode != "als":
            raise ValueError(
                f"{self._label()}: refit applies to mode 'als' only; this quantizer's mode is {self.mode!r}"
            )
        if x.numel() == 0:
            raise ValueError(f"{self._label()}: refit got an empty tensor")
        self._check_channels(x)
        xd = x.detach()
        if not bool(torch.isfinite(xd).all()):
            raise RuntimeError(f"{self._label()}: the weight holds inf or NaN; cannot fit its ALS scale (diverged?)")
        dev = self.scale.device
        scale = als_scale(self._rows(xd), self.bits).to(dev)
        mn, mx = _minmax(xd, self.axis)
        with torch.no_grad():
            self.min_val.copy_(mn.to(dev))
            self.max_val.copy_(mx.to(dev))
            self.scale.copy_(scale)
            self.signed.fill_(True)
            self.calibrated.fill_(True)
        self._signed = True
        self._calibrated = True
        return self

    def copy_calibration_from(self, other: "FakeQuantizer") -> None:
        """Take other's calibration (range, signedness and scale), e.g. when only the mode changes."""
        if other._calibrated and other.num_channels == self.num_channels and torch.isfinite(other.min_val).all():
            self._set_state(other.min_val.detach().clone(), other.max_val.detach().clone(), signed=other._signed)
            with torch.no_grad():  # keep a learned scale (clamped like the lsq forward does)
                self.scale.copy_(other.scale.detach().float().clamp_min(other.eps))

    def reset(self) -> None:
        """Back to the uncalibrated state (a "max" quantizer stays usable)."""
        with torch.no_grad():
            self.min_val.fill_(math.inf)
            self.max_val.fill_(-math.inf)
            self.scale.fill_(1.0)
            self.calibrated.fill_(self.mode == "max")
            self.signed.fill_(self.signed_config is True)
        self._calibrated = self.mode == "max"
        self._signed = None if self.signed_config == "auto" else bool(self.signed_config)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calibrated = bool(self.calibrated.item())
        if self._calibrated and prefix + "scale" in state_dict:
            # forward() skips the per-call value checks: a loaded scale is checked here, once (a
            # learned scale as forward uses it: at least eps)
            s = self.scale.detach().float()
            if self.mode == "lsq":
                s = s.clamp_min(self.eps)
            elif self.mode == "als":  # 0 marks an all-zero row (fake_quantize gets kernel_scale)
                s = torch.where(s == 0, torch.ones_like(s), s)
            check_scale_values(s, f"{self._label()}: the loaded scale")
        if self.signed_config == "auto":
            self._signed = bool(self.signed.item()) if self._calibrated else None
        else:
            self._signed = bool(self.signed.item())

    # ------------------------------------------------------------------ calibration

    def begin_calibration(self) -> None:
        """Observe mode: forward passes data through unchanged and records its range (the observer's)."""
        self.observing = True
        self._obs = None

    def end_calibration(self) -> bool:
        """Leave observe mode and set the scale from what was seen; False (state unchanged) if nothing was."""
        self.observing = False
        obs, self._obs = self._obs, None
        if obs is None:
            return False
        if len(obs) == 2:  # min-max
            self._set_state(*obs)
        else:  # percentile: the mean of the per-batch percentiles; signedness from the true minimum
            lo_sum, hi_sum, n, true_min, _ = obs
            self._set_state(lo_sum / n, hi_sum / n, signed=bool((true_min < 0).any()))
        return True

    def all_reduce_observation(self) -> None:
        """Combine what the processes of a DDP run observed since ``begin_calibration``, on every
        process: minima by min, maxima by max (min-max: the exact range over every process's
        batches), and for the percentile observer the sums of the per-batch percentiles and the
        batch counts (the mean over every process's batches). ``end_calibration`` then sets the
        same state everywhere. Every process must call it, in the same order of quantizers;
        alone it does nothing."""
        from ..train import distributed as D

        if not D.is_distributed():
            return
        shape, dev = self.min_val.shape, self.min_val.device
        seen = torch.tensor([0.0 if self._obs is None else 1.0], dtype=torch.float64, device=dev)
        D.all_reduce_(seen)
        inf = torch.full(shape, math.inf, dtype=torch.float32, device=dev)
        if self.observer == "minmax" or self.percentile == 100:
            mn, mx = self._obs if self._obs is not None else (inf, -inf)
            mn, mx = mn.reshape(shape).clone(), mx.reshape(shape).clone()
            D.all_reduce_(mn, "min")
            D.all_reduce_(mx, "max")
            self._obs = (mn, mx) if seen.item() > 0 else None
            return
        if self._obs is None:
            zero = torch.zeros(shape, dtype=torch.float32, device=dev)
            lo, hi, n, tmn, tmx = zero, zero, 0, inf, -inf
        else:
            lo, hi, n, tmn, tmx = self._obs
        lo, hi, tmn, tmx = (t.reshape(shape).clone() for t in (lo, hi, tmn, tmx))
        count = torch.tensor([float(n)], dtype=torch.float64, device=dev)
        for t, op in ((lo, "sum"), (hi, "sum"), (count, "sum"), (tmn, "min"), (tmx, "max")):
            D.all_reduce_(t, op)
        self._obs = (lo, hi, int(count.item()), tmn, tmx) if seen.item() > 0 else None

    def abort_calibration(self) -> None:
        """Leave observe mode, discarding what was seen (the previous state stays)."""
        self.observing = False
        self._obs = None

    def _observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        self._check_channels(x)
        dev = self.min_val.device
        mn, mx = _minmax(x, self.axis)
        mn, mx = mn.to(dev), mx.to(dev)
        if self.observer == "minmax" or self.percentile == 100:
            if self._obs is not None:
                mn, mx = torch.minimum(self._obs[0], mn), torch.maximum(self._obs[1], mx)
            self._obs = (mn, mx)
            return
        lo, hi = _percentiles(x, self.axis, self.percentile)
        lo, hi = lo.to(dev), hi.to(dev)
        if self._obs is None:
            self._obs = (lo, hi, 1, mn, mx)
        else:
            lo_sum, hi_sum, n, tmn, tmx = self._obs
            self._obs = (lo_sum + lo, hi_sum + hi, n + 1, torch.minimum(tmn, mn), torch.maximum(tmx, mx))

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.axis is not None:
            if not -x.dim() <= self.axis < x.dim() or x.shape[self.axis] != self.num_channels:
                raise ValueError(
                    f"{self._label()}: expects {self.num_channels} channels on axis {self.axis}, "
                    f"got a tensor of shape {tuple(x.shape)}"
                )

    # ------------------------------------------------------------------ forward

    def _grad_factor(self, x: torch.Tensor, qmax: int) -> float:
        n = x.numel() // self.num_channels
        if self.kind == "act" and x.dim() > 1 and (self.axis is None or self.axis % x.dim() != 0):
            n //= max(x.shape[0], 1)
        return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self._calibrated:
            raise RuntimeError(self._not_ready_message())
        qmin, qmax = quant_range(self.bits, self._signed)
        grad_factor = 1.0
        if self.mode == "max":
            self._check_channels(x)
            scale = scale_from_range(*_minmax(x, self.axis), self.bits, self._signed)
            with torch.no_grad():
                self.scale.copy_(scale)
        elif self.mode == "frozen":
            scale = self.scale
        elif self.mode == "als":
            scale = kernel_scale(self.scale)
        else:
            scale = _ClampMinSTE.apply(self.scale, self.eps)
            if scale.requires_grad:
                grad_factor = self._grad_factor(x, qmax)
        # The state is valid by construction (scales from scale_from_range and als_scale are at
        # least fp32's tiny, so 1/s is finite, or 0 for an ALS row, replaced by kernel_scale; a
        # learned scale is clamped to eps above; the zero point is 0, and the
        # checks of _set_state / loading), so the per-call checks that read tensor values (tens of
        # microseconds each on a CPU, a host sync on a GPU) are skipped. A diverged (NaN) learned
        # scale makes the output NaN, which the trainer reports as divergence.
        return fake_quantize(
            x, scale, self.zero_point, qmin, qmax, self.axis, grad_factor=grad_factor, check_values=False
        )
