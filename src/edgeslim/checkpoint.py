"""Safe checkpoint I/O, verified whole before anything is loaded.

Written as safetensors. Read from safetensors, or from a PyTorch file (``torch.save`` of a
state dict, ``.pt``/``.pth``, the form most checkpoints in the wild take) through
``torch.load(weights_only=True)``, which unpickles only tensors and plain containers: a
pickled model object is refused, never run. Decision: a training checkpoint's usual
nesting (``{"state_dict": ...}``, ``{"model": ...}``, ...) and DataParallel's ``module.``
prefix are read through, since that is what users have; anything else is refused naming
the keys found.
"""

from __future__ import annotations

import hashlib
import zipfile
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


def check_checkpoint_path(path: Path) -> None:
    """Refuse a folder or a missing path with a message saying which, and what to give."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        hint = (
            f"it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}: give one "
            f"of them, e.g. --checkpoint {path / inside[0]}"
            if inside
            else "give the .safetensors file itself"
        )
        if (path / "manifest.json").is_file():  # a `compress` output: plan and quantizers too
            hint += f", or rebuild the compressed model it holds with --from {path}"
        raise CheckpointError(f"checkpoint {path} is a folder, not a safetensors file; {hint}.")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give the path of a .safetensors file."
        )


def _traced_constant(key: str) -> bool:
    """A tensor torch.fx stored while tracing (``_tensor_constant3``: DeBERTa's
    ``torch.tensor(q.size(-1))``). It belongs to the code, not the weights: the model
    rebuilt on load traces its own, and the number fx gives it depends on how many traces
    the model saw before (a reload read ``_tensor_constant1`` where the file held
    ``_tensor_constant2``), so it is neither saved nor compared."""
    name = key.rsplit(".", 1)[-1]
    return name.startswith("_tensor_constant") and name[len("_tensor_constant") :].isdigit()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not _traced_constant(k)}


def save_state(model: nn.Module, path: Path) -> None:
    """Write the model's state dict (parameters and buffers) as safetensors; tensors fx
    stored while tracing are left out (see :func:`_traced_constant`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in _weights(model).items()}
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
    check_checkpoint_path(path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} does not match the SHA-256 recorded in its card; it is "
            "corrupt or was replaced. Restore it (git checkout) or retrain it with "
            "`edgeslim zoo train NAME`."
        )
    if _is_torch_file(path):
        return load_checked(model, _strip_prefix(model, _torch_state(path)), str(path))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file ({exc}) nor a PyTorch one; "
            "nothing was loaded."
        ) from exc
    return load_checked(model, state, str(path))


STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
"""Where training scripts commonly nest the state dict inside a saved checkpoint."""


def _is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file: a zip archive (``PK``), or the legacy pickle stream."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip holding compiled ``code/`` and ``constants.pkl``
    (``torch.load`` refuses it under ``weights_only``, which read as a corrupt file)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _tensors(obj: object) -> dict[str, torch.Tensor] | None:
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a PyTorch file, unpickled with ``weights_only=True`` only."""
    if _is_torchscript(path):
        raise CheckpointError(
            f"checkpoint {path} is a TorchScript archive (torch.jit.save): a program, not a "
            "state dict, and edgeslim compresses the Python model, so it loads only the "
            "weights. If you trust the file, save them: torch.save(torch.jit.load(path)."
            "state_dict(), 'weights.pt'), and pass that with the model's class; nothing was "
            "loaded."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # weights_only refuses classes: a pickled model, custom objects
        raise CheckpointError(
            f"checkpoint {path} is a PyTorch file that holds more than tensors (a whole "
            "pickled model, or objects of its own classes), or is corrupt; edgeslim "
            "unpickles only plain state dicts (anything else can run code). Save "
            "model.state_dict() with torch.save, or as safetensors; nothing was loaded."
        ) from None
    state = _tensors(obj)
    if state is None and isinstance(obj, dict):
        state = next((t for k in STATE_KEYS if (t := _tensors(obj.get(k))) is not None), None)
    if state is None:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"checkpoint {path} holds no state dict edgeslim recognises (top level: {keys}; "
            f"looked under {', '.join(STATE_KEYS)}); save model.state_dict(); nothing was "
            "loaded."
        )
    return state


def _strip_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel/DDP save every key as ``module.<key>``: read them as ``<key>``."""
    own = model.state_dict()
    if state and not set(state) & set(own) and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Copy ``state`` into ``model`` only if every key and shape matches; else refuse.
    Tensors fx stored while tracing are not compared (see :func:`_traced_constant`)."""
    own = _weights(model)
    state = {k: v for k, v in state.items() if not _traced_constant(k)}
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
    # cast and check every tensor before the first copy, so a failure leaves the model as it was
    params = {k for k, _ in model.named_parameters()}
    cast: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.is_complex() and not own[k].is_complex():
            raise CheckpointError(
                f"checkpoint {source}: `{k}` is complex ({v.dtype}) but the model's is "
                f"{own[k].dtype}; nothing was loaded."
            )
        try:
            cast[k] = v.to(own[k].dtype)
        except (RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {source}: `{k}` has dtype {v.dtype}, which cannot become the "
                f"model's {own[k].dtype} ({exc}); nothing was loaded."
            ) from None
        if k in params and cast[k].is_floating_point() and not bool(cast[k].isfinite().all()):
            raise CheckpointError(
                f"checkpoint {source}: `{k}` holds NaN or infinite values (a diverged or "
                "damaged training run); nothing was loaded."
            )
    with torch.no_grad():  # (every key but fx's traced constants was checked above)
        model.load_state_dict(cast, strict=False)
    return model
