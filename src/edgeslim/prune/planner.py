"""The pruning planner: how many channels each coupling group keeps, and which ones.

``plan_pruning`` turns an importance criterion and a budget into a :class:`PrunePlan`:

- **Global ranking under a MACs target** (``macs_reduction=0.5``): every channel of every
  prunable group is ranked by its score divided by its group's mean score, and channels are
  removed lowest-first until the MACs drop by the target. With ``round_to=k`` a group loses
  channels ``k`` at a time (a *step*), ranked by the mean score of the step's channels, so
  every kept width is a multiple of ``k`` (or the group's full width).
- **Uniform ratio** (``ratio=0.3``, or ``macs_reduction`` with ``global_ranking=False``):
  every group loses the same fraction; for a MACs target the ratio is found by bisection.
- **Per-layer ratios** (``ratio={"layer1.0.conv1": 0.5, "layer3.*": 0.25}``): keys are group
  keys (the first producing layer's FQN, see :func:`~edgeslim.prune.surgery.group_key`) or
  ``fnmatch`` globs over them; unlisted groups stay whole.

No group ever loses more than ``max_group_ratio`` of its channels. Groups the coupling
analysis marks not prunable (an op edgeslim cannot slice through, a reshape that mixes
channels, a misaligned add) are left whole and named in one :class:`PruneWarning`; the
natural ones (the model input and output) are not worth a warning.

Decision — MACs are computed by an exact model of the surgery, not estimated: a conv or
linear layer's MACs scale with the fraction of its input columns and output rows that stay
(a depthwise conv's with its channels, an attention block's matmuls with its heads), which
is exactly how :func:`~edgeslim.graph.layers.module_macs` counts them; a recurrent layer's
input matmuls scale with its input and hidden fractions, its hidden matmuls with the square
of the hidden fraction. The chosen plan is
then applied to a copy and counted with the layer table; if that real count disagrees with
the model (an op the model does not cover), the search runs again on a corrected target.
Global ranking lands in ``[target, target + 1 point]``: a step that would overshoot that
window is skipped (and its group frozen) while cheaper steps of other groups fill the gap;
on a model whose every remaining step is coarser than 2 points (a few wide coupled groups,
as in ShuffleNet), it stops up to 2 points short of the target instead of far past it.
A plan whose measured reduction is still more than ``MACS_TOLERANCE`` (2 points) from the
target, either way (a residual stream of conv groups that goes 25 points at a time, a
uniform ratio over groups of two blocks), is refused naming the finest step, unless
``allow_target_miss=True``: a target is met or the call fails.

Latency-aware ranking (``latency_weight > 0``): each group's scores are divided by its
fp32 kernel time per MAC relative to the model's, to the power ``latency_weight``, so the
same MACs target removes more of the MACs that are slow on this machine (see
:mod:`edgeslim.prune.latency_rank`, with the figures measured).

Decision — normalisation: scores are divided by their group's mean before global
ranking (Torch-Pruning's ``normalizer="mean"``), so a residual group whose score sums
three producers is not ranked three times more important than a plain one, and Taylor's
raw loss changes compare across groups as relative importance.

Decision — rank by score alone, not by score per MAC saved (the knapsack ratio): dividing
by each group's per-channel MACs (even by its square root) sent every early,
high-resolution group to ``round_to`` channels and cost accuracy after the same fine-tune
(-50% MACs, l1, 1 epoch on 10k images with KD: resnet20 91.3% vs 93.0%, vgg-small 91.4%
vs 92.3%).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgeslim.data.batching import Batch, TensorBatches
from edgeslim.errors import PruneError, UnreachableTargetError
from edgeslim.graph import layer_table, total_macs
from edgeslim.graph.attention import has_attention, split_attention
from edgeslim.graph.coupling import CouplingGroup
from edgeslim.graph.layers import recurrent_gates
from edgeslim.graph.model_graph import ModelGraph, analyze
from edgeslim.prune.config import MACS_TOLERANCE, PruneConfig
from edgeslim.prune.importance import Importance, get_importance
from edgeslim.prune.plan import PrunePlan
from edgeslim.prune.surgery import (
    describe_group,
    group_key,
    prune_groups,
    round_keep,
    unit_round,
)

if TYPE_CHECKING:
    from edgeslim.cost.lut import LatencyTable

NATURAL_REASONS = ("model input", "model output")
TOLERANCE = 0.01  # a MACs target is met when the reduction lands in [target, target + 1 point]
_EPS = 1e-9
_NEARBY_GROUPS = 16  # up to this many candidate groups, the window search looks 3 moves away


class PruneWarning(UserWarning):
    """Something was left unpruned or a target could only be approximated."""


@dataclass(frozen=True)
class PlanStats:
    """What a plan achieves, measured on a pruned copy of the model."""

    base_macs: int
    macs: int
    kept: dict[str, int]
    sizes: dict[str, int]

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs / self.base_macs if self.base_macs else 0.0


# --- MACs after removing units, exactly as the layer table counts them -------------------


@dataclass(frozen=True)
class _Axis:
    length: int
    terms: tuple[tuple[int, int], ...]  # (candidate index, positions per removed unit)


@dataclass(frozen=True)
class _Row:
    macs: int
    axes: tuple[_Axis, ...]
    fqn: str = ""


class MacModel:
    """Total MACs of a model as a function of how many units each candidate group loses.

    Built from one layer table: a conv/linear layer's MACs are proportional to its input
    columns (``in`` members, ``unit * repeat`` per unit) times its output rows (``out``),
    a depthwise conv's to its channels, a BERT attention block's matmuls to its heads; a
    recurrent layer's are split into its input matmuls (input x hidden) and its hidden
    matmuls (hidden x hidden).
    """

    def __init__(
        self, model: nn.Module, graph: ModelGraph, candidates: Sequence[CouplingGroup]
    ) -> None:
        axes: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for ci, g in enumerate(candidates):
            for mem in g.members:
                axis = {"in": "in", "out": "out", "depthwise": "out"}.get(mem.role)
                if axis is not None:
                    width = g.unit * (mem.repeat if mem.role == "in" else 1)
                    axes.setdefault((mem.fqn, axis), []).append((ci, width))
            if g.kind == "head" and g.producers and "." in g.producers[0]:
                parent = g.producers[0].rsplit(".", 1)[0]
                axes.setdefault((parent, "heads"), []).append((ci, 1))
        self.fixed = 0
        self.rows: list[_Row] = []
        for fqn, info in graph.layers.items():
            row_axes = []
            for axis in ("in", "out", "heads"):
                terms = axes.get((fqn, axis))
                if terms:
                    row_axes.append(_Axis(_axis_length(model, fqn, axis), tuple(terms)))
            module = model.get_submodule(fqn)
            if row_axes and info.macs and recurrent_gates(module):
                self.rows.extend(_recurrent_rows(module, info.macs, axes.get((fqn, "in"), []),
                                                 axes.get((fqn, "out"), [])))  # fmt: skip
            elif row_axes and info.macs:
                self.rows.append(_Row(info.macs, tuple(row_axes), fqn))
            else:
                self.fixed += info.macs
        self.base = self.fixed + sum(r.macs for r in self.rows)

    def macs(self, removed: Sequence[int]) -> float:
        """MACs after candidate ``i`` loses ``removed[i]`` units."""
        total = float(self.fixed)
        for row in self.rows:
            m = float(row.macs)
            for ax in row.axes:
                m *= (ax.length - sum(removed[ci] * w for ci, w in ax.terms)) / ax.length
            total += m
        return total

    def reduction(self, removed: Sequence[int]) -> float:
        return 1.0 - self.macs(removed) / self.base if self.base else 0.0


def _recurrent_rows(
    m: nn.Module, macs: int, ins: list[tuple[int, int]], outs: list[tuple[int, int]]
) -> list[_Row]:
    """A recurrent layer as two rows: its first layer's ``x @ W_ih`` (MACs ~ input x hidden)
    and the rest (~ hidden x hidden, so the hidden axis appears twice): every ``h @ W_hh``
    and, in a stack of ``num_layers``, each later layer's ``W_ih``, whose input is the layer
    below's hidden state (twice as wide when bidirectional). Charging a 2-layer LSTM's whole
    ``W_ih`` share to its input axis made -30% read as -61% out of reach."""
    i_size, h_size = m.input_size, m.hidden_size
    assert isinstance(i_size, int) and isinstance(h_size, int)
    layers = int(getattr(m, "num_layers", 1))
    sides = 2 if getattr(m, "bidirectional", False) else 1
    # per direction and step: the first layer h * (i + h), each later one h * (sides*h + h)
    ih = macs * i_size // (i_size + h_size + (layers - 1) * (sides + 1) * h_size)
    hidden = _Axis(h_size, tuple(outs))
    rows = [_Row(ih, (_Axis(i_size, tuple(ins)), hidden)), _Row(macs - ih, (hidden, hidden))]
    return [_Row(r.macs, tuple(a for a in r.axes if a.terms)) for r in rows]


def _axis_length(model: nn.Module, fqn: str, axis: str) -> int:
    m = model.get_submodule(fqn)
    if recurrent_gates(m) and axis in ("in", "out"):
        size = m.input_size if axis == "in" else m.hidden_size
        assert isinstance(size, int)
        return size
    if axis == "heads":
        heads = m.num_attention_heads
        assert isinstance(heads, int)
        return heads
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, k...)
        return int(weight.shape[0]) if axis == "in" else int(weight.shape[1]) * m.groups
    return int(weight.shape[1 if axis == "in" else 0])


# --- the planner -------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _warn_fixed(groups: Sequence[CouplingGroup]) -> list[str]:
    """Warn once about every group with layers that the analysis could not make prunable."""
    lines = []
    for g in groups:
        if g.prunable or not g.producers or g.reason in NATURAL_REASONS:
            continue
        layers = ", ".join(dict.fromkeys(g.producers))
        lines.append(f"{layers} ({g.reason})")
    if lines:
        warnings.warn(
            "left whole, not safe to prune: " + "; ".join(lines), PruneWarning, stacklevel=3
        )
    return lines


def candidate_groups(
    graph: ModelGraph, skip: Sequence[str]
) -> tuple[list[CouplingGroup], list[CouplingGroup]]:
    """``(prunable groups the planner may shrink, groups skipped by request)``."""
    used = dict.fromkeys(skip, False)
    cands: list[CouplingGroup] = []
    skipped: list[CouplingGroup] = []
    for g in graph.groups:
        if not g.prunable or not g.producers or g.size < 2:
            continue
        names = [group_key(g), *(m.fqn for m in g.members)]
        hit = [p for p in skip if any(_matches(n, p) for n in names)]
        for p in hit:
            used[p] = True
        (skipped if hit else cands).append(g)
    unknown = [p for p, u in used.items() if not u and not _is_glob(p)]
    for p in unknown:
        try:
            graph.model.get_submodule(p)
        except AttributeError:
            raise PruneError(
                f"skip: the model has no layer {p!r}; give layer FQNs or glob patterns"
            ) from None
    return cands, skipped


def normalised_scores(scores: torch.Tensor) -> torch.Tensor:
    """One group's scores over their mean (see the module doc's normalisation decision)."""
    s = scores.double()
    mean = float(s.abs().mean())
    return s / mean if mean > 0 else torch.ones_like(s)


def _min_keep(size: int, max_group_ratio: float, round_to: int) -> int:
    return round_keep(math.ceil(size * (1.0 - max_group_ratio) - _EPS), size, round_to)


def _widths(size: int, min_keep: int, round_to: int) -> list[int]:
    """Allowed kept widths, widest first: the full width, then multiples of ``round_to``."""
    lower = [w for w in range(size - 1, min_keep - 1, -1) if w % round_to == 0]
    return [size, *lower]


def _ratio_keep(size: int, ratio: float, min_keep: int, round_to: int) -> int:
    return max(min_keep, round_keep(math.ceil(size * (1.0 - ratio) - _EPS), size, round_to))


def _global_widths(
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    scores: Sequence[torch.Tensor],
    target: float,
    max_group_ratio: float,
    round_to: int,
) -> list[int]:
    """Kept width per candidate: remove the lowest-scored steps until ``target`` is met.

    A step's priority is the mean score of its channels. A step that would overshoot the
    target by more than :data:`TOLERANCE` is not taken and freezes its group (its later
    steps remove even more); when the walk stops short, the widths a few steps away
    (:func:`_nearby_in_window`), then the walks that take one frozen group's coarse step
    first (:func:`_coarse_first`), are searched for a plan in the window; failing those,
    the smallest overshoot is taken, unless it passes the target by more than
    :data:`~edgeslim.prune.config.MACS_TOLERANCE` while where the search stopped is within
    that of it (short): then the search stops there. :func:`plan_keep` refuses a result
    more than that from the target (``allow_target_miss`` keeps it).
    """
    steps: list[tuple[float, int, int]] = []
    widths: list[list[int]] = []
    cost: list[list[float]] = []  # per group, the scores each step removes (step 0: none)
    for ci, (g, s) in enumerate(zip(cands, scores, strict=True)):
        r = unit_round(g, round_to)
        ws = _widths(g.size, _min_keep(g.size, max_group_ratio, r), r)
        widths.append(ws)
        cost.append([0.0])
        ranked = torch.sort(s).values
        for j in range(1, len(ws)):
            chunk = ranked[g.size - ws[j - 1] : g.size - ws[j]]
            steps.append((float(chunk.mean()), ci, j))
            cost[ci].append(float(chunk.sum()))
    steps.sort()
    level, removed, frozen, reached = _walk(macs, cands, widths, steps, [0] * len(cands), target)
    if not reached and frozen:
        nearby = _nearby_in_window(macs, cands, widths, cost, level, target)
        if nearby is None:
            nearby = _coarse_first(macs, cands, widths, cost, steps, level, frozen, target)
        if nearby is not None:
            return nearby
    if not reached and frozen:  # the smallest overshoot, from where the search stopped
        over = {}
        for ci in frozen:
            trial = list(removed)
            trial[ci] = cands[ci].size - widths[ci][level[ci] + 1]
            over[ci] = macs.reduction(trial)
        ci = min(over, key=lambda c: over[c])
        short = target - macs.reduction(removed)
        if over[ci] - target > MACS_TOLERANCE and short <= MACS_TOLERANCE:
            # every step left is coarser than the tolerance (few, wide coupled groups): stop
            # a little short of the target rather than far past it
            return [widths[c][level[c]] for c in range(len(cands))]
        level[ci] += 1
        reached = over[ci] >= target - _EPS
    if not reached:
        best = macs.reduction([g.size - w[-1] for g, w in zip(cands, widths, strict=True)])
        raise UnreachableTargetError(
            f"cannot remove {target:.1%} of the MACs: at most {best:.1%} with "
            f"max_group_ratio={max_group_ratio} and round_to={round_to} (groups left whole, "
            "if any, are named in the warning before this): lower the target, or in a prune "
            "stage set allow_target_miss: true to prune as far as it goes",
            best,
        )
    return [widths[ci][level[ci]] for ci in range(len(cands))]


def _walk(
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    widths: Sequence[Sequence[int]],
    steps: Sequence[tuple[float, int, int]],
    start: Sequence[int],
    target: float,
) -> tuple[list[int], list[int], dict[int, float], bool]:
    """The greedy walk from the levels ``start``: take the lowest-priority steps in order;
    a step passing the window freezes its group. ``(level, removed, frozen, reached)``."""
    level = list(start)
    removed = [g.size - widths[c][v] for c, (g, v) in enumerate(zip(cands, level, strict=True))]
    frozen: dict[int, float] = {}
    if macs.reduction(removed) >= target - _EPS:
        return level, removed, frozen, True
    for _, ci, j in steps:
        if ci in frozen or j != level[ci] + 1:
            continue
        trial = list(removed)
        trial[ci] = cands[ci].size - widths[ci][j]
        red = macs.reduction(trial)
        if red > target + TOLERANCE:
            frozen[ci] = red
            continue
        level[ci], removed = j, trial
        if red >= target - _EPS:
            return level, removed, frozen, True
    return level, removed, frozen, False


def _coarse_first(
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    widths: Sequence[Sequence[int]],
    cost: Sequence[Sequence[float]],
    steps: Sequence[tuple[float, int, int]],
    level: Sequence[int],
    frozen: Mapping[int, float],
    target: float,
) -> list[int] | None:
    """Widths in the window found by taking one frozen group's coarse step first and
    walking the fine steps of the others from there; the one removing the least importance,
    or None. Why: a concat of two 16-channel branches read by a conv of 4 groups can lose
    only 8 channels of a branch at a time; the walk spent the target on the fine groups
    first, and that step then overshot (-30% asked: -37.8% taken, while -31.1% was a plan
    with the coarse step first and fewer fine ones)."""
    best: tuple[float, float, list[int]] | None = None
    for ci in frozen:
        start = [0] * len(cands)
        start[ci] = level[ci] + 1
        if start[ci] >= len(widths[ci]):
            continue
        lv, removed, _, reached = _walk(macs, cands, widths, steps, start, target)
        red = macs.reduction(removed)
        if not reached or red > target + TOLERANCE:
            continue
        lost = sum(sum(cost[c][1 : v + 1]) for c, v in enumerate(lv))
        if best is None or (lost, red) < best[:2]:
            best = (lost, red, [widths[c][v] for c, v in enumerate(lv)])
    return None if best is None else best[2]


def _nearby_in_window(
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    widths: Sequence[Sequence[int]],
    cost: Sequence[Sequence[float]],
    level: Sequence[int],
    target: float,
) -> list[int] | None:
    """Widths in the target's window ``[target, target + TOLERANCE]`` a few steps from
    where the greedy walk stopped short (each move adds or gives back one step of a group:
    up to 3 moves with at most :data:`_NEARBY_GROUPS` groups, 2 with up to four times as
    many, else 1), the one removing the
    least importance (``cost[c][j]``: the scores step ``j`` of group ``c`` removes); None
    when there is none. Why: a TCN asked for -30% got -34.7%, its walk's next steps all
    overshooting, while -30.1% was one step swap away."""
    n = len(cands)
    moves = [(c, d) for c in range(n) for d in (1, -1)]
    # moves to try: (2n)^depth states at most; many groups mean fine steps and a walk that
    # lands on its own, so a wide model gets the short look only
    depth = 3 if n <= _NEARBY_GROUPS else 2 if n <= 4 * _NEARBY_GROUPS else 1
    best: tuple[float, float, list[int]] | None = None
    seen: set[tuple[int, ...]] = set()
    for k in range(1, depth + 1):
        for combo in itertools.combinations_with_replacement(moves, k):
            lv = list(level)
            for c, d in combo:
                lv[c] += d
            key = tuple(lv)
            if key in seen or any(not 0 <= v < len(widths[c]) for c, v in enumerate(lv)):
                continue
            seen.add(key)
            red = macs.reduction(
                [g.size - widths[c][v] for c, (g, v) in enumerate(zip(cands, lv, strict=True))]
            )
            if not target - _EPS <= red <= target + TOLERANCE:
                continue
            lost = sum(sum(cost[c][1 : v + 1]) for c, v in enumerate(lv))
            if best is None or (lost, red) < best[:2]:
                best = (lost, red, [widths[c][v] for c, v in enumerate(lv)])
    return None if best is None else best[2]


def _uniform_widths(
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    target: float,
    max_group_ratio: float,
    round_to: int,
) -> list[int]:
    """Kept widths at the smallest uniform ratio that meets ``target`` (bisection)."""
    steps = [unit_round(g, round_to) for g in cands]
    mins = [_min_keep(g.size, max_group_ratio, k) for g, k in zip(cands, steps, strict=True)]

    def widths(r: float) -> list[int]:
        return [_ratio_keep(g.size, r, m, k) for g, m, k in zip(cands, mins, steps, strict=True)]

    def reduction(r: float) -> float:
        return macs.reduction([g.size - w for g, w in zip(cands, widths(r), strict=True)])

    lo, hi = 0.0, max_group_ratio
    if reduction(hi) < target - _EPS:
        raise PruneError(
            f"cannot remove {target:.1%} of the MACs with a uniform ratio: at most "
            f"{reduction(hi):.1%} with max_group_ratio={max_group_ratio}, round_to={round_to}"
        )
    for _ in range(50):
        mid = (lo + hi) / 2
        if reduction(mid) >= target - _EPS:
            hi = mid
        else:
            lo = mid
    return widths(hi)


def ratio_widths(
    cands: Sequence[CouplingGroup],
    ratio: float | Mapping[str, float],
    max_group_ratio: float,
    round_to: int,
) -> list[int]:
    """Kept widths for a fixed ratio, or per group key / glob (unlisted groups stay whole)."""
    per: list[float] = []
    if isinstance(ratio, Mapping):
        keys = [group_key(g) for g in cands]
        for k in ratio:
            if not _is_glob(k) and k not in keys:
                raise PruneError(
                    f"ratio: {k!r} is not a prunable group of this model; group keys: "
                    f"{', '.join(keys)}"
                )
        for key in keys:
            exact = ratio.get(key)
            globbed = [v for k, v in ratio.items() if _is_glob(k) and _matches(key, k)]
            per.append(exact if exact is not None else globbed[0] if globbed else 0.0)
    else:
        per = [float(ratio)] * len(cands)
    for g, r in zip(cands, per, strict=True):
        if not 0.0 <= r <= max_group_ratio:
            raise PruneError(
                f"ratio for group {group_key(g)!r} must be in [0, max_group_ratio="
                f"{max_group_ratio}]; got {r}"
            )
    return [
        _ratio_keep(g.size, r, _min_keep(g.size, max_group_ratio, k), k)
        for g, r, k in zip(cands, per, [unit_round(g, round_to) for g in cands], strict=True)
    ]


def _resolve(importance: Importance | str) -> Importance:
    return get_importance(importance) if isinstance(importance, str) else importance


def build_importance(
    name: str,
    data: Iterable[Batch] | None = None,
    seed: int = 0,
    batches: int = 8,
    batch_size: int = 64,
) -> Importance:
    """A registered criterion ready to score: ``taylor`` and ``fluctuation`` get the first
    ``batches`` batches of ``data`` (``(inputs, target)`` pairs; fluctuation ignores the
    targets), ``random`` and ``epruner`` get ``seed``.

    A :class:`TensorBatches` is first re-cut into ``batch_size`` batches shuffled by
    ``seed``, without its augmentation, so the scores depend on the seed alone, not on how
    the data source was set up for training or how often it was iterated.
    """
    if name in ("taylor", "fluctuation"):
        if isinstance(data, TensorBatches):
            data = data.rebatched(batch_size, shuffle=True, seed=seed)
            data.transform = None  # scores from the data as it is, not a random augmentation
        chunks = list(itertools.islice(data, batches)) if data is not None else []
        if not chunks:
            raise PruneError(f"the {name} criterion needs training data to run batches on")
        return get_importance(name, batches=chunks)
    if name in ("random", "epruner"):
        return get_importance(name, seed=seed)
    return get_importance(name)


def plan_keep(
    model: nn.Module,
    example_args: Sequence[Any],
    importance: Importance | str,
    config: PruneConfig | None = None,
    *,
    latency_table: LatencyTable | None = None,
    **options: Any,
) -> tuple[dict[CouplingGroup, list[int]], PlanStats]:
    """The planner's core: ``({group: kept indices}, stats)`` for :func:`plan_pruning`.

    The budget and ranking come from ``config`` (a :class:`PruneConfig`) with ``options``
    (its field names as keywords, e.g. ``macs_reduction=0.3``) replacing its fields.
    Only groups that lose channels appear in the map. ``stats`` are measured on a pruned
    copy of ``model``; ``model`` itself is not changed. ``latency_weight > 0`` tilts the
    global ranking towards groups whose MACs are slow on this machine (see
    :mod:`edgeslim.prune.latency_rank`; ``latency_table`` defaults to the machine's cached
    table, timed on first use).
    """
    cfg = PruneConfig.build(config, **options)
    macs_reduction, ratio, round_to = cfg.macs_reduction, cfg.ratio, cfg.round_to
    global_ranking, max_group_ratio = cfg.global_ranking, cfg.max_group_ratio
    criterion = _resolve(importance)
    graph = analyze(model, *example_args)
    fixed = _warn_fixed(graph.groups)
    cands, skipped = candidate_groups(graph, list(cfg.skip))
    if not cands:
        why = [f"{len(skipped)} skipped by request"] if skipped else []
        why += (
            fixed[:4] or [f"{describe_group(g)}: {g.reason}" for g in graph.groups if g.reason][:4]
        )
        raise PruneError(
            f"no prunable channel group is left to prune in {type(model).__name__}"
            + (f"; fixed groups: {'; '.join(why)}" if why else "")
        )
    macs = MacModel(model, graph, cands)
    raw = criterion.scores(model, graph.groups)
    scores = [normalised_scores(raw[g.id]) for g in cands]
    if cfg.latency_weight > 0:
        scores = _latency_tilted(model, graph, macs, scores, cfg.latency_weight, latency_table)

    def choose(target: float) -> list[int]:
        if global_ranking:
            return _global_widths(macs, cands, scores, target, max_group_ratio, round_to)
        return _uniform_widths(macs, cands, target, max_group_ratio, round_to)

    if ratio is not None:
        widths = ratio_widths(cands, ratio, max_group_ratio, round_to)
    else:
        assert macs_reduction is not None
        widths = choose(macs_reduction)
    keep = keep_map(cands, scores, widths)
    stats = measure_plan(model, example_args, keep, macs.base)
    if macs_reduction is not None:
        # The layer table is the truth: if it disagrees with the MAC model (an op the model
        # does not cover), shift the target by the disagreement and search again.
        target = macs_reduction
        for _ in range(3):
            predicted = macs.reduction([g.size - w for g, w in zip(cands, widths, strict=True)])
            gap = predicted - stats.macs_reduction
            if abs(gap) < 1e-4:
                break
            target = min(max(target + gap, 1e-4), 0.999)
            widths = choose(target)
            keep = keep_map(cands, scores, widths)
            stats = measure_plan(model, example_args, keep, macs.base)
        if not cfg.allow_target_miss:
            _refuse_miss(macs_reduction, stats.macs_reduction, macs, cands, round_to, cfg)
    return keep, stats


def _refuse_miss(
    target: float,
    achieved: float,
    macs: MacModel,
    cands: Sequence[CouplingGroup],
    round_to: int,
    cfg: PruneConfig,
) -> None:
    """Refuse a plan more than ``MACS_TOLERANCE`` from its target, naming the finest
    single step the model offers (a miss larger than it comes from the coarser ones) and
    what to change."""
    if abs(achieved - target) <= MACS_TOLERANCE:
        return
    shares = []
    for ci, g in enumerate(cands):
        step = unit_round(g, round_to)
        if step < g.size:
            removed = [0] * len(cands)
            removed[ci] = step
            shares.append((macs.reduction(removed), ci, step))
    fine = min(shares, default=None)
    coarse = ""
    if fine is not None and cfg.global_ranking:  # a uniform ratio moves every group at once
        share, ci, step = fine
        coarse = (
            f"; the finest step of this model, {step * cands[ci].unit} channel(s) of "
            f"{describe_group(cands[ci])}, removes {share:.1%} of the MACs alone"
        )
    how = (
        []
        if cfg.global_ranking
        else ["global_ranking=True (one ratio for every group moves in coarse steps)"]
    )
    how += [f"a smaller round_to (now {round_to})"] if round_to > 1 else []
    how += ["another target"]
    raise PruneError(
        f"macs_reduction={target:g}: the plan removes {achieved:.1%} of the MACs (measured), "
        f"more than {MACS_TOLERANCE * 100:.0f} points from the target{coarse}. Use "
        f"{', '.join(how[:-1]) + ' or ' if len(how) > 1 else ''}{how[-1]}, or pass "
        "allow_target_miss=True to keep this plan. The model is unchanged."
    )


def _latency_tilted(
    model: nn.Module,
    graph: ModelGraph,
    macs: MacModel,
    scores: list[torch.Tensor],
    weight: float,
    table: LatencyTable | None,
) -> list[torch.Tensor]:
    from edgeslim.cost.lut import LatencyTable
    from edgeslim.prune.latency_rank import group_latency_factors, layer_ms_per_mac, tilt_scores

    lut = table if table is not None else LatencyTable()
    per_mac = layer_ms_per_mac(model, graph.layers, lut)  # the layer table of the analysis
    if lut.measured:
        lut.save()
    return tilt_scores(scores, group_latency_factors(macs, per_mac, len(scores)), weight)


def keep_map(
    cands: Sequence[CouplingGroup], scores: Sequence[torch.Tensor], widths: Sequence[int]
) -> dict[CouplingGroup, list[int]]:
    """``{group: kept indices}``: each group keeps its ``width`` highest-scored units (groups
    kept whole are left out)."""
    keep: dict[CouplingGroup, list[int]] = {}
    for g, s, w in zip(cands, scores, widths, strict=True):
        if w < g.size:
            order = torch.sort(s, descending=True, stable=True).indices
            keep[g] = sorted(order[:w].tolist())
    return keep


def measure_plan(
    model: nn.Module,
    example_args: Sequence[Any],
    keep: Mapping[CouplingGroup, Sequence[int]],
    base_macs: int | None = None,
) -> PlanStats:
    """MACs of ``model`` pruned by ``keep``, counted on a pruned copy (the model is untouched)."""
    if base_macs is None:
        base_macs = total_macs(layer_table(model, *example_args))
    pruned = prune_groups(copy.deepcopy(model), keep)
    try:
        macs = total_macs(layer_table(pruned, *example_args))
    except (RuntimeError, ValueError, IndexError) as exc:
        # e.g. a recurrent state built in forward() with a literal width: the trace cannot
        # tell it from `self.rnn.hidden_size`, so the pruned copy is the check
        layers = ", ".join(group_key(g) for g in keep)
        raise PruneError(
            f"the pruned model no longer runs ({type(exc).__name__}: {exc}); forward() "
            "probably hard-codes a width (e.g. a recurrent state made with a literal size "
            "instead of `self.<rnn>.hidden_size`). Read widths from the layers, or pass the "
            f"affected layers in skip= (pruned groups: {layers}). The model is unchanged."
        ) from exc
    return PlanStats(
        base_macs=base_macs,
        macs=macs,
        kept={group_key(g): len(k) for g, k in keep.items()},
        sizes={group_key(g): g.size for g in keep},
    )


def plan_pruning(
    model: nn.Module,
    example_args: Sequence[Any],
    importance: Importance | str,
    config: PruneConfig | None = None,
    **options: Any,
) -> PrunePlan:
    """A :class:`PrunePlan` for ``model`` (unchanged); see the module docstring for the modes.

    ``importance`` is a criterion or a registered name that needs no arguments (``l1``,
    ``fpgm``, ...; Taylor needs batches, so pass ``get_importance("taylor", batches=...)``).
    ``config``/``options``: the budget and ranking (:class:`PruneConfig` and its fields as
    keywords, e.g. ``macs_reduction=0.5, round_to=8``; ``skip`` names layers, FQNs or
    globs, whose shapes must not change: every group with such a member is left whole).
    ``nn.MultiheadAttention`` heads are planned on a split copy; :func:`apply_plan` splits
    the attentions the plan names before pruning them.
    """
    target = model
    if has_attention(model):
        target = copy.deepcopy(model)  # heads are planned too, on a split copy
        split_attention(target)
    keep, _ = plan_keep(target, example_args, importance, config, **options)
    return PrunePlan.from_groups(target, keep, example_args)


def prune_(
    model: nn.Module,
    example_args: Sequence[Any],
    importance: Importance | str,
    config: PruneConfig | None = None,
    **options: Any,
) -> tuple[nn.Module, PrunePlan]:
    """Plan (as :func:`plan_pruning`) and apply in place: ``(model, plan)``; save both with
    ``save_pruned``.

    A criterion with a ``compensate(model, keep)`` method (``fluctuation``) adjusts the
    kept layers before surgery; the plan alone does not carry that change, the saved
    weights do. Every ``nn.MultiheadAttention`` is first split into four linears
    (:func:`~edgeslim.graph.attention.split_attention`, same outputs) so its heads can be
    pruned."""
    split_attention(model)
    keep, _ = plan_keep(model, example_args, importance, config, **options)
    plan = PrunePlan.from_groups(model, keep, example_args)
    apply_keep(model, keep, importance)
    return model, plan


def apply_keep(
    model: nn.Module, keep: Mapping[CouplingGroup, Sequence[int]], importance: Importance | str
) -> nn.Module:
    """Surgery in place, after the criterion's ``compensate(model, keep)`` if it has one
    (``fluctuation`` folds the removed units' means into the consumers' biases)."""
    compensate = getattr(_resolve(importance), "compensate", None)
    if callable(compensate):
        compensate(model, keep)
    return prune_groups(model, keep)
