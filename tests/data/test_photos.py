"""The natural-photo crop set: size, shape, determinism, provenance, preprocessing."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from importlib.machinery import ModuleSpec

import pytest
import torch

from edgeslim.data import photos
from edgeslim.data.photos import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTOS,
    PhotoCrops,
    image_preprocess,
    load_photo_crops,
)
from edgeslim.errors import DataNotFoundError

pytest.importorskip("skimage", reason="scikit-image is not installed: pip install scikit-image")
PROVENANCE = re.compile(r"^(skimage|matplotlib):[\w.]+:\d+,\d+,\d+,\d+(:hflip)?$")


@pytest.fixture(scope="module")
def crops() -> PhotoCrops:
    return load_photo_crops()


def test_at_least_500_normalised_crops(crops: PhotoCrops) -> None:
    assert len(crops) >= 500 and len(crops.sources) == len(crops)
    assert crops.images.shape[1:] == (3, 224, 224) and crops.images.dtype == torch.float32
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = crops.images.transpose(0, 1).reshape(3, -1)
    assert (per_channel.amin(1) >= lo - 1e-5).all() and (per_channel.amax(1) <= hi + 1e-5).all()
    assert abs(float(crops.images.mean())) < 0.5  # natural photos, roughly centred


def test_same_tensor_every_time(crops: PhotoCrops) -> None:
    again = load_photo_crops()
    assert torch.equal(again.images, crops.images) and again.sources == crops.sources


def test_provenance_unique_and_every_photo_used(crops: PhotoCrops) -> None:
    assert len(set(crops.sources)) == len(crops.sources)
    assert all(PROVENANCE.match(s) for s in crops.sources), crops.sources[:3]
    used = {re.sub(r":[\d,]+(:hflip)?$", "", s) for s in crops.sources}
    assert used == {f"{p.package}:{p.file}" for p in PHOTOS}


def test_crops_are_distinct_and_flips_mirror(crops: PhotoCrops) -> None:
    digests = {hashlib.sha256(x.numpy().tobytes()).digest() for x in crops.images}
    assert len(digests) == len(crops)
    index = {s: i for i, s in enumerate(crops.sources)}
    for s, i in list(index.items())[:20]:
        if not s.endswith(":hflip"):
            assert torch.equal(crops.images[index[s + ":hflip"]], crops.images[i].flip(-1))


def test_limit_is_a_prefix_that_covers_every_photo(crops: PhotoCrops) -> None:
    few = load_photo_crops(limit=len(PHOTOS))
    assert torch.equal(few.images, crops.images[: len(PHOTOS)])
    assert len({s.split(":")[1] for s in few.sources}) == len(PHOTOS)


def test_image_preprocess_is_resize_centre_crop_normalise() -> None:
    from PIL import Image

    img = Image.new("RGB", (400, 300), (255, 0, 128))
    x = image_preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(x.mean((1, 2)), want, atol=1e-6)
    # the centre crop of a left/right split keeps both halves equally
    half = Image.new("L", (512, 256), 0)
    half.paste(255, (256, 0, 512, 256))
    y = image_preprocess(half, size=32, resize=64, mean=(0, 0, 0), std=(1, 1, 1))
    assert y.shape == (3, 32, 32)
    assert float(y[:, :, :15].max()) == 0.0 and float(y[:, :, 17:].min()) == 1.0


def test_missing_scikit_image_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "skimage" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataNotFoundError, match=r"pip install 'scikit-image"):
        photos.load_photo_crops(limit=1)
