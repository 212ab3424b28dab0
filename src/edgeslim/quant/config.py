"""``QuantConfig`` (weight + activation specs) and FQN selectors for mixed precision.

Selector keys, by priority: an exact FQN > a glob (``layer1.*``) > a regex (``re:^fc$``) >
a module type (the class itself, or ``"type:Linear"``) > the default config. A value of
``None`` leaves the matched layers in floating point.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgeslim.quant.spec import QuantConfigError, QuantSpec


@dataclass(frozen=True)
class QuantConfig:
    """Weight and input-activation quantization of one layer (``None``: keep float)."""

    weight: QuantSpec | None = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        if not isinstance(data, Mapping):
            raise QuantConfigError(
                f"a QuantConfig is a mapping with weight and activation; got {type(data).__name__}"
            )
        unknown = {str(k) for k in data} - {"weight", "activation"}
        if unknown:
            raise QuantConfigError(
                f"unknown QuantConfig field(s) {sorted(unknown)}; valid: weight, activation"
            )
        w, a = data.get("weight"), data.get("activation")
        return cls(
            weight=None if w is None else QuantSpec.from_dict(w),
            activation=None if a is None else QuantSpec.from_dict(a),
        )


def w8a8(granularity: str = "channel", reduce_range: bool = False) -> QuantConfig:
    """int8 weights (symmetric, per channel) and int8 activations (asymmetric, per tensor).

    ``reduce_range``: weights on 7 bits of int8, which ONNX Runtime computes exactly on x86
    CPUs without VNNI too (see :class:`edgeslim.stages.quantize.QuantizeStage`)."""
    return QuantConfig(
        QuantSpec(bits=7 if reduce_range else 8, granularity=granularity),  # type: ignore[arg-type]
        QuantSpec(bits=8, granularity="tensor", symmetric=False, observer="percentile"),
    )


def w8a8_dynamic(per_token: bool = False, reduce_range: bool = False) -> QuantConfig:
    """Transformer W8A8: int8 per-channel weights, activations quantized on the fly.

    Per-tensor uint8 (``per_token=False``) is what ONNX Runtime's fused dynamic kernels run;
    per-token int8 gives each sequence position its own range (more accurate, torch only).
    ``reduce_range``: weights on 7 bits, as in :func:`w8a8`.
    """
    act = (
        QuantSpec(bits=8, granularity="token", symmetric=True, observer="dynamic")
        if per_token
        else QuantSpec(bits=8, granularity="tensor", symmetric=False, observer="dynamic")
    )
    return QuantConfig(QuantSpec(bits=7 if reduce_range else 8, granularity="channel"), act)


def w4_weight_only(group_size: int = 32, observer: str = "minmax") -> QuantConfig:
    """4-bit symmetric weights in groups of ``group_size`` input elements; float activations."""
    return QuantConfig(
        QuantSpec(bits=4, granularity="group", group_size=group_size, observer=observer), None
    )


SelectorKey = str | type[nn.Module]
Selection = Mapping[SelectorKey, QuantConfig | None]


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def resolve(
    fqn: str, module: nn.Module, select: Selection | None, default: QuantConfig | None
) -> QuantConfig | None:
    """The config for one layer under the selector priority rules (see module doc)."""
    if not select:
        return default
    if fqn in select:
        return select[fqn]
    for key, cfg in select.items():
        plain = isinstance(key, str) and not key.startswith(("re:", "type:"))
        if plain and _is_glob(str(key)) and fnmatch.fnmatchcase(fqn, str(key)):
            return cfg
    for key, cfg in select.items():
        if isinstance(key, str) and key.startswith("re:") and re.search(key[3:], fqn):
            return cfg
    for key, cfg in select.items():
        if isinstance(key, type) and isinstance(module, key):
            return cfg
        if isinstance(key, str) and key.startswith("type:") and type(module).__name__ == key[5:]:
            return cfg
    return default


def check_selectors(select: Selection | None, names: list[str]) -> list[str]:
    """Selector keys that match no layer (reported as warnings: likely typos)."""
    unused = []
    for key in select or {}:
        if isinstance(key, type) or key.startswith("type:"):
            continue
        if key.startswith("re:"):
            hit = any(re.search(key[3:], n) for n in names)
        elif _is_glob(key):
            hit = any(fnmatch.fnmatchcase(n, key) for n in names)
        else:
            hit = key in names
        if not hit:
            unused.append(key)
    return unused
