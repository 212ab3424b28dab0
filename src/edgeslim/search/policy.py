"""``Policy``: one point of a search space, as frozen data that outlives the search.

A policy gives every searched layer (by FQN) its weight and activation bits and every
searched coupling group (by group key, see :func:`edgeslim.prune.surgery.group_key`) its
keep ratio. It is plain data: hashable, with a stable id (a hash of its canonical JSON),
saved and loaded as JSON. Applying it to a model is the search space's job
(:meth:`edgeslim.search.SearchSpace.apply`), which also checks it fits.

JSON format (``policy.json``)::

    {"format": "edgeslim-search-policy", "version": 1, "id": "3f0c...",
     "layers": {"conv1": {"w_bits": 8, "a_bits": 8}, "fc": {"w_bits": 4, "a_bits": 8}},
     "keep": {"conv1": 1.0, "block.conv1": 0.5}}

``a_bits: null`` keeps a layer's input activations in float (weight-only). ``id`` is
written for reference and checked on load when present (a hand-edited file gets a new id).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeslim.jsonfile import load_document, save_text
from edgeslim.search.errors import PolicyError

POLICY_FORMAT = "edgeslim-search-policy"
POLICY_VERSION = 1
MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class Policy:
    """Per-layer bits and per-group keep ratios, sorted by name so equal content is equal.

    Build with :meth:`of`; read with :attr:`weight_bits`, :attr:`act_bits`, :attr:`keep`.
    """

    w_bits: tuple[tuple[str, int], ...]
    a_bits: tuple[tuple[str, int | None], ...]
    keep_ratios: tuple[tuple[str, float], ...]

    @classmethod
    def of(
        cls,
        w_bits: Mapping[str, int],
        a_bits: Mapping[str, int | None] | None = None,
        keep: Mapping[str, float] | None = None,
    ) -> Policy:
        """A policy from mappings (``a_bits`` defaults to float for every layer)."""
        a = dict(a_bits) if a_bits is not None else dict.fromkeys(w_bits)
        if set(a) != set(w_bits):
            odd = sorted(set(a) ^ set(w_bits))
            raise PolicyError(
                f"policy: w_bits and a_bits must name the same layers; they differ on {odd}"
            )
        return cls(
            tuple(sorted((str(k), int(v)) for k, v in w_bits.items())),
            tuple(sorted((str(k), None if v is None else int(v)) for k, v in a.items())),
            tuple(sorted((str(k), float(v)) for k, v in (keep or {}).items())),
        )

    @property
    def weight_bits(self) -> dict[str, int]:
        return dict(self.w_bits)

    @property
    def act_bits(self) -> dict[str, int | None]:
        return dict(self.a_bits)

    @property
    def keep(self) -> dict[str, float]:
        return dict(self.keep_ratios)

    def replace(
        self,
        w_bits: Mapping[str, int] | None = None,
        a_bits: Mapping[str, int | None] | None = None,
        keep: Mapping[str, float] | None = None,
    ) -> Policy:
        """A copy with some entries changed (names must already be in the policy)."""
        for what, new, old in (
            ("w_bits", w_bits, self.weight_bits),
            ("a_bits", a_bits, self.act_bits),
            ("keep", keep, self.keep),
        ):
            unknown = sorted(set(new or {}) - set(old))
            if unknown:
                raise PolicyError(f"policy field {what}: {unknown} not in the policy")
        return Policy.of(
            {**self.weight_bits, **(w_bits or {})},
            {**self.act_bits, **(a_bits or {})},
            {**self.keep, **(keep or {})},
        )

    # --- identity and serialisation -----------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The content (what the id hashes): ``layers`` and ``keep``."""
        a = self.act_bits
        return {
            "layers": {k: {"w_bits": w, "a_bits": a[k]} for k, w in self.w_bits},
            "keep": dict(self.keep_ratios),
        }

    @property
    def id(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON: stable across runs."""
        text = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "id": self.id, **self.body()}

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        """Parse and type-check, so a hand-edited file fails with the field named."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy is a JSON object; got {type(data).__name__}")
        if data.get("format") != POLICY_FORMAT:
            raise PolicyError(
                f"policy field 'format' must be {POLICY_FORMAT!r}; got {data.get('format')!r}"
            )
        if data.get("version") != POLICY_VERSION:
            raise PolicyError(
                f"policy field 'version' must be {POLICY_VERSION} (this edgeslim reads "
                f"version {POLICY_VERSION}); got {data.get('version')!r}"
            )
        unknown = sorted(set(data) - {"format", "version", "id", "layers", "keep"})
        if unknown:
            raise PolicyError(
                f"unknown policy field(s) {unknown}; allowed: format, version, id, layers, keep"
            )
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise PolicyError("policy field 'layers' must be an object {fqn: {w_bits, a_bits}}")
        w: dict[str, int] = {}
        a: dict[str, int | None] = {}
        for fqn, entry in layers.items():
            where = f"layers[{fqn!r}]"
            if not isinstance(entry, Mapping):
                raise PolicyError(f"policy field {where} must be an object with w_bits, a_bits")
            extra = sorted(set(entry) - {"w_bits", "a_bits"})
            if extra or "w_bits" not in entry:
                raise PolicyError(
                    f"policy field {where} must have exactly w_bits and (optional) a_bits; "
                    f"got {sorted(entry)}"
                )
            w_value = _bits(entry["w_bits"], f"{where}.w_bits", allow_none=False)
            assert w_value is not None  # allow_none=False
            w[fqn] = w_value
            a[fqn] = _bits(entry.get("a_bits"), f"{where}.a_bits", allow_none=True)
        keep_data = data.get("keep", {})
        if not isinstance(keep_data, Mapping):
            raise PolicyError("policy field 'keep' must be an object {group key: ratio}")
        keep = {k: _ratio(v, f"keep[{k!r}]") for k, v in keep_data.items()}
        policy = cls.of(w, a, keep)
        claimed = data.get("id")
        if claimed is not None and claimed != policy.id:
            raise PolicyError(
                f"policy field 'id' is {claimed!r} but the content hashes to {policy.id!r}: the "
                "file was edited by hand; remove the id field to accept the edit"
            )
        return policy

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PolicyError(f"policy is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: Path | str) -> Path:
        return save_text(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> Policy:
        return load_document(path, "policy file", PolicyError, cls.from_json)

    def describe(self) -> str:
        """``W4/8A8, keep 0.5-1`` style one-liner for tables and logs."""
        ws = sorted({b for _, b in self.w_bits})
        as_ = sorted({32 if b is None else b for _, b in self.a_bits})
        keeps = sorted({k for _, k in self.keep_ratios})
        text = f"W{'/'.join(map(str, ws)) or '-'}A{'/'.join(map(str, as_)) or '-'}"
        if keeps and keeps != [1.0]:
            text += f", keep {keeps[0]:g}" + (f"-{keeps[-1]:g}" if len(keeps) > 1 else "")
        return text


def _bits(value: Any, where: str, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        null = " or null (float)" if allow_none else ""
        raise PolicyError(
            f"policy field {where} must be an integer in {MIN_BITS}..{MAX_BITS}{null}; "
            f"got {value!r}"
        )
    return value


def _ratio(value: Any, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        # 0 removes a residual branch (a depth group); a channel group's allowed ratios are
        # the space's to check
        raise PolicyError(f"policy field {where} must be a keep ratio in [0, 1]; got {value!r}")
    return float(value)


def load_policy(path: Path | str, space: Any = None) -> Policy:
    """Load a policy file; with ``space`` (a :class:`~edgeslim.search.SearchSpace`) also
    check that it names exactly the space's layers and groups with allowed values."""
    policy = Policy.load(path)
    if space is not None:
        try:
            space.check(policy)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None
    return policy
