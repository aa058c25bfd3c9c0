"""Structured pruning that shrinks the network: whole channels removed, physically.

    from pycompress.prune import structured
    result = structured.slim(model, {"criterion": "bn_gamma", "ratio": 0.3}, input_shape=(1, 32, 32))
    result.plan            # per-layer channel counts: how to rebuild the smaller network
    fresh = models.build(...); structured.apply_plan(fresh, result.plan); fresh.load_state_dict(...)

Dependencies between layers come from Torch-Pruning's dependency graph (``torch_pruning``, pinned
in pyproject.toml, used only here): it traces one forward pass through autograd and couples every
layer a channel flows through. A channel removed from a conv's output leaves its BatchNorm, every
consumer's input (a depthwise conv shrinks in, out and groups together), both sides of a residual
addition (all producers of an add lose the same channels) and the right slice of a concatenation
(DenseNet), down to the classifier's input. Why Torch-Pruning rather than an own torch.fx
analysis: it handled every model of the zoo and torchvision's resnet18 / mobilenet_v2 on the first
try (tested), its index mapping for concat / flatten is exactly the part an fx analysis would
have to rewrite, and keeping it behind this module (no other file imports it) keeps the choice
replaceable. Its known failure modes are kept out: QAT models are refused (slim before QAT, as
Torch-Pruning's own README says), the classifier's outputs are never pruned, and every removal is
checked: the slimmed network must compute what the original computes with the removed channels
zeroed (an op Torch-Pruning treats as element-wise but that moves channels, such as a channel
shuffle, fails this), else the model is restored and SlimError raised.

What is removed (``SlimSpec``):

* ``criterion``: ``bn_gamma`` (|gamma| of the BatchNorms in the channel's group: network slimming,
  Liu et al. 2017; train with the ``bn_l1`` regularizer first), ``l1`` / ``l2`` (the channel's
  filter norm summed over every coupled layer: L2 is the group norm DeepHoyer's Group Lasso /
  Group-HS drive to zero). Groups without a scored layer (``bn_gamma`` on a net without
  BatchNorm) are left alone and listed.
* ``ratio`` of each group's channels (``scope: layer``, the default; ``ratios`` overrides it per
  layer by regex on the layer whose outputs the group prunes), or of all channels ranked together
  (``scope: global``: raw |gamma| for ``bn_gamma``, as Liu et al.; filter norms divided by their
  group's mean for ``l1`` / ``l2``), or every channel whose score is at most ``threshold``
  (DeepHoyer: filters a group regularizer zeroed).
* the kept count of a group is rounded to the nearest multiple of ``round_to`` (8 by default:
  GPU-friendly shapes; a group smaller than that is not rounded; in a multi-round schedule only
  the last round rounds), never below ``min_channels``;
  ``exclude`` regexes name layers whose output channels are kept (every group they belong to is
  left alone). The model's last layer (the classifier) never loses outputs.

Pruning masks (``pycompress.prune``) of kept channels are carried over exactly. The result's
``plan`` (layer name -> its new channel counts) rebuilds the smaller network from a freshly built
one (``apply_plan``); checkpoints and artifacts store it as ``arch["slim"]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "SlimSpec",
    "SlimResult",
    "SlimError",
    "slim",
    "remove_channels",
    "group_members",
    "model_plan",
    "apply_plan",
    "channel_groups",
    "CRITERIA",
    "SCOPES",
]

CRITERIA = ("bn_gamma", "l1", "l2")
SCOPES = ("layer", "global")


class SlimError(ValueError):
    """The model cannot be slimmed as asked (a QAT model, a graph the analysis cannot follow,
    exclusions that leave nothing to prune, bad settings)."""


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:  # pragma: no cover - a dependency of pycompress
        raise ImportError(
            "structured pruning needs torch-pruning (a dependency of pycompress: pip install 'torch-pruning==1.6.1')"
        ) from exc
    return torch_pruning


# ------------------------------------------------------------------------------------ spec
def _fail(key: str, msg: str) -> None:
    raise SlimError(f"SlimSpec: {key}: {msg}")


def _ratio(key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        _fail(key, f"must be a number in (0, 1) (the fraction of channels removed), got {v!r}")
    return float(v)


@dataclass
class SlimSpec:
    """Which channels ``slim`` removes (see the module docstring)."""

    criterion: str = "bn_gamma"
    ratio: Optional[float] = None
    scope: str = "layer"
    ratios: List[Dict[str, Any]] = field(default_factory=list)
    threshold: Optional[float] = None
    round_to: int = 8
    min_channels: int = 1
    exclude: List[str] = field(default_factory=list)
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            _fail("criterion", f"must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in SCOPES:
            _fail("scope", f"must be one of {list(SCOPES)}, got {self.scope!r}")
        if (self.ratio is None) == (self.threshold is None):
            _fail(
                "ratio",
                "give either a ratio (the fraction of channels removed) or a threshold (remove channels "
                "scoring at most it)",
            )
        if self.ratio is not None:
            self.ratio = _ratio("ratio", self.ratio)
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
                _fail("threshold", f"must be a number >= 0, got {self.threshold!r}")
            self.threshold = float(self.threshold)
            if self.scope != "layer" or self.ratios:
                _fail("threshold", "a threshold applies to every channel; it takes no scope or ratios")
        if not isinstance(self.ratios, list):
            _fail("ratios", f"must be a list of {{pattern, ratio}}, got {self.ratios!r}")
        out = []
        for i, r in enumerate(self.ratios):
            if not isinstance(r, Mapping) or set(r) != {"pattern", "ratio"}:
                _fail(f"ratios[{i}]", f"must be a mapping with exactly 'pattern' and 'ratio', got {r!r}")
            _regex(f"ratios[{i}].pattern", r["pattern"])
            out.append({"pattern": r["pattern"], "ratio": _ratio(f"ratios[{i}].ratio", r["ratio"])})
        self.ratios = out
        if self.scope == "global" and self.ratios:
            _fail("ratios", "per-layer ratios need scope 'layer'")
        for key in ("round_to", "min_channels", "rounds"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(key, f"must be an integer >= 1, got {v!r}")
        if not isinstance(self.exclude, list):
            _fail("exclude", f"must be a list of regular expressions, got {self.exclude!r}")
        for i, p in enumerate(self.exclude):
            _regex(f"exclude[{i}]", p)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SlimSpec":
        if isinstance(d, SlimSpec):
            return d
        if not isinstance(d, Mapping):
            raise SlimError(f"SlimSpec: expected a mapping, got {type(d).__name__}")
        names = [f for f in cls.__dataclass_fields__]
        unknown = [k for k in d if k not in names]
        if unknown:
            _fail(unknown[0], f"unknown key; allowed: {', '.join(names)}")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def _per_round(self, ratio: float, per_round: bool) -> float:
        return 1.0 - (1.0 - ratio) ** (1.0 / self.rounds) if per_round else ratio

    def round_ratio(self) -> float:
        """The ratio each of ``rounds`` rounds removes, so that the rounds together remove ``ratio``
        (hw7: 5 rounds of width x 0.95 is ratio 1 - 0.95^5)."""
        return self._per_round(self.ratio, True)

    def ratio_for(self, layer: str, per_round: bool = False) -> float:
        """The ratio of the group whose outputs ``layer`` produces (the last matching ``ratios``
        entry, else ``ratio``), for the whole schedule or for one of its rounds."""
        for r in reversed(self.ratios):
            if re.search(r["pattern"], layer):
                return self._per_round(r["ratio"], per_round)
        return self._per_round(self.ratio, per_round)


def _regex(key: str, p) -> None:
    if not isinstance(p, str):
        _fail(key, f"must be a regular expression string, got {p!r}")
    try:
        re.compile(p)
    except re.error as exc:
        _fail(key, f"is not a valid regular expression: {exc}")


# ------------------------------------------------------------------------------------ results
@dataclass
class SlimResult:
    """What ``slim`` did: ``groups`` (per channel group: root layer, channels before / after,
    members), ``skipped`` (groups left alone, with the reason), ``params_before`` /
    ``params_after``, and the ``plan`` that rebuilds the slimmed network."""

    groups: List[Dict[str, Any]]
    skipped: List[Dict[str, Any]]
    params_before: int
    params_after: int
    plan: Dict[str, Dict[str, int]]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "groups": self.groups,
            "skipped": self.skipped,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "plan": self.plan,
        }

    def format(self) -> str:
        lines = [f"{'group (layer whose outputs it prunes)':44s} {'channels':>14s}  members"]
        for g in self.groups:
            lines.append(f"{g['root']:44s} {g['before']:6d} -> {g['after']:<5d}  {len(g['members'])}")
        for s in self.skipped:
            lines.append(f"{s['root']:44s} {'kept':>14s}  ({s['why']})")
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.params_after / max(self.params_before, 1):.1f}%)"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers
def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _example(model: nn.Module, example_input: Optional[torch.Tensor], input_shape: Optional[Sequence[int]]):
    if example_input is not None:
        return example_input
    if input_shape is None:
        raise SlimError("slim needs example_input or input_shape (C, H, W) to trace the model")
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    return torch.randn((1,) + tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0)).to(dev)


def _check_model(model: nn.Module) -> None:
    from ..quant import QAT_LAYERS
    from . import masks as M

    qat = [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]
    if qat:
        raise SlimError(
            f"the model is quantization-aware ({qat[0]!r} is a {type(dict(model.named_modules())[qat[0]]).__name__}); "
            f"slim the float model, then quantize it (slimming first keeps the quantizers' per-channel "
            f"scales consistent)"
        )
    if M.shadowed_layers(model):
        raise SlimError(
            "the model is in the middle of MicroNet's regrowing-mask schedule (dense shadow weights); "
            "slim after the masks are frozen"
        )


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = m
    return last


def _keep_count(n: int, ratio: float, round_to: int, min_channels: int) -> int:
    keep = n * (1.0 - ratio)
    if round_to > 1 and n >= round_to:
        keep = max(round_to, math.floor(keep / round_to + 0.5) * round_to)
    else:
        keep = math.floor(keep + 0.5)
    return int(min(n, max(min_channels, keep, 1)))


def _importance(tp, criterion: str, scope: str):
    normalizer = None if (scope == "layer" or criterion == "bn_gamma") else "mean"
    if criterion == "bn_gamma":
        return tp.importance.BNScaleImportance(normalizer=normalizer)
    return tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2, normalizer=normalizer)


class _Graph:
    """Torch-Pruning's dependency graph of one model, with our names."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        tp = _tp()
        self.tp = tp
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.order = {m: i for i, m in enumerate(model.modules())}
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # tracing runs a forward: BatchNorm statistics must not move
        try:
            with torch.enable_grad():  # Torch-Pruning traces through autograd
                self.DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as exc:  # noqa: BLE001 - any failure: the graph cannot be followed
            raise SlimError(
                f"the dependency analysis cannot follow {type(model).__name__}: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            for m, t in modes:
                m.training = t

    def groups(self, ignored: List[nn.Module]):
        return list(self.DG.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))

    def _is_out(self, dep) -> bool:
        m = dep.target.module
        return self.DG.is_out_channel_pruning_fn(dep.handler) or (
            isinstance(m, nn.Conv2d) and m.groups == m.out_channels > 1
        )

    def root(self, group) -> Tuple[nn.Module, str]:
        """The group's name: its first conv / linear (in module order) whose outputs it prunes (all
        such layers of a group share one channel numbering: residual adds do not offset)."""
        outs = [
            dep.target.module
            for dep, _ in group
            if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and self._is_out(dep)
        ]
        m = min(outs, key=lambda x: self.order.get(x, 1 << 30)) if outs else group[0].dep.target.module
        return m, self.names.get(m, "?")

    def members(self, group) -> List[str]:
        mods = {dep.target.module for dep, _ in group if dep.target.module in self.names}
        return [self.names[m] for m in sorted(mods, key=lambda x: self.order[x])]

    def dims(self, group) -> List[Tuple[nn.Module, int, List[int]]]:  # noqa: D401
        """(module, weight dim, idxs) of every item of a pruning group with indices to remove."""
        out = []
        for dep, idxs in group:
            m = dep.target.module
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or not idxs:
                continue
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
                if "weight_mask" in m._buffers:
                    raise SlimError(
                        f"layer {self.names.get(m)!r}: carrying pruning masks through a grouped conv "
                        f"(groups {m.groups}) is not supported"
                    )
            out.append((m, 0 if self._is_out(dep) else 1, list(idxs)))
        return out


# ------------------------------------------------------------------------------------ slim
def channel_groups(
    model: nn.Module, *, example_input: Optional[torch.Tensor] = None, input_shape: Optional[Sequence[int]] = None
) -> List[Dict[str, Any]]:
    """The model's channel groups: ``[{"root", "channels", "members"}]`` (all prunable ones,
    the classifier's outputs excluded)."""
    g = _Graph(model, _example(model, example_input, input_shape))
    out = _output_layer(model)
    return [
        {"root": g.root(gr)[1], "channels": len(gr[0].idxs), "members": g.members(gr)}
        for gr in g.groups([out] if out is not None else [])
    ]


@torch.no_grad()
def _select(
    spec: SlimSpec, scored: List[Tuple[str, Any, torch.Tensor]], per_round: bool, round_to: int
) -> Dict[str, List[int]]:
    """{root name: channel indices to remove}."""
    picks: Dict[str, List[int]] = {}
    if spec.threshold is not None:
        for name, _, s in scored:
            idx = [int(i) for i in torch.nonzero(s <= spec.threshold).flatten()]
            if len(idx) >= len(s):  # keep at least min_channels (the best scored)
                order = torch.argsort(s, descending=True, stable=True)
                keep = set(int(i) for i in order[: spec.min_channels])
                idx = [i for i in idx if i not in keep]
            picks[name] = idx
        return picks
    if spec.scope == "layer":
        for name, _, s in scored:
            n = len(s)
            keep = _keep_count(n, spec.ratio_for(name, per_round), round_to, spec.min_channels)
            order = torch.argsort(s, stable=True)  # lowest score first
            picks[name] = sorted(int(i) for i in order[: n - keep])
        return picks
    # global: rank all channels together, then round each group's kept count
    allscores = torch.cat([s.float().cpu() for _, _, s in scored])
    total = allscores.numel()
    k = int(math.floor(total * spec.ratio_for("", per_round) + 0.5))
    cut = torch.sort(allscores, stable=True).values[k - 1] if k > 0 else -math.inf
    for name, _, s in scored:
        n = len(s)
        below = int((s.float().cpu() <= cut).sum()) if k > 0 else 0
        keep = _keep_count(n, below / n, round_to, spec.min_channels)
        order = torch.argsort(s, stable=True)
        picks[name] = sorted(int(i) for i in order[: n - keep])
    return picks


def slim(
    model: nn.Module,
    spec: Union[SlimSpec, Mapping[str, Any]],
    *,
    example_input: Optional[torch.Tensor] = None,
    input_shape: Optional[Sequence[int]] = None,
    per_round: bool = False,
    last_round: bool = True,
) -> SlimResult:
    """Remove channels from ``model`` in place (see the module docstring) and return what was done.
    ``per_round``: remove one round's share of the ratios (``spec.rounds`` rounds together remove
    ``ratio``; a recipe's slim stage fine-tunes between rounds); kept counts are rounded to
    ``round_to`` only in the ``last_round`` (rounding every round would stall small groups: 16
    channels x 0.92 rounds back to 16). Raises SlimError, before changing anything, for a QAT
    model, an untraceable graph or settings that leave nothing to prune."""
    spec = SlimSpec.from_dict(spec)
    _check_model(model)
    example = _example(model, example_input, input_shape)
    g = _Graph(model, example)
    ignored = [m for n, m in model.named_modules() if n and any(re.search(p, n) for p in spec.exclude)]
    out_layer = _output_layer(model)
    if out_layer is not None:
        ignored.append(out_layer)
    imp = _importance(g.tp, spec.criterion, spec.scope)
    scored, skipped = [], []
    for gr in g.groups(ignored):
        root, name = g.root(gr)
        s = imp(gr)
        if s is None:
            skipped.append(
                {
                    "root": name,
                    "why": f"no layer scored by {spec.criterion!r} (no BatchNorm)"
                    if spec.criterion == "bn_gamma"
                    else "no layer to score",
                }
            )
            continue
        scored.append((name, gr, s.detach()))
    if not scored:
        excluded = f" (exclude: {spec.exclude})" if spec.exclude else ""
        raise SlimError(
            f"nothing to prune in {type(model).__name__}: no channel group can be scored by "
            f"{spec.criterion!r} or every group holds an excluded layer{excluded}"
        )
    picks = _select(spec, scored, per_round, spec.round_to if last_round else 1)
    params_before = _count_params(model)
    done = [
        {"root": name, "before": len(s), "after": len(s) - len(picks.get(name) or []), "members": g.members(gr)}
        for name, gr, s in scored
    ]
    _remove(g, model, picks, example)
    return SlimResult(done, skipped, params_before, _count_params(model), model_plan(model))


def group_members(
    model: nn.Module,
    picks: Mapping[str, Sequence[int]],
    *,
    example_input: Optional[torch.Tensor] = None,
    input_shape: Optional[Sequence[int]] = None,
) -> Dict[str, List[Tuple[str, str, List[int]]]]:
    """What removing output channels ``idxs`` of each layer in ``picks`` (``{layer: idxs}``) would
    touch: ``{layer: [(member, role, idxs)]}`` with role "out" (the member's outputs: conv / linear
    rows, BatchNorm channels, a depthwise conv's channels) or "in" (a consumer's inputs), the
    indices mapped to that member (concat offsets). Nothing is changed."""
    g = _Graph(model, _example(model, example_input, input_shape))
    mods = dict(model.named_modules())
    result: Dict[str, List[Tuple[str, str, List[int]]]] = {}
    for root, idxs in picks.items():
        m = mods.get(root)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise SlimError(f"{root!r} is not a conv or linear layer of {type(model).__name__}")
        fn = g.tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else g.tp.prune_linear_out_channels
        out: List[Tuple[str, str, List[int]]] = []
        for dep, ix in g.DG.get_pruning_group(m, fn, list(idxs)):
            t = dep.target.module
            if t not in g.names or not ix or not isinstance(t, (nn.Conv2d, nn.Linear, _BatchNorm)):
                continue
            item = (g.names[t], "out" if g._is_out(dep) else "in", sorted(int(i) for i in ix))
            if item not in out:
                out.append(item)
        result[root] = out
    return result


def remove_channels(
    model: nn.Module,
    picks: Mapping[str, Sequence[int]],
    *,
    example_input: Optional[torch.Tensor] = None,
    input_shape: Optional[Sequence[int]] = None,
) -> Dict[str, Dict[str, int]]:
    """Remove the given output channels ``{layer: [indices]}`` (and everything coupled to them) from
    ``model`` in place; returns the new plan. The selection-free core of ``slim``."""
    _check_model(model)
    example = _example(model, example_input, input_shape)
    g = _Graph(model, example)
    mods = dict(model.named_modules())
    for name in picks:
        if not isinstance(mods.get(name), (nn.Conv2d, nn.Linear)):
            raise SlimError(f"{name!r} is not a conv or linear layer of {type(model).__name__}")
    _remove(g, model, {k: list(v) for k, v in picks.items()}, example)
    return model_plan(model)


def _remove(g: _Graph, model: nn.Module, picks: Dict[str, List[int]], example: torch.Tensor) -> None:
    """Remove the picked channels; all or nothing: on any failure the model is restored as it was."""
    import copy

    snapshot = copy.deepcopy(model)
    try:
        _remove_in_place(g, model, picks, example)
    except BaseException:
        model.__dict__.update(snapshot.__dict__)  # the untouched modules, parameters and buffers
        raise


def _dead_copy(g: _Graph, model: nn.Module, picks: Dict[str, List[int]]) -> nn.Module:
    """A copy of ``model`` in which the picked channels are dead: every producer of them (conv /
    linear output rows and biases, BatchNorm gamma and beta, a depthwise conv's channels) zeroed.
    Removing dead channels must not change the function; ``_remove_in_place`` checks that the
    slimmed model computes what this copy computes, which catches an analysis that coupled the
    wrong channels (an op it could not follow)."""
    import copy

    dead = copy.deepcopy(model)
    names = dict(dead.named_modules())
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, idxs in picks.items():
            if not idxs:
                continue
            root = mods[name]
            fn = g.tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else g.tp.prune_linear_out_channels
            for dep, ix in g.DG.get_pruning_group(root, fn, sorted(set(idxs))):
                t = dep.target.module
                if t not in g.names or not ix or not g._is_out(dep):
                    continue
                d = names[g.names[t]]
                ix = list(ix)
                if isinstance(d, _BatchNorm):
                    if d.weight is not None:
                        d.weight[ix] = 0
                    if d.bias is not None:
                        d.bias[ix] = 0
                elif isinstance(d, (nn.Conv2d, nn.Linear)):
                    d.weight[ix] = 0
                    if d.bias is not None:
                        d.bias[ix] = 0
    return dead


def _run_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            return model(x)
        finally:
            model.train(was)


def _remove_in_place(g: _Graph, model: nn.Module, picks: Dict[str, List[int]], example: torch.Tensor) -> None:
    from . import masks as M

    y0 = _run_eval(model, example)
    y_dead = _run_eval(_dead_copy(g, model, picks), example)
    mods = dict(model.named_modules())
    masks = {m: M.get_mask(m) for m in M.masked_layers(model).values()}
    # layers a slim plan cannot describe (ConvTranspose2d, LayerNorm, a custom module's weight...):
    # if removing channels resizes one, the slimmed network could not be rebuilt from its plan
    unplanned = {n: (m, _tensor_shapes(m)) for n, m in mods.items() if _shape_of(m) is None and _tensor_shapes(m)}
    for name, idxs in picks.items():
        if not idxs:
            continue
        root = mods[name]
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        if len(set(idxs)) >= n or min(idxs) < 0 or max(idxs) >= n:
            raise SlimError(
                f"layer {name!r}: cannot remove channels {sorted(idxs)[:8]}... of its {n} "
                f"(out of range, or none would be left)"
            )
        fn = g.tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else g.tp.prune_linear_out_channels
        try:
            pg = g.DG.get_pruning_group(root, fn, sorted(set(idxs)))
            cuts = g.dims(pg)
            pg.prune()
        except SlimError:
            raise
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning could not map the indices through an op
            raise SlimError(
                f"the dependency analysis cannot follow {type(model).__name__} at the channel group of "
                f"{name!r}: {type(exc).__name__}: {exc} (an op between its layers that it cannot map "
                f"channel indices through, e.g. a view / transpose channel shuffle); nothing was "
                f"removed"
            ) from None
        resized = [f"{n!r} ({type(m).__name__})" for n, (m, shapes) in unplanned.items() if _tensor_shapes(m) != shapes]
        if resized:
            raise SlimError(
                f"removing channels of the group of {name!r} resizes {', '.join(resized)}; a slim plan records "
                f"the channels of nn.Conv2d, nn.Linear and BatchNorm layers only, so the slimmed network "
                f"could not be rebuilt: keep that group (exclude: ['^{name}$']); nothing was removed"
            )
        for m, dim, ix in cuts:
            if m in masks:
                keep = torch.ones(masks[m].shape[dim], dtype=torch.bool)
                keep[ix] = False
                masks[m] = masks[m][keep] if dim == 0 else masks[m][:, keep]
    for m, mk in masks.items():
        del m._buffers[M.MASK]
        M.attach_mask(m, mk.to(m.weight.device), g.names.get(m, "layer"))
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            y1 = model(example)
        except Exception as exc:  # noqa: BLE001
            raise SlimError(
                f"the slimmed {type(model).__name__} does not run ({type(exc).__name__}: {exc}): the "
                f"dependency analysis missed a coupling (an op it treats as element-wise); nothing was "
                f"removed"
            ) from None
        finally:
            model.train(was)
    if tuple(y1.shape) != tuple(y0.shape):
        raise SlimError(
            f"the slimmed model's output shape changed from {tuple(y0.shape)} to {tuple(y1.shape)}; nothing was removed"
        )
    scale = float(y_dead.abs().max()) if y_dead.numel() else 0.0
    if not torch.allclose(y1.float(), y_dead.float(), rtol=1e-4, atol=1e-4 * scale + 1e-6):
        raise SlimError(
            f"the dependency analysis cannot follow {type(model).__name__}: the slimmed network does not "
            f"compute what the network with the removed channels zeroed computes (largest difference "
            f"{float((y1 - y_dead).abs().max()):.3g}): an op between its layers maps channels in a way the "
            f"analysis does not see (a view / transpose channel shuffle, a normalization over channels); "
            f"nothing was removed"
        )
    build = getattr(model, "_pycompress_build", None)
    if isinstance(build, dict):
        build["slim"] = model_plan(model)


# ------------------------------------------------------------------------------------ plans
def _tensor_shapes(m: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """The shapes of a module's own parameters and buffers."""
    own = list(m._parameters.items()) + list(m._buffers.items())
    return {k: tuple(t.shape) for k, t in own if t is not None}


def _shape_of(m: nn.Module) -> Optional[Dict[str, int]]:
    if isinstance(m, nn.Conv2d):
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features}
    if isinstance(m, _BatchNorm):
        return {"features": m.num_features}
    return None


def model_plan(model: nn.Module, reference: Optional[nn.Module] = None) -> Dict[str, Dict[str, int]]:
    """Channel counts of the model's conv / linear / BatchNorm layers: ``{name: {"in", "out",
    "groups"} | {"in", "out"} | {"features"}}``; with ``reference`` (the unslimmed architecture)
    only the layers that differ from it. When the model was built by ``pycompress.models.build``,
    that build is the reference by default."""
    if reference is None:
        build = getattr(model, "_pycompress_build", None)
        if isinstance(build, dict) and "model" in build:
            from .. import models

            reference = models.build(
                build["model"],
                in_channels=build["in_channels"],
                num_classes=build["num_classes"],
                **dict(build.get("args") or {}),
            )
    ref = {n: _shape_of(m) for n, m in reference.named_modules()} if reference is not None else {}
    plan = {}
    for n, m in model.named_modules():
        s = _shape_of(m)
        if s is not None and s != ref.get(n):
            plan[n] = s
    return plan


def _new_param(old: Optional[torch.Tensor], shape) -> Optional[nn.Parameter]:
    if old is None:
        return None
    return nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def apply_plan(model: nn.Module, plan: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Resize the named layers of a freshly built model to the plan's channel counts, in place
    (new, zero-filled tensors: load the slimmed state dict afterwards). Returns the model."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, s in plan.items():
            m = mods.get(name)
            if m is None:
                raise SlimError(f"slim plan names layer {name!r}, which {type(model).__name__} does not have")
            if isinstance(m, nn.Conv2d) and set(s) == {"in", "out", "groups"}:
                m.in_channels, m.out_channels, m.groups = int(s["in"]), int(s["out"]), int(s["groups"])
                m.weight = _new_param(m.weight, (m.out_channels, m.in_channels // m.groups) + tuple(m.kernel_size))
                m.bias = _new_param(m.bias, (m.out_channels,))
            elif isinstance(m, nn.Linear) and set(s) == {"in", "out"}:
                m.in_features, m.out_features = int(s["in"]), int(s["out"])
                m.weight = _new_param(m.weight, (m.out_features, m.in_features))
                m.bias = _new_param(m.bias, (m.out_features,))
            elif isinstance(m, _BatchNorm) and set(s) == {"features"}:
                c = int(s["features"])
                m.num_features = c
                m.weight = _new_param(m.weight, (c,))
                m.bias = _new_param(m.bias, (c,))
                if m.running_mean is not None:
                    m.running_mean = torch.zeros(c, device=m.running_mean.device)
                    m.running_var = torch.ones(c, device=m.running_var.device)
            else:
                raise SlimError(f"slim plan entry {name!r}: {dict(s)} does not fit its {type(m).__name__}")
    build = getattr(model, "_pycompress_build", None)
    if isinstance(build, dict):
        build["slim"] = {k: dict(v) for k, v in plan.items()}
    return model
