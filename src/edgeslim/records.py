"""The benchmark record: one row per (model, method, setting), measured in one run.

``value`` and ``baseline_value`` are the same metric of the compressed and the
uncompressed model; ``latency_ms`` and ``baseline_latency_ms`` are medians measured in the
same process and the same ``runtime``, so their ratio shows what compression gained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CONFIG_KEYS = (
    "w_bits",
    "a_bits",
    "estimator",
    "granularity",
    "macs_reduction",
    "criterion",
    "finetune_epochs",
)


class Record(BaseModel):
    """One measured row. ``method`` is ``"<tool>:<name>"``, e.g. ``edgeslim:ptq``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str
    model: str
    method: str
    config: dict[str, Any] = Field(default_factory=dict)
    metric: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.@-]*$")
    value: float
    baseline_value: float
    params: int
    macs: int
    size_bytes: int
    latency_ms: float | None
    baseline_latency_ms: float | None
    runtime: str = Field(pattern=r"^(torch|onnxruntime)$")
    seconds: float
    data_used: str = Field(pattern=r"^(none|calibration|train)$")
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms or not self.baseline_latency_ms:
            return None
        return self.baseline_latency_ms / self.latency_ms


def weight_bits_label(config: dict[str, Any]) -> str | None:
    """A record's weight bits for tables and plots: ``"8"``, ``"2/6"`` for a mixed setting
    (``low_bits``/``high_bits`` of the ``datafree`` suite), None when the config has none."""
    if "low_bits" in config and "high_bits" in config:
        low, high = config["low_bits"], config["high_bits"]
        return str(low) if low == high else f"{low}/{high}"
    return None if "w_bits" not in config else str(config["w_bits"])


def precision_label(config: dict[str, Any]) -> str | None:
    """``"W8A8"``, ``"W3/8A8"`` (mixed weight bits), ``"W4A32"`` (float activations): from
    the bits the config records, which ``compress`` measures on the compressed layers."""
    w_bits = weight_bits_label(config)
    if w_bits is None:
        return None
    return f"W{w_bits}A{config.get('a_bits', 32)}"


def save_records(records: list[Record], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.model_dump() for r in records], indent=2) + "\n")


def load_records(path: Path) -> list[Record]:
    """Load and validate records (JSON only; no pickle)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: results.json must hold a list of records")
    return [Record.model_validate(r) for r in data]
