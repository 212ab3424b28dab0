"""A searched policy's model rebuilt without data, from the JSON its space describes it with.

:meth:`~edgeslim.search.space.SearchSpace.structure` writes what the policy did to the
model's structure (attention split, the prune plan, residual branches removed, the
quantization configs); :func:`rebuild_structure` replays it on the model the search started
from. Nothing is calibrated or refitted here: a reload (``edgeslim.load``, ``--from``) then
loads the saved weights and calibrated ranges, which carry what reconstruction, BatchNorm
re-estimation and fine-tuning changed. Decision: the plan is saved with its kept indices,
not re-derived from the criterion, so a data-driven criterion (``taylor``) rebuilds without
data and a change to a criterion cannot change an old folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.quant.config import QuantConfig, SelectorKey
from edgeslim.search.errors import SearchError

STRUCTURE_FORMAT = "edgeslim-search-structure"


def quantized_structure(
    base: nn.Module, default: QuantConfig, select: Mapping[str, QuantConfig | None], edges: bool
) -> nn.Module:
    """An uncalibrated quantized copy of ``base``: BatchNorm folded, the layers in
    ``select`` quantized with their configs (None: float), the others with ``default``,
    and with ``edges`` the activation quantizers on the graph's edges (as PTQ puts them)."""
    from edgeslim.quant.ptq import ptq_structure

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize_: layer types without")
        chosen: dict[SelectorKey, QuantConfig | None] = {k: v for k, v in select.items()}
        return ptq_structure(base, default, chosen, edges).eval()


def rebuild_structure(
    model: nn.Module, data: Any, example_inputs: Sequence[torch.Tensor]
) -> nn.Module:
    """``model`` (in place where it can be; use the result) restructured as ``data`` (from
    :meth:`SearchSpace.structure`) says; a description from another model or another
    edgeslim is refused with what differs."""
    from edgeslim.graph.attention import split_attention
    from edgeslim.prune.depth import rebuild_depth
    from edgeslim.prune.plan import PrunePlan, apply_plan

    if not isinstance(data, dict) or data.get("format") != STRUCTURE_FORMAT:
        raise SearchError(f"not a searched model's structure (format {STRUCTURE_FORMAT!r})")
    try:
        if data.get("split_attention"):
            split_attention(model)
        if data.get("plan") is not None:
            model = apply_plan(model, PrunePlan.from_dict(data["plan"]), example_inputs)
        if data.get("removed_branches"):
            model = rebuild_depth(model, data["removed_branches"], example_inputs)
        default = QuantConfig.from_dict(data["default"])
        select = {
            str(k): None if v is None else QuantConfig.from_dict(v)
            for k, v in dict(data["select"]).items()
        }
    except (KeyError, TypeError, ValueError) as exc:  # PlanError, PruneError, QuantConfigError
        raise SearchError(f"the searched model cannot be rebuilt: {exc}") from None
    missing = [k for k in select if k not in dict(model.named_modules())]
    if missing:
        raise SearchError(
            f"the searched model cannot be rebuilt: it quantized {missing[0]!r}, which this "
            "model does not have (another model, or one changed since)"
        )
    return quantized_structure(model.eval(), default, select, bool(data.get("edges", True)))
