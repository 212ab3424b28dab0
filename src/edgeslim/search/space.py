"""The search space: which bits each layer may take and which keep ratios each group may.

Built once from a model and a :class:`~edgeslim.task.Task`:

- **layers**: every layer ``quantize_`` would swap for a fake-quant twin (conv, linear,
  recurrent...), by FQN, each with the same weight-bit and activation-bit choices
  (``exclude`` globs keep layers float and out of the search);
- **groups**: every prunable coupling group of the graph analysis (by group key, the FQN
  of its first producer), each with the same keep-ratio choices (``skip`` leaves groups
  whole, as the planner's ``skip`` does);
- **branches** (with ``depth=True``): every removable residual branch
  (:func:`~edgeslim.graph.branches.residual_branches`), a group keyed ``depth:<name>``
  whose keep ratio is 1 (kept) or 0 (removed, :mod:`edgeslim.prune.depth`).

A :class:`~edgeslim.search.Policy` picks one value per layer and group. Applying it reuses
the pruning planner and PTQ as they are: channels are ranked once by the importance
criterion (``l1`` by default) and each group keeps its top ``ceil(size * keep)`` (rounded
up to ``round_to``); the pruned copy is then quantized with one :class:`QuantConfig` per
FQN (``select``) and calibrated on the task's calibration batches.

Decision — activations: when every layer has the same activation bits the policy goes
through :func:`~edgeslim.quant.ptq.ptq` (activation quantizers on graph edges, as ONNX
Runtime runs them); mixed activation bits keep per-layer input quantizers instead, because
an edge shared by layers of different bits could honour only one of them.

Decision — costs are analytic and exact for the policy: the pruned copy's layer table gives
MACs and (with the policy's bits) BOPs, :func:`~edgeslim.cost.analytic.size_bytes` its
bytes, :func:`~edgeslim.cost.analytic.peak_activation_bytes` its peak activation memory,
scaled by the widest activation bits of the policy (float layers count 32). Pruned copies
are cached per width vector, so policies that differ only in bits cost arithmetic.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
import itertools
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from edgeslim.cost.analytic import bops, peak_activation_bytes, size_bytes
from edgeslim.errors import PruneError
from edgeslim.graph import layer_table, total_macs
from edgeslim.graph.attention import SplitMultiheadAttention, has_attention, split_attention
from edgeslim.graph.branches import ResidualBranch
from edgeslim.graph.layers import LayerInfo
from edgeslim.graph.model_graph import analyze
from edgeslim.graph.reparam import bake_reparametrizations, has_reparametrizations
from edgeslim.prune.depth import removable_branches, remove_branches, removed_modules
from edgeslim.prune.importance import Importance
from edgeslim.prune.planner import (
    apply_keep,
    build_importance,
    candidate_groups,
    keep_map,
    normalised_scores,
    ratio_widths,
)
from edgeslim.prune.surgery import group_key, prepare_surgery
from edgeslim.quant.config import QuantConfig, w8a8
from edgeslim.quant.spec import QuantSpec
from edgeslim.search.errors import PolicyError, SearchError
from edgeslim.search.policy import Policy
from edgeslim.search.rebuild import STRUCTURE_FORMAT, quantized_structure
from edgeslim.task import Task

if TYPE_CHECKING:
    from edgeslim.graph.coupling import CouplingGroup
    from edgeslim.search.constraints import LatencyPredictor

DimKind = Literal["w_bits", "a_bits", "keep"]
COST_NAMES = ("macs", "bops", "size", "memory", "latency")
DEPTH_PREFIX = "depth:"  # group key of a residual branch: keep 1 (kept) or 0 (removed)
_CACHE = 8  # pruned copies kept (one per distinct width vector)


@dataclass(frozen=True)
class LayerChoices:
    """A searched layer: its allowed bits, most compressed first (float activations last)."""

    fqn: str
    kind: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int | None, ...]
    macs: int
    params: int


@dataclass(frozen=True)
class GroupChoices:
    """A searched coupling group: its keep ratios (ascending) and the width each leaves."""

    key: str
    size: int
    keep: tuple[float, ...]
    widths: tuple[int, ...]

    def width(self, ratio: float) -> int:
        return self.widths[self.keep.index(ratio)]

    @functools.cached_property
    def distinct(self) -> tuple[float, ...]:
        """The keep ratios worth searching: of ratios that leave the same width (rounding
        to ``round_to`` merges them in a small group), only the largest. Why: every other
        one builds the same model under another policy id, which a search would measure
        again (4 of mobilenetv2-imagenet's 25 groups at round_to 16 leave one width for
        every ratio)."""
        last = {w: k for k, w in zip(self.keep, self.widths, strict=True)}
        return tuple(sorted(last.values()))

    def canonical(self, ratio: float) -> float:
        """The ratio of :attr:`distinct` that leaves the width ``ratio`` leaves."""
        width = self.width(ratio)
        return next(k for k in self.distinct if self.width(k) == width)


@dataclass(frozen=True)
class Dim:
    """One searched coordinate with more than one choice, most compressed choice first."""

    kind: DimKind
    name: str
    choices: tuple[Any, ...]

    @property
    def unit(self) -> str:
        """What the coordinate belongs to: ``layer:<fqn>`` or ``group:<key>``."""
        return f"group:{self.name}" if self.kind == "keep" else f"layer:{self.name}"

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.name}]"


@dataclass(frozen=True)
class Costs:
    """Analytic costs of one model: MACs, BOPs, bytes of weights, bytes of peak activation
    memory and (with a predictor) latency in the predictor's unit."""

    macs: int
    bops: int
    size: int
    memory: int
    latency: float | None = None

    def get(self, name: str) -> float | None:
        if name not in COST_NAMES:
            raise SearchError(f"unknown cost {name!r}; allowed: {', '.join(COST_NAMES)}")
        value = getattr(self, name)
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Costs:
        return cls(
            macs=int(data["macs"]),
            bops=int(data["bops"]),
            size=int(data["size"]),
            memory=int(data["memory"]),
            latency=None if data.get("latency") is None else float(data["latency"]),
        )


@dataclass
class _Pruned:
    model: nn.Module
    table: dict[str, LayerInfo]
    peak: int | None = None
    bn_pending: bool = False  # BatchNorm statistics still to re-estimate before measuring
    # positions each narrowed layer kept, while its least-squares refit is still to run
    refit: dict[str, Any] | None = None


def _sorted_bits(values: Iterable[int | None]) -> tuple[int | None, ...]:
    vals = list(dict.fromkeys(values))
    ints = sorted(v for v in vals if v is not None)
    return (*ints, *([None] if None in vals else []))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of every tensor of the state dict: names, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _quantizable(model: nn.Module, spec: QuantSpec) -> list[str]:
    """FQNs ``quantize_`` swaps for a twin: found by doing it on a throwaway copy."""
    from edgeslim.quant.api import quantize_

    probe = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(quantize_(probe, QuantConfig(spec, None)))


class SearchSpace:
    """Per-layer bit choices and per-group keep-ratio choices of one model (see module doc).

    Build with :meth:`build`. The model is read, never changed: every policy is applied to
    a copy.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: Sequence[LayerChoices],
        groups: Sequence[GroupChoices],
        *,
        excluded: Sequence[str],
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        criterion: str,
        importance: Importance | None,
        scores: Sequence[torch.Tensor],
        candidates: Sequence[Any],
        round_to: int,
        calibration: int,
        seed: int,
        base_table: dict[str, LayerInfo],
        traced: Any,
        bn_recalibration: bool = True,
        reconstruct: bool = False,
        source: nn.Module | None = None,
        branches: Sequence[ResidualBranch] = (),
    ) -> None:
        self.model = model
        # the model the caller built the space from: ``model`` itself, or the model an
        # equivalent copy was made of (attention split into linears, so heads are groups)
        self.source = source if source is not None else model
        self.task = task
        self.layers = tuple(layers)
        self.branches = tuple(branches)
        self._n_channel = len(groups)
        self.groups = tuple(groups) + tuple(
            GroupChoices(DEPTH_PREFIX + b.name, 1, (0.0, 1.0), (0, 1)) for b in self.branches
        )
        self.excluded = tuple(excluded)
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.criterion = criterion
        self.round_to = round_to
        self.calibration = calibration
        self.seed = seed
        self.bn_recalibration = bn_recalibration
        self.reconstruct = reconstruct
        self._importance = importance
        self._scores = list(scores)
        self._cands = list(candidates)
        self._base_table = base_table
        self._traced = traced
        self._pruned: OrderedDict[tuple[int, ...], _Pruned] = OrderedDict()
        self._calib: list[Any] | None = None
        self._baseline: Costs | None = None
        self._model_fp: str | None = None
        self.dims: tuple[Dim, ...] = tuple(self._make_dims())

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        task: Task,
        w_bits: Sequence[int] = (4, 6, 8),
        a_bits: Sequence[int | None] = (8,),
        keep: Sequence[float] = (0.5, 0.75, 1.0),
        *,
        criterion: str = "l1",
        round_to: int = 1,
        skip: Iterable[str] = (),
        exclude: Iterable[str] = (),
        calibration: int = 256,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        seed: int = 0,
        bn_recalibration: bool = True,
        depth: bool = False,
        reconstruct: bool | None = None,
    ) -> SearchSpace:
        """The space of ``model`` on ``task``'s example inputs.

        ``w_bits``/``a_bits``: the bit choices of every layer (``None`` in ``a_bits``: float
        activations); ``keep``: the keep-ratio choices of every prunable group (``(1.0,)``
        searches no pruning). ``exclude``: layer FQNs or globs kept float and not searched;
        ``skip``: layers whose groups are never pruned. ``weight_spec``/``act_spec``: the
        quantizer settings the bits are put into (default: :func:`~edgeslim.quant.w8a8`'s).
        ``calibration``: calibration samples used when a policy is applied.
        When ``keep`` prunes and the model has ``nn.MultiheadAttention``, the space holds a
        copy with each split into four linears
        (:func:`~edgeslim.graph.attention.split_attention`), so heads are groups too.
        ``bn_recalibration``: after pruning, re-estimate every BatchNorm's statistics on those
        samples (EagleEye's adaptive BN). Cutting channels shifts the statistics the next
        layers see; without it a pruned resnet20 scored chance (9.5% validation top-1 at
        keep 0.75 everywhere) and the search could not tell good widths from bad ones (87.5%
        with it). A task without calibration data (costs only) skips it.
        ``depth``: also search removing each residual branch whole (group ``depth:<name>``,
        keep 0 or 1); a model without one is refused. Where per-layer overhead sets latency
        (resnet20 on ONNX Runtime's int8 kernels), removing branches is what moves it.
        ``reconstruct``: before a pruned policy is first measured, refit every layer that lost
        input channels by least squares on the calibration samples so that it reproduces the
        unpruned layer's outputs (:func:`~edgeslim.prune.reconstruct.reconstruct_`), in place
        of re-estimating BatchNorm (see :meth:`_measurable`). It needs pruning choices
        (``keep`` below 1), a task with calibration data, and no ``depth`` (a removed branch
        leaves no unpruned layer to fit against). ``None`` (the default): on wherever it can
        run (pruning choices, calibration data, no depth), else off.

        Decision — the refit is on by default: on resnet20 it scored keep 0.5 everywhere at
        87.7% validation top-1 where BatchNorm re-estimation alone scored 33.9% (keep 0.75:
        93.0% against 83.0%), so without it a search cannot tell a deep cut worth fine-tuning
        from a lost one. It costs one pass over the calibration samples per new set of
        widths (2-3 s on resnet20, 16-30 s on mobilenetv2-imagenet with 128 crops).
        """
        if reconstruct is None:
            reconstruct = (
                not depth and any(float(k) < 1.0 for k in keep) and task.calibration is not None
            )
        if reconstruct and (depth or all(float(k) >= 1.0 for k in keep)):
            raise SearchError(
                "reconstruct refits the layers that channel pruning narrowed: it needs keep "
                "choices below 1 and cannot be combined with depth"
            )
        if reconstruct and task.calibration is None:
            raise SearchError("reconstruct reads calibration samples; this task has none")
        w_choices = tuple(sorted(set(w_bits)))
        a_choices = _sorted_bits(a_bits)
        k_choices = tuple(sorted({float(k) for k in keep}))
        if not w_choices or not a_choices or not k_choices:
            raise SearchError("w_bits, a_bits and keep each need at least one choice")
        base = w8a8()
        assert base.weight is not None and base.activation is not None
        wspec = weight_spec or base.weight
        aspec = act_spec or base.activation
        for b in w_choices:
            _spec(wspec, b, "w_bits")
        for a in a_choices:
            if a is not None:
                _spec(aspec, a, "a_bits")
        bad = [k for k in k_choices if not 0.0 < k <= 1.0]
        if bad:
            raise SearchError(f"keep ratios must be in (0, 1]; got {bad[0]}")
        if round_to < 1:
            raise SearchError(f"round_to must be >= 1; got {round_to}")
        example = task.example_inputs
        model.eval()
        source = model
        if has_reparametrizations(model):  # weight_norm & co: plain weights, on a copy
            model = copy.deepcopy(model)
            bake_reparametrizations(model)
        if k_choices != (1.0,) and has_attention(model):
            # heads are searched too: on a split copy (same outputs; the caller's model stays)
            model = model if model is not source else copy.deepcopy(model)
            split_attention(model)
        graph = analyze(model, *example)
        exclude = list(exclude)
        names = _quantizable(model, replace(wspec, bits=w_choices[-1]))
        excluded = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in exclude)]
        unused = [p for p in exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise SearchError(
                f"exclude: {unused[0]!r} matches no quantizable layer; quantizable layers: "
                f"{_listing(names)}"
            )
        layers = [
            LayerChoices(
                n,
                type(model.get_submodule(n)).__name__,
                w_choices,
                a_choices,
                graph.layers[n].macs if n in graph.layers else 0,
                sum(p.numel() for p in model.get_submodule(n).parameters()),
            )
            for n in names
            if n not in excluded
        ]
        cands, _ = candidate_groups(graph, list(skip))
        groups: list[GroupChoices] = []
        scores: list[torch.Tensor] = []
        importance: Importance | None = None
        if k_choices != (1.0,) and cands:
            data = task.train if criterion in ("taylor", "fluctuation") else None
            importance = build_importance(criterion, data, seed)
            raw = importance.scores(model, graph.groups)
            scores = [normalised_scores(raw[g.id]) for g in cands]
            max_ratio = max(1.0 - k_choices[0], 0.0)
            per_keep = [ratio_widths(cands, 1.0 - k, max_ratio, round_to) for k in k_choices]
            for i, g in enumerate(cands):
                widths = tuple(w[i] for w in per_keep)
                groups.append(GroupChoices(group_key(g), g.size, k_choices, widths))
        else:
            cands = []
        branches: list[ResidualBranch] = []
        if depth:
            try:
                branches = removable_branches(model, example, graph.traced)
            except PruneError as exc:
                raise SearchError(f"depth: {exc}; search without depth") from None
        if not layers and not groups and not branches:
            raise SearchError(
                "the search space is empty: no quantizable layer (or all excluded) and no "
                "prunable group (or keep=(1.0,))"
            )
        return cls(
            model, task, layers, groups, excluded=excluded, weight_spec=wspec, act_spec=aspec,
            criterion=criterion, importance=importance, scores=scores, candidates=cands,
            round_to=round_to, calibration=calibration, seed=seed, base_table=graph.layers,
            traced=graph.traced, bn_recalibration=bn_recalibration, source=source,
            branches=branches, reconstruct=reconstruct,
        )  # fmt: skip

    def _make_dims(self) -> Iterator[Dim]:
        for layer in self.layers:
            if len(layer.w_bits) > 1:
                yield Dim("w_bits", layer.fqn, layer.w_bits)
            if len(layer.a_bits) > 1:
                yield Dim("a_bits", layer.fqn, layer.a_bits)
        for g in self.groups:
            if len(g.distinct) > 1:
                yield Dim("keep", g.key, g.distinct)

    # --- policies as genes ------------------------------------------------------------------

    @property
    def cardinality(self) -> int:
        """How many distinct policies the space holds."""
        return math.prod(len(d.choices) for d in self.dims)

    def decode(self, genes: Sequence[int]) -> Policy:
        """The policy at choice index ``genes[i]`` of ``dims[i]`` (0: most compressed)."""
        if len(genes) != len(self.dims):
            raise SearchError(f"{len(genes)} genes for a space of {len(self.dims)} dims")
        w = {layer.fqn: layer.w_bits[-1] for layer in self.layers}
        a: dict[str, int | None] = {layer.fqn: layer.a_bits[-1] for layer in self.layers}
        k = {g.key: g.keep[-1] for g in self.groups}
        for d, gi in zip(self.dims, genes, strict=True):
            if not 0 <= gi < len(d.choices):
                raise SearchError(f"gene {gi} out of range for {d.label} ({len(d.choices)})")
            if d.kind == "w_bits":
                w[d.name] = d.choices[gi]
            elif d.kind == "a_bits":
                a[d.name] = d.choices[gi]
            else:
                k[d.name] = d.choices[gi]
        return Policy.of(w, a, k)

    def encode(self, policy: Policy) -> tuple[int, ...]:
        """The genes of ``policy`` (checked against the space first). A keep ratio that
        leaves the same width as a searched one maps to it (:attr:`GroupChoices.distinct`)."""
        self.check(policy)
        groups = {g.key: g for g in self.groups}
        keep = {k: groups[k].canonical(r) for k, r in policy.keep.items()}
        values: dict[str, Mapping[str, Any]] = {
            "w_bits": policy.weight_bits, "a_bits": policy.act_bits, "keep": keep,
        }  # fmt: skip
        return tuple(d.choices.index(values[d.kind][d.name]) for d in self.dims)

    def top(self) -> tuple[int, ...]:
        """Genes of the least compressed policy."""
        return tuple(len(d.choices) - 1 for d in self.dims)

    def least_compressed(self) -> Policy:
        return self.decode(self.top())

    def most_compressed(self) -> Policy:
        return self.decode((0,) * len(self.dims))

    def uniform(
        self,
        w_bits: int | None = None,
        a_bits: int | Literal["float"] | None = None,
        keep: float | None = None,
    ) -> Policy:
        """The same bits and keep ratio everywhere (None: each choice's largest; ``a_bits=
        "float"``: float activations), for baselines; values must be choices of the space.
        Residual branches are all kept (``keep`` is the channel groups')."""
        a_val: int | None
        w = {layer.fqn: layer.w_bits[-1] if w_bits is None else w_bits for layer in self.layers}
        a: dict[str, int | None] = {}
        for layer in self.layers:
            if a_bits is None:
                a_val = max((b for b in layer.a_bits if b is not None), default=None)
            else:
                a_val = None if a_bits == "float" else int(a_bits)
            a[layer.fqn] = a_val
        k = {g.key: g.keep[-1] if keep is None else float(keep) for g in self.channel_groups}
        k.update({DEPTH_PREFIX + b.name: 1.0 for b in self.branches})  # no branch removed
        policy = Policy.of(w, a, k)
        self.check(policy)
        return policy

    def uniforms(self) -> list[Policy]:
        """Every uniform policy of the space (each bits x keep combination), for baselines."""
        ws: list[int | None] = [*sorted({b for lc in self.layers for b in lc.w_bits})] or [None]
        as_ = _sorted_bits(b for layer in self.layers for b in layer.a_bits) or (None,)
        keeps = {k for g in self.channel_groups for k in g.keep}
        ks: list[float | None] = [*sorted(keeps)] or [None]
        out = []
        for w, a, k in itertools.product(ws, as_, ks):
            out.append(self.uniform(w, "float" if a is None and self.layers else a, k))
        return list(dict.fromkeys(out))

    # --- checking ---------------------------------------------------------------------------

    def check(self, policy: Policy) -> None:
        """Refuse a policy that names unknown or missing layers/groups or disallowed values."""
        layers = {layer.fqn: layer for layer in self.layers}
        groups = {g.key: g for g in self.groups}
        w, a, k = policy.weight_bits, policy.act_bits, policy.keep
        _names("layers", w, layers)
        _names("keep", k, groups)
        for fqn, layer in layers.items():
            if w[fqn] not in layer.w_bits:
                raise PolicyError(
                    f"policy field layers[{fqn!r}].w_bits is {w[fqn]}; allowed values: "
                    f"{_values(layer.w_bits)}"
                )
            if a[fqn] not in layer.a_bits:
                raise PolicyError(
                    f"policy field layers[{fqn!r}].a_bits is {_value(a[fqn])}; allowed values: "
                    f"{_values(layer.a_bits)}"
                )
        for key, g in groups.items():
            if k[key] not in g.keep:
                raise PolicyError(
                    f"policy field keep[{key!r}] is {k[key]:g}; allowed values: {_values(g.keep)}"
                )

    # --- applying -----------------------------------------------------------------------------

    def _widths(self, policy: Policy) -> tuple[int, ...]:
        keep = policy.keep
        return tuple(g.width(keep[g.key]) for g in self.groups)

    @property
    def channel_groups(self) -> tuple[GroupChoices, ...]:
        """The coupling groups (not the residual branches)."""
        return self.groups[: self._n_channel]

    @property
    def coupling_groups(self) -> tuple[CouplingGroup, ...]:
        """The graph's coupling group of each of :attr:`channel_groups` (same order)."""
        return tuple(self._cands)

    @property
    def group_scores(self) -> tuple[torch.Tensor, ...]:
        """The criterion's normalised unit scores of each of :attr:`channel_groups`: a
        group at width ``w`` keeps its ``w`` highest-scored units."""
        return tuple(self._scores)

    def prunes(self, policy: Policy) -> bool:
        """Whether ``policy`` changes the structure: a channel group cut or a branch removed."""
        return any(w < g.size for w, g in zip(self._widths(policy), self.groups, strict=True))

    def removed_branches(self, policy: Policy) -> list[ResidualBranch]:
        """The residual branches ``policy`` removes."""
        keep = policy.keep
        return [b for b in self.branches if keep[DEPTH_PREFIX + b.name] == 0.0]

    def _prune(self, policy: Policy) -> _Pruned:
        widths = self._widths(policy)
        hit = self._pruned.get(widths)
        if hit is not None:
            self._pruned.move_to_end(widths)
            return hit
        channel = widths[: self._n_channel]
        removed = self.removed_branches(policy)
        if removed or any(w < g.size for w, g in zip(channel, self.channel_groups, strict=True)):
            model = copy.deepcopy(self.model)
            refit = None
            if any(w < g.size for w, g in zip(channel, self.channel_groups, strict=True)):
                assert self._importance is not None  # groups are only searched with a criterion
                kept = keep_map(self._cands, self._scores, channel)
                if self.reconstruct:
                    refit = prepare_surgery(model, kept).kept_positions()
                model = apply_keep(model, kept, self._importance)
            if removed:  # means from BatchNorm shifts, else from calibration samples
                calib = self.calibration_batches() if self.task.calibration is not None else None
                remove_branches(model, removed, calib)
            model.eval()
            table = layer_table(model, *self.task.example_inputs)
            # BatchNorm is re-estimated when the model is first measured (_measurable), not
            # here: screening a policy's costs reads its shapes only, and a search screens
            # many more policies than it measures (a bench run asked 580 of which the latency
            # limit let none through)
            pending = self.bn_recalibration and self.task.calibration is not None
        else:
            model, table, pending, refit = self.model, self._base_table, False, None
        entry = _Pruned(model, table, bn_pending=pending and refit is None, refit=refit)
        self._pruned[widths] = entry
        if len(self._pruned) > _CACHE:
            self._pruned.popitem(last=False)
        return entry

    def _measurable(self, policy: Policy) -> nn.Module:
        """The pruned float model with its narrowed layers refitted or its BatchNorm
        statistics re-estimated (once).

        Decision — a refitted model keeps its BatchNorm statistics: each refitted layer
        reproduces the unpruned layer's outputs, which are what those statistics describe
        (measured in docs/search.md)."""
        entry = self._prune(policy)
        if entry.refit is not None:
            from edgeslim.prune.reconstruct import reconstruct_

            try:
                reconstruct_(
                    entry.model, self.model, entry.refit, self.calibration_batches(),
                    seed=self.seed, progress=False,
                )  # fmt: skip
            except PruneError as exc:  # nothing refittable (e.g. only grouped convs narrowed)
                warnings.warn(
                    f"search space: {exc}; this pruned model's BatchNorm statistics are "
                    "re-estimated instead",
                    stacklevel=2,
                )
                entry.bn_pending = self.bn_recalibration
            entry.refit = None
        if entry.bn_pending:
            from edgeslim.train.batchnorm import reestimate_bn

            batches = self.calibration_batches()
            reestimate_bn(entry.model, batches, len(batches))  # restores eval mode
            entry.bn_pending = False
        return entry.model

    def bn_note(self) -> str | None:
        """What happens to BatchNorm statistics after pruning, said once (None when the
        space prunes nothing): re-estimated, or why not."""
        if not any(len(g.keep) > 1 or g.keep[0] < 1.0 for g in self.groups):
            return None
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if self.reconstruct:
            return (f"pruned policies: narrowed layers refitted by least squares on "
                    f"{self.calibration} calibration samples (BatchNorm kept)")  # fmt: skip
        if not self.bn_recalibration:
            why = "turned off (bn_recalibration=False)"
        elif not has_bn:
            why = "the model has no BatchNorm"
        elif self.task.calibration is None:
            why = "the task has no calibration data"
        else:
            return (f"pruned policies: BatchNorm statistics re-estimated on {self.calibration} "
                    "calibration samples")  # fmt: skip
        return f"pruned policies: BatchNorm statistics not re-estimated: {why}"

    def layer_table(self, policy: Policy) -> dict[str, LayerInfo]:
        """The layer table of the model pruned as ``policy`` says (cached; do not modify):
        what a per-layer latency predictor reads, with the policy's bits per FQN."""
        self.check(policy)
        return self._prune(policy).table

    def pruned(self, policy: Policy) -> nn.Module:
        """A float copy of the model pruned as ``policy`` says (its bits not applied)."""
        self.check(policy)
        return copy.deepcopy(self._measurable(policy))

    def calibration_batches(self) -> list[Any]:
        if self._calib is None:
            self._calib = self.task.calibration_batches(self.calibration)
        return self._calib

    def apply(self, policy: Policy, base: nn.Module | None = None) -> nn.Module:
        """A pruned, quantized and calibrated copy of the model; the same policy always
        gives the same model (deterministic ranking, surgery and calibration). ``base``: the
        pruned float model to quantize instead of the space's own (one fine-tuned after the
        cut, from :meth:`pruned`)."""
        from edgeslim.quant.api import calibrate

        self.check(policy)
        if base is None:
            base = self._measurable(policy)
        default, select, edges = self.quant_configs(policy, base)
        model = quantized_structure(base, default, select, edges)
        if any(c is not None and c.activation is not None for c in select.values()):
            calibrate(model, self.calibration_batches(), progress=False)
        return model.eval()

    def quant_configs(
        self, policy: Policy, base: nn.Module | None = None
    ) -> tuple[QuantConfig, dict[str, QuantConfig | None], bool]:
        """``(default, per-FQN configs, edges)`` :meth:`apply` quantizes ``policy`` with
        (``base``: the pruned model, without the layers of removed branches); ``edges``:
        activation quantizers go on the graph's edges, as PTQ puts them, which needs one
        activation precision for the whole model (mixed ones stay on the layers' inputs)."""
        if base is None:
            base = self._prune(policy).model
        w, a = policy.weight_bits, policy.act_bits
        gone = removed_modules(base)  # layers of removed branches: nothing to quantize
        w = {fqn: bits for fqn, bits in w.items() if fqn not in gone}
        select: dict[str, QuantConfig | None] = {}
        for fqn, bits in w.items():
            act = a[fqn]
            select[fqn] = QuantConfig(
                replace(self.weight_spec, bits=bits),
                None if act is None else replace(self.act_spec, bits=act),
            )
        select.update(dict.fromkeys(self.excluded))
        acts = {a[fqn] for fqn in w}
        uniform_act = next(iter(acts)) if len(acts) == 1 else None
        default = QuantConfig(
            replace(self.weight_spec, bits=max(w.values(), default=8)),
            None if uniform_act is None else replace(self.act_spec, bits=uniform_act),
        )
        return default, select, len(acts) <= 1

    def structure(self, policy: Policy) -> dict[str, Any]:
        """What rebuilds ``policy``'s model without data (JSON, :data:`STRUCTURE_FORMAT`):
        whether attention was split, the prune plan (kept channels per group, by the scores
        this space ranked with), the residual branches removed, and the quantization
        configs. :func:`rebuild_structure` replays it on the model the space was built from;
        the weights and calibrated ranges come from a saved state afterwards."""
        self.check(policy)
        from edgeslim.prune.plan import PrunePlan
        from edgeslim.prune.planner import keep_map

        channel = self._widths(policy)[: self._n_channel]
        plan = None
        if any(w < g.size for w, g in zip(channel, self.channel_groups, strict=True)):
            kept = keep_map(self._cands, self._scores, channel)
            plan = PrunePlan.from_groups(self.model, kept, self.task.example_inputs).to_dict()
        default, select, edges = self.quant_configs(policy)
        return {
            "format": STRUCTURE_FORMAT,
            "policy": policy.id,
            "split_attention": any(
                isinstance(m, SplitMultiheadAttention) for m in self.model.modules()
            ),
            "plan": plan,
            "removed_branches": [b.name for b in self.removed_branches(policy)],
            "default": default.to_dict(),
            "select": {k: None if c is None else c.to_dict() for k, c in select.items()},
            "edges": edges,
        }

    # --- costs ----------------------------------------------------------------------------------

    def _widest_act(self, a: Mapping[str, int | None], table: Mapping[str, LayerInfo]) -> int:
        """Bits of the widest activation a compute layer reads (float: 32)."""
        widest = 0
        for fqn, row in table.items():
            if row.macs:
                bits = a.get(fqn)
                widest = max(widest, 32 if bits is None else bits)
        return widest or 32

    def costs(self, policy: Policy, latency: LatencyPredictor | None = None) -> Costs:
        """The analytic costs of ``policy`` (no accuracy measured; see module doc)."""
        self.check(policy)
        pr = self._prune(policy)
        w = policy.weight_bits
        a = {k: (32 if v is None else v) for k, v in policy.act_bits.items()}
        if pr.peak is None:
            traced = self._traced if pr.model is self.model else None
            pr.peak = peak_activation_bytes(pr.model, *self.task.example_inputs, traced=traced)
        widest = self._widest_act(policy.act_bits, pr.table)
        return Costs(
            macs=int(total_macs(pr.table)),
            bops=int(bops(pr.table, w, a)),
            size=int(size_bytes(pr.model, w)),
            memory=math.ceil(pr.peak * widest / 32),
            latency=None if latency is None else float(latency.predict(policy)),
        )

    def baseline_costs(self, latency: LatencyPredictor | None = None) -> Costs:
        """Costs of the uncompressed float model (32-bit weights and activations)."""
        if self._baseline is None:
            example = self.task.example_inputs
            self._baseline = Costs(
                macs=int(total_macs(self._base_table)),
                bops=int(bops(self._base_table)),
                size=int(size_bytes(self.model)),
                memory=int(peak_activation_bytes(self.model, *example, traced=self._traced)),
            )
        if latency is None:
            return self._baseline
        return replace(self._baseline, latency=float(latency.predict(None)))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the traced graph (an fx GraphModule does not pickle; it is
        retraced when needed), so a parallel executor can ship the space to its workers."""
        state = dict(self.__dict__)
        state["_traced"] = None
        return state

    # --- identity -------------------------------------------------------------------------------

    @property
    def model_fingerprint(self) -> str:
        if self._model_fp is None:
            self._model_fp = model_fingerprint(self.model)
        return self._model_fp

    def to_dict(self) -> dict[str, Any]:
        """What the space is, as JSON data (the journal records it)."""
        return {
            "task": self.task.name,
            "layers": {
                lc.fqn: {"w_bits": list(lc.w_bits), "a_bits": list(lc.a_bits)} for lc in self.layers
            },
            "groups": {
                g.key: {"size": g.size, "keep": list(g.keep), "widths": list(g.widths)}
                for g in self.groups
            },
            "excluded": list(self.excluded),
            "criterion": self.criterion,
            "round_to": self.round_to,
            "calibration": self.calibration,
            "weight_spec": self.weight_spec.to_dict(),
            "act_spec": self.act_spec.to_dict(),
            "seed": self.seed,
            "bn_recalibration": self.bn_recalibration,
            **({"reconstruct": True} if self.reconstruct else {}),  # fingerprints unchanged
            # only with branches, so the fingerprints of spaces without them do not change
            **({"branches": {b.name: list(b.modules) for b in self.branches}}
               if self.branches else {}),
        }  # fmt: skip

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the model's weights and the space's choices."""
        text = json.dumps([self.model_fingerprint, self.to_dict()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        lines = [
            f"search space of {type(self.model).__name__} on task {self.task.name!r}: "
            f"{len(self.layers)} layer(s), {len(self.groups)} group(s), {len(self.dims)} "
            f"searched dim(s), {self.cardinality} policies"
        ]
        for lc in self.layers:
            lines.append(
                f"  layer {lc.fqn} ({lc.kind}): w_bits {_values(lc.w_bits)}; "
                f"a_bits {_values(lc.a_bits)}"
            )
        for g in self.channel_groups:
            kept = ", ".join(f"{k:g}->{w}" for k, w in zip(g.keep, g.widths, strict=True))
            lines.append(f"  group {g.key} ({g.size} channels): keep {kept}")
        for b in self.branches:
            lines.append(
                f"  group {DEPTH_PREFIX}{b.name} (residual branch of {len(b.modules)} layers "
                f"ending in {b.last}): keep 1 (kept) or 0 (removed)"
            )
        return "\n".join(lines)


def _spec(template: QuantSpec, bits: int, what: str) -> QuantSpec:
    from edgeslim.quant.spec import QuantConfigError

    try:
        return replace(template, bits=bits)
    except QuantConfigError as exc:
        raise SearchError(f"{what} choice {bits}: {exc}") from None


def _value(v: Any) -> str:
    return "null (float)" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _values(values: Iterable[Any]) -> str:
    return ", ".join(_value(v) for v in values)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _names(field_name: str, given: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    what = "layer" if field_name == "layers" else "group"
    for name in given:
        if name not in allowed:
            raise PolicyError(
                f"policy field {field_name}[{name!r}]: no such searched {what} in this space; "
                f"allowed {what}s: {_listing(list(allowed)) or 'none'}"
            )
    for name in allowed:
        if name not in given:
            raise PolicyError(
                f"policy field {field_name} lacks {what} {name!r}; a policy names every "
                f"searched {what}: {_listing(list(allowed))}"
            )


__all__ = [
    "COST_NAMES",
    "DEPTH_PREFIX",
    "Costs",
    "Dim",
    "GroupChoices",
    "LayerChoices",
    "SearchSpace",
    "model_fingerprint",
]
