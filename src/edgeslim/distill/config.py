"""The distillation losses as frozen data, so a recipe or a benchmark record can carry them.

Each config names a loss; :class:`~edgeslim.distill.loss.DistillLoss` builds the loss from a
list of them (registered by config type). Taps are module FQNs: one name when the student
and the teacher share it (a pruned student keeps its teacher's names), or a
``(student_fqn, teacher_fqn)`` pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from edgeslim.errors import EdgeslimError

TapSpec = str | tuple[str, str]


class DistillConfigError(EdgeslimError, ValueError):
    """A distillation config is invalid; the message names the field."""


def tap_pairs(taps: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    """``(student_fqn, teacher_fqn)`` for each tap: a name stands for both sides."""
    pairs: list[tuple[str, str]] = []
    for tap in taps:
        if isinstance(tap, str):
            pairs.append((tap, tap))
        elif (
            isinstance(tap, (tuple, list))
            and len(tap) == 2
            and all(isinstance(t, str) for t in tap)
        ):
            pairs.append((tap[0], tap[1]))
        else:
            raise DistillConfigError(
                f"a tap is a module FQN or a (student_fqn, teacher_fqn) pair; got {tap!r}"
            )
    return tuple(pairs)


def _taps(cfg: Any) -> None:
    if isinstance(cfg.taps, str):
        raise DistillConfigError(f"taps must be a list of FQNs; got the string {cfg.taps!r}")
    pairs = tap_pairs(cfg.taps)
    if not pairs:
        raise DistillConfigError(f"{type(cfg).__name__} needs at least one tap")
    # hashable and JSON-stable: names stay names, pairs become tuples
    object.__setattr__(cfg, "taps", tuple(s if s == t else (s, t) for s, t in pairs))


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise DistillConfigError(f"{type(cfg).__name__}.{name} must be >= 0")


@dataclass(frozen=True)
class KDConfig:
    """Hinton KD: ``alpha * T^2 KL(teacher_T || student_T)`` plus ``(1 - alpha)`` of the hard
    loss when the batch has labels; the soft term alone (weight 1) without labels."""

    kind: ClassVar[str] = "kd"
    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillConfigError(f"KDConfig.alpha must be in [0, 1]; got {self.alpha}")
        if not self.temperature > 0:
            raise DistillConfigError(f"KDConfig.temperature must be > 0; got {self.temperature}")


@dataclass(frozen=True)
class FeatureConfig:
    """Feature transfer (FitNets-style): MSE between the student's and the teacher's
    features at each tap. Where the channel counts differ (a pruned student) a learned 1x1
    conv (or linear, for ``(N, C)``/``(N, T, C)`` features) maps the student's channels to
    the teacher's; ``adapter="always"`` adds one everywhere (identity-initialised)."""

    kind: ClassVar[str] = "feature"
    taps: tuple[TapSpec, ...] = field(default_factory=tuple)
    weight: float = 1.0
    adapter: Literal["auto", "always"] = "auto"

    def __post_init__(self) -> None:
        _taps(self)
        _positive(self, "weight")
        if self.adapter not in ("auto", "always"):
            raise DistillConfigError(
                f"FeatureConfig.adapter must be 'auto' or 'always'; got {self.adapter!r}"
            )


@dataclass(frozen=True)
class AttentionConfig:
    """Attention transfer (Zagoruyko & Komodakis 2017): match the normalised spatial maps
    ``sum_c |F_c|^p`` of student and teacher; channel counts may differ, no adapter."""

    kind: ClassVar[str] = "attention"
    taps: tuple[TapSpec, ...] = field(default_factory=tuple)
    weight: float = 1.0
    p: float = 2.0

    def __post_init__(self) -> None:
        _taps(self)
        _positive(self, "weight")
        if not self.p > 0:
            raise DistillConfigError(f"AttentionConfig.p must be > 0; got {self.p}")


@dataclass(frozen=True)
class DCCDConfig:
    """DCCD (Liu, Chen & Liu 2023): channel contrastive distillation at the feature taps
    (InfoNCE over channels after a learned projection, ``temperature``) plus dynamic
    difference knowledge on the outputs of two views (``difference_weight``; the second view
    of each batch is made by ``view``: ``crop_flip`` with ``pad`` pixels, or ``noise`` of
    ``noise`` times each input's std; seeded by ``seed``)."""

    kind: ClassVar[str] = "dccd"
    taps: tuple[TapSpec, ...] = field(default_factory=tuple)
    contrast_weight: float = 1.0
    difference_weight: float = 1.0
    temperature: float = 0.1
    view: str = "crop_flip"
    pad: int = 2
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _taps(self)
        _positive(self, "contrast_weight", "difference_weight", "pad", "noise")
        if not self.temperature > 0:
            raise DistillConfigError(f"DCCDConfig.temperature must be > 0; got {self.temperature}")


DistillConfig = KDConfig | FeatureConfig | AttentionConfig | DCCDConfig
CONFIG_TYPES: dict[str, type[Any]] = {
    c.kind: c for c in (KDConfig, FeatureConfig, AttentionConfig, DCCDConfig)
}


def config_to_dict(config: DistillConfig) -> dict[str, Any]:
    """``{"kind": ..., **fields}``, JSON-ready (pairs become lists)."""
    out: dict[str, Any] = {"kind": config.kind, **asdict(config)}
    if "taps" in out:
        out["taps"] = [t if isinstance(t, str) else list(t) for t in out["taps"]]
    return out


def config_from_dict(data: Mapping[str, Any]) -> DistillConfig:
    """The config a :func:`config_to_dict` dict (or a recipe entry) describes."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in CONFIG_TYPES:
        raise DistillConfigError(
            f"unknown distillation loss kind {kind!r}; known: {', '.join(CONFIG_TYPES)}"
        )
    try:
        config: DistillConfig = CONFIG_TYPES[kind](**fields)
    except TypeError as exc:
        raise DistillConfigError(f"{kind}: {exc}") from None
    return config
