"""Natural-photo crops at 224x224 for ImageNet models, from photos that installed packages ship.

Decision: no labelled ImageNet image exists offline, so ImageNet models are measured by
agreement with their fp32 outputs on crops of freely licensed photographs that
scikit-image and matplotlib carry inside their wheels (data card: ``docs/data/photos.md``).
Each photo gives crops at three scales on a 3x3 grid of positions, each also mirrored:
more views of few photos, which is what a calibration or agreement set needs. Crops are
ordered round-robin over the photos, so any prefix (``limit``) covers every photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeslim.errors import DataNotFoundError

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SKIMAGE_HINT = "`pip install 'scikit-image>=0.22'` (in an edgeslim checkout: `make setup`)"
# Box side as a fraction of the photo's shorter side; positions start, centre, end per axis.
CROP_SCALES = (1.0, 0.75, 0.5)


@dataclass(frozen=True)
class PhotoSource:
    """One photograph: the package that ships it, its file name and its licence."""

    package: str
    file: str
    licence: str


# Photographs of real scenes only (no microscopy, renders or scans); licences as stated in
# scikit-image's ``skimage/data/_fetchers.py`` docstrings. Grey photos are replicated to RGB.
PHOTOS: tuple[PhotoSource, ...] = (
    PhotoSource("skimage", "chelsea.png", "CC0 (Stefan van der Walt)"),
    PhotoSource("skimage", "coffee.png", "CC0 (Rachel Michetti)"),
    PhotoSource("skimage", "astronaut.png", "public domain (NASA)"),
    PhotoSource("skimage", "rocket.jpg", "public domain (SpaceX)"),
    PhotoSource("matplotlib", "grace_hopper.jpg", "public domain (U.S. Navy)"),
    PhotoSource("skimage", "hubble_deep_field.jpg", "public domain (NASA)"),
    PhotoSource("skimage", "camera.png", "CC0 (Lav Varshney)"),
    PhotoSource("skimage", "coins.png", "no known copyright restrictions (Brooklyn Museum)"),
    PhotoSource("skimage", "clock_motion.png", "public domain (Stefan van der Walt)"),
    PhotoSource("skimage", "text.png", "public domain (Wikipedia File:Corner.png)"),
    PhotoSource("skimage", "brick.png", "CC0 (CC0Textures)"),
    PhotoSource("skimage", "grass.png", "CC0 (DeviantArt linolafett)"),
    PhotoSource("skimage", "gravel.png", "CC0 (CC0Textures)"),
)


@dataclass(frozen=True)
class PhotoCrops:
    """ImageNet-normalised crops ``(N, 3, size, size)`` float32 and one provenance per crop.

    A provenance reads ``package:file:x0,y0,x1,y1`` (the box in the photo's pixels), with
    ``:hflip`` appended for mirrored crops.
    """

    images: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _skimage_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataNotFoundError(
            "The natural-photo crops need scikit-image's sample photos, and scikit-image is "
            f"not installed. Install it with {SKIMAGE_HINT}; its wheel carries the photos, so "
            "nothing is downloaded at run time."
        )
    return Path(locations[0]) / "data"


def photo_path(source: PhotoSource) -> Path:
    """The file inside the installed package (never fetched: pooch is not used)."""
    if source.package == "skimage":
        path = _skimage_dir() / source.file
        hint = SKIMAGE_HINT
    else:
        from matplotlib import cbook

        path = Path(str(cbook.get_sample_data(source.file, asfileobj=False)))
        hint = "`pip install --force-reinstall matplotlib`"
    if not path.is_file():
        raise DataNotFoundError(
            f"{source.package} is installed but its sample photo {path} is missing. "
            f"Reinstall it with {hint}."
        )
    return path


def _uint8_chw(img: Image.Image) -> torch.Tensor:
    """``(C, H, W)`` uint8: 3 channels for an RGB image, 1 for a grayscale (``L``) one."""
    import numpy as np

    if img.mode == "L":
        return torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0)
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    # in place on one float copy: the full crop set is 300+ MB, temporaries cost seconds
    out = images.to(torch.float32)
    return out.mul_((1.0 / (255.0 * s)).float()).sub_((m / s).float())


def image_preprocess(
    img: Image.Image,
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> torch.Tensor:
    """Standard ImageNet evaluation transform: ``(channels, size, size)`` float32.

    Shorter side to ``resize`` (bilinear, antialiased), centre crop ``size``, normalise;
    the same arithmetic as torchvision's ``Resize(256)``, ``CenterCrop(224)``. ``channels``
    1 reads the image as grayscale (PIL's ``L``: ITU-R 601 luma), 3 as RGB.
    """
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    return normalize(_uint8_chw(img), mean, std)


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Square boxes at each of ``CROP_SCALES`` on a start/centre/end grid, without repeats."""
    boxes: list[tuple[int, int, int, int]] = []
    for scale in CROP_SCALES:
        side = max(1, round(scale * min(width, height)))
        xs = sorted({0, (width - side) // 2, width - side})
        ys = sorted({0, (height - side) // 2, height - side})
        for y in ys:
            for x in xs:
                box = (x, y, x + side, y + side)
                if box not in boxes:
                    boxes.append(box)
    return boxes


def _photo_crops(source: PhotoSource, size: int) -> tuple[list[torch.Tensor], list[str]]:
    """All crops of one photo as uint8 ``(3, size, size)``: unmirrored first, then mirrored."""
    from PIL import Image

    with Image.open(photo_path(source)) as opened:
        img = opened.convert("RGB")
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    stem = f"{source.package}:{source.file}"
    for box in crop_boxes(*img.size):
        crop = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        tensors.append(_uint8_chw(crop))
        names.append(f"{stem}:{','.join(map(str, box))}")
    tensors += [t.flip(-1) for t in tensors]
    names += [f"{n}:hflip" for n in names]
    return tensors, names


def build_photo_crops(size: int = 224) -> tuple[torch.Tensor, list[str]]:
    """uint8 crops ``(N, 3, size, size)`` and provenances, round-robin over ``PHOTOS``."""
    per_photo = [_photo_crops(s, size) for s in PHOTOS]
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    for k in range(max(len(n) for _, n in per_photo)):
        for ts, ns in per_photo:
            if k < len(ns):
                tensors.append(ts[k])
                names.append(ns[k])
    return torch.stack(tensors), names


def load_photo_crops(limit: int | None = None, size: int = 224) -> PhotoCrops:
    """The natural-photo crops, ImageNet-normalised; the first ``limit`` if given.

    Not cached: building all 526 crops takes about 0.3 s, less than reading them back.
    """
    images, sources = build_photo_crops(size)
    n = len(sources) if limit is None else min(limit, len(sources))
    return PhotoCrops(normalize(images[:n], IMAGENET_MEAN, IMAGENET_STD), sources[:n])
