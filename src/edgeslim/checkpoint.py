"""Safe checkpoint I/O: safetensors only, verified whole before anything is loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from edgeslim.errors import CheckpointError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(model: nn.Module, path: Path) -> None:
    """Write the model's state dict (parameters and buffers) as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def load_state(model: nn.Module, path: Path, expected_sha256: str | None = None) -> nn.Module:
    """Load a safetensors state dict into ``model`` all-or-nothing.

    The file is parsed and every key and shape compared with the model before a single
    tensor is copied, so a corrupt or mismatched checkpoint leaves the model untouched.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} does not match the SHA-256 recorded in its card; it is "
            "corrupt or was replaced. Restore it (git checkout) or retrain it with "
            "`edgeslim zoo train NAME`."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file ({exc}); nothing was loaded."
        ) from exc
    return load_checked(model, state, str(path))


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Copy ``state`` into ``model`` only if every key and shape matches; else refuse."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape of {k}: model {tuple(own[k].shape)} vs file {tuple(state[k].shape)}"
            )
        raise CheckpointError(
            f"checkpoint {source} does not fit the model ({'; '.join(parts)}); nothing was loaded."
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
