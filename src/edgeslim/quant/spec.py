"""``QuantSpec``: frozen, serializable description of how one tensor is quantized.

A spec names a quantizer (what values are allowed), an estimator (how gradients pass) and
an observer (how the range is calibrated); each is looked up in its registry, so invalid
names fail at construction with the list of valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgeslim.errors import EdgeslimError

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES = ("tensor", "channel", "group", "token")
BITS = range(1, 9)  # the widths a quantizer may take (each kind may allow fewer)


class QuantConfigError(EdgeslimError, ValueError):
    """An invalid quantization setting; the message lists the valid values."""


class QuantInputError(EdgeslimError, ValueError):
    """A tensor a quantizer cannot take (empty, or without the dimension its granularity
    groups by); the message names the shape and the granularity."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor (a layer's weight or its input activation).

    ``granularity``: one range per tensor, per output channel (weights) or per group of
    ``group_size`` consecutive input elements within each output channel; ``token`` (for
    activations) gives one range per row of the last dimension (per token of a sequence).
    ``observer="dynamic"`` (activations only) computes the range from each tensor as it
    flows instead of from calibration, as ONNX Runtime's dynamic quantization does.
    """

    quantizer: str = "uniform"
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int = 64
    symmetric: bool = True
    estimator: str = "ste"
    observer: str = "minmax"

    def __post_init__(self) -> None:
        from edgeslim.quant.registries import ESTIMATORS, OBSERVERS, QUANTIZERS, ensure_builtins

        ensure_builtins()

        for name in ("quantizer", "estimator", "observer", "granularity"):
            if not isinstance(getattr(self, name), str):
                raise QuantConfigError(
                    f"{name} must be a name (a string); got {getattr(self, name)!r}"
                )
        if not isinstance(self.symmetric, bool):
            raise QuantConfigError(f"symmetric must be true or false; got {self.symmetric!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise QuantConfigError(f"group_size must be an integer >= 1; got {self.group_size!r}")
        if not isinstance(self.bits, int) or self.bits not in BITS:
            raise QuantConfigError(f"bits must be an integer in 1..8; got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if self.group_size < 1:
            raise QuantConfigError(f"group_size must be >= 1; got {self.group_size}")
        for kind, reg, name in (
            ("quantizer", QUANTIZERS, self.quantizer),
            ("estimator", ESTIMATORS, self.estimator),
            ("observer", OBSERVERS, self.observer),
        ):
            if name not in reg:
                raise QuantConfigError(
                    f"unknown {kind} {name!r}; valid: {', '.join(sorted(reg.names()))}"
                )
        if self.observer == "dynamic" and self.estimator in ("lsq", "pact"):
            raise QuantConfigError(
                f"observer='dynamic' recomputes the range at every call, so the learned range "
                f"of estimator {self.estimator!r} would be overwritten; use ste or clipped_ste"
            )
        valid_bits = getattr(QUANTIZERS.get(self.quantizer), "VALID_BITS", BITS)
        if self.bits not in valid_bits:
            raise QuantConfigError(
                f"the {self.quantizer} quantizer supports bits in {list(valid_bits)}; "
                f"got {self.bits} (1-bit weights: quantizer='binary' with bits=1; "
                "ternary weights: quantizer='ternary' with bits=2)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(data, Mapping):
            raise QuantConfigError(
                f"a QuantSpec is a mapping of {', '.join(cls.__dataclass_fields__)}; "
                f"got {type(data).__name__}"
            )
        unknown = {str(k) for k in data} - set(cls.__dataclass_fields__)
        if unknown:
            raise QuantConfigError(
                f"unknown QuantSpec field(s) {sorted(unknown)}; valid: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**dict(data))
