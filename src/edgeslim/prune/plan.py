"""Prune plans: which channels of which groups to keep, as plain data that outlives a session.

A pruned model cannot be loaded into a freshly built one (its shapes differ), so edgeslim
saves the *plan* beside the weights: rebuild the model, re-apply the plan, then load the
weights. The plan is keyed so it survives re-analysis and refuses a model it does not fit.

Decision — group keys: a group is named by the FQN of its first producing layer (``"out"``
member), e.g. ``layer1.0.conv1``, ``encoder.layer.0.attention.self.query`` (heads) or
``encoder.layer.0.intermediate.dense`` (FFN). Group ids are analysis order and may shift;
a layer's output axis belongs to exactly one group, so its FQN is unique and stable.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.checkpoint import load_checked, save_state
from edgeslim.errors import CheckpointError, PlanError
from edgeslim.graph.attention import attention_named, split_attention
from edgeslim.graph.coupling import CouplingGroup
from edgeslim.graph.model_graph import analyze
from edgeslim.jsonfile import load_document, save_text
from edgeslim.prune.surgery import (
    KeepMap,
    PruneError,
    Surgery,
    check_kept,
    describe_group,
    group_key,
    prepare_surgery,
)

PLAN_FORMAT = "edgeslim-prune-plan"
PLAN_VERSION = 1


def _shape_of(m: nn.Module) -> list[int] | None:
    """The shape that identifies a layer: its weight, else its running mean (affine-free BN)."""
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor):
            return [int(s) for s in t.shape]
    return None


def _signature(model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[str, list[int]]:
    sig: dict[str, list[int]] = {}
    for g in groups:
        for mem in g.members:
            if mem.fqn not in sig:
                shape = _shape_of(model.get_submodule(mem.fqn))
                if shape is not None:
                    sig[mem.fqn] = shape
    return sig


def _index(groups: Sequence[CouplingGroup]) -> dict[str, CouplingGroup]:
    """Groups by key; groups without a producer (never prunable) cannot be named by a plan."""
    out: dict[str, CouplingGroup] = {}
    for g in groups:
        if g.producers:
            out.setdefault(group_key(g), g)
    return out


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise PlanError(f"prune plan field {what} must be a list of integers; got {value!r}")
    return list(value)


def _str_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"prune plan field {what!r} must be an object; got {type(value).__name__}")
    return value


@dataclass
class PrunePlan:
    """Kept unit indices per group of one model, plus what that model looked like.

    ``signature`` maps every member layer of every prunable group to its weight shape
    before pruning; ``sizes`` records each planned group's full size; ``keep`` maps group
    keys (see the module docstring) to sorted kept indices. Groups not in ``keep`` are
    left whole.
    """

    name: str
    signature: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    keep: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_groups(
        cls,
        model: nn.Module,
        keep: KeepMap,
        example_args: Sequence[Any],
        name: str | None = None,
    ) -> PrunePlan:
        """A plan from ``{group: kept}`` on the (still unpruned) ``model``."""
        graph = analyze(model, *example_args)
        index = _index(graph.groups)
        chosen: dict[str, list[int]] = {}
        for group, kept in keep.items():
            key = group_key(group)
            fresh = index.get(key)
            if fresh is None or fresh.size != group.size:
                raise PlanError(
                    f"{describe_group(group)} is not a group of this model (analyzed: "
                    f"{'absent' if fresh is None else describe_group(fresh)}); the model "
                    "was already pruned or the group comes from another model."
                )
            chosen[key] = check_kept(fresh, kept)
        order = [group_key(g) for g in graph.groups if group_key(g) in chosen]
        return cls(
            name=name or type(model).__name__,
            signature=_signature(model, graph.prunable_groups),
            sizes={k: index[k].size for k in order},
            keep={k: chosen[k] for k in order},
        )

    # --- serialisation (plain JSON, never pickle) -----------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "name": self.name,
            "signature": self.signature,
            "sizes": self.sizes,
            "keep": self.keep,
        }

    @classmethod
    def from_dict(cls, data: Any) -> PrunePlan:
        """Parse and type-check a plan, so a hand-edited file fails with the field named."""
        data = _str_dict(data, "plan")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"not an edgeslim prune plan (format {data.get('format')!r}, "
                f"expected {PLAN_FORMAT!r})"
            )
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"prune plan version {data.get('version')!r} is not supported "
                f"(this edgeslim reads version {PLAN_VERSION})"
            )
        name = data.get("name")
        if not isinstance(name, str):
            raise PlanError(f"prune plan field 'name' must be a string; got {name!r}")
        signature = {
            k: _int_list(v, f"signature[{k!r}]")
            for k, v in _str_dict(data.get("signature"), "signature").items()
        }
        sizes: dict[str, int] = {}
        for k, v in _str_dict(data.get("sizes"), "sizes").items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanError(f"prune plan field sizes[{k!r}] must be a positive integer")
            sizes[k] = v
        keep = {
            k: _int_list(v, f"keep[{k!r}]") for k, v in _str_dict(data.get("keep"), "keep").items()
        }
        missing = [k for k in keep if k not in sizes]
        if missing:
            raise PlanError(f"prune plan keeps channels of {missing[0]!r} but records no size")
        return cls(name=name, signature=signature, sizes=sizes, keep=keep)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"prune plan is not valid JSON ({exc})") from exc
        except RecursionError:
            raise PlanError("prune plan is not valid JSON (nested too deeply)") from None
        return cls.from_dict(data)

    def save(self, path: Path | str) -> Path:
        return save_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> PrunePlan:
        return load_document(path, "prune plan", PlanError, cls.from_json)


def match_plan(
    model: nn.Module, plan: PrunePlan, example_args: Sequence[Any]
) -> dict[CouplingGroup, list[int]]:
    """The plan's request as ``{group: kept}`` on ``model``; refuse the first mismatch.

    Checks, in order: every planned group exists, is prunable and has the recorded size
    with valid indices; then every recorded layer exists with its recorded shape. Reads
    only, so a refusal leaves the model untouched.
    """
    graph = analyze(model, *example_args)
    index = _index(graph.groups)
    head = f"prune plan {plan.name!r} does not fit this model:"
    tail = "nothing was changed."
    request: dict[CouplingGroup, list[int]] = {}
    for key, kept in plan.keep.items():
        g = index.get(key)
        if g is None:
            try:
                model.get_submodule(key)
                why = f"layer `{key}` exists but produces no channel group here"
            except AttributeError:
                why = f"layer `{key}` is missing (renamed or removed?)"
            raise PlanError(f"{head} {why}; {tail}")
        if not g.prunable:
            raise PlanError(f"{head} {describe_group(g)} is not prunable ({g.reason}); {tail}")
        if g.size != plan.sizes[key]:
            raise PlanError(
                f"{head} {describe_group(g)} has width {g.size} but the plan was made for "
                f"width {plan.sizes[key]} (a different or already pruned model?); {tail}"
            )
        try:
            request[g] = check_kept(g, kept)
        except PruneError as exc:
            raise PlanError(f"{head} {exc}; {tail}") from None
    for fqn, shape in plan.signature.items():
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            raise PlanError(
                f"{head} layer `{fqn}` is missing (renamed or removed?); {tail}"
            ) from None
        actual = _shape_of(m)
        if actual != shape:
            raise PlanError(
                f"{head} layer `{fqn}` has shape {actual} but the plan recorded {shape}; {tail}"
            )
    return request


def apply_plan(model: nn.Module, plan: PrunePlan, example_args: Sequence[Any]) -> nn.Module:
    """Prune a freshly built ``model`` as ``plan`` says, in place, all or nothing."""
    return _prepared(model, plan, example_args).apply()


def plan_kept_positions(
    model: nn.Module, plan: PrunePlan, example_args: Sequence[Any]
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per module FQN, the ``(output, input)`` positions of the unpruned ``model`` that
    ``plan`` keeps (None: all of that axis), as :meth:`Surgery.kept_positions` gives them
    before a surgery: what :func:`~edgeslim.prune.reconstruct.reconstruct_` needs for a model
    pruned by a plan it did not prepare (learned gates). Reads only; ``model`` is unchanged
    (a plan that splits attention splits a copy)."""
    split = bool(attention_named(model, plan.signature))
    return _prepared(copy.deepcopy(model) if split else model, plan, example_args).kept_positions()


def _prepared(
    model: nn.Module,
    plan: PrunePlan,
    example_args: Sequence[Any],
    check: Callable[[Surgery], None] | None = None,
) -> Surgery:
    """The plan's surgery on ``model`` after ``check`` (if given) accepted it. A plan made
    on a model whose ``nn.MultiheadAttention`` were split (to prune heads) names their
    linears: the plan is matched and checked on a split copy, and only then are those
    attentions split in ``model`` too, so a refusal still leaves ``model`` untouched."""
    attention = attention_named(model, plan.signature)
    probe = copy.deepcopy(model) if attention else model
    if attention:
        split_attention(probe, only=attention)
    request = match_plan(probe, plan, example_args)  # its groups name layers by FQN
    surgery = prepare_surgery(probe, request)
    if check is not None:
        check(surgery)
    if probe is model:
        return surgery
    split_attention(model, only=attention)
    return prepare_surgery(model, request)


def pruned_paths(path_stem: Path | str) -> tuple[Path, Path]:
    """``(<stem>.plan.json, <stem>.safetensors)``."""
    stem = str(path_stem)
    return Path(f"{stem}.plan.json"), Path(f"{stem}.safetensors")


def _check_pruned(model: nn.Module, plan: PrunePlan) -> None:
    """Refuse to save a model whose producers do not have the widths the plan leaves."""
    for key, kept in plan.keep.items():
        sig = plan.signature.get(key)
        try:
            rows = _shape_of(model.get_submodule(key))
        except AttributeError:
            raise PlanError(
                f"cannot save: the model has no layer `{key}` named by the plan"
            ) from None
        if sig is None or rows is None:
            continue
        expected = len(kept) * (sig[0] // plan.sizes[key])
        if rows[0] != expected:
            raise PlanError(
                f"cannot save: layer `{key}` has {rows[0]} output rows but plan {plan.name!r} "
                f"leaves {expected}; apply the plan to the model before saving it."
            )


def save_pruned(model: nn.Module, plan: PrunePlan, path_stem: Path | str) -> tuple[Path, Path]:
    """Write ``<stem>.plan.json`` and ``<stem>.safetensors`` for a model pruned by ``plan``."""
    _check_pruned(model, plan)
    plan_path, weights_path = pruned_paths(path_stem)
    plan.save(plan_path)
    save_state(model, weights_path)
    return plan_path, weights_path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgeslim.checkpoint import check_checkpoint_path

    check_checkpoint_path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file ({exc}); nothing was loaded."
        ) from exc


def _check_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], source: Path
) -> None:
    for k, shape in expected.items():
        if k not in state:
            raise CheckpointError(
                f"checkpoint {source} lacks `{k}` of the pruned model; nothing was changed."
            )
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"checkpoint {source} does not fit its plan: `{k}` is "
                f"{tuple(state[k].shape)}, the pruned model needs {shape}; nothing was changed."
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"checkpoint {source} has `{extra[0]}`, which the pruned model lacks; "
            "nothing was changed."
        )


def load_pruned(
    fresh_model: nn.Module, path_stem: Path | str, example_args: Sequence[Any]
) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` from a freshly built one, in place.

    The plan, the weights file and their fit to the pruned shapes are all checked before
    the model is touched, so any refusal leaves ``fresh_model`` as it was.
    """
    plan_path, weights_path = pruned_paths(path_stem)
    plan = PrunePlan.load(plan_path)
    state = _read_state(weights_path)
    surgery = _prepared(
        fresh_model, plan, example_args,
        lambda s: _check_state(s.state_shapes(), state, weights_path),
    )  # fmt: skip
    surgery.apply()
    return load_checked(fresh_model, state, str(weights_path))
