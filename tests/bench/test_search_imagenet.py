"""The photo crops' three roles in the search suite on mobilenetv2-imagenet."""

from __future__ import annotations

import torch

from edgeslim.bench.search_imagenet import photo_split
from edgeslim.data.photos import load_photo_crops


def _rows(batches: object) -> torch.Tensor:
    return torch.cat([b if isinstance(b, torch.Tensor) else b[0] for b in batches])  # type: ignore[attr-defined]


def test_photo_split_gives_each_crop_one_role() -> None:
    crops = load_photo_crops(40).images
    split = photo_split(40)
    calib = _rows(split.search.calibration)
    val = _rows(split.search.validation)
    test = _rows(split.test.validation)
    assert (len(calib), len(val), len(test)) == (10, 20, 10) == (10, 20, split.test_crops)
    assert torch.equal(calib, crops[0::4]) and torch.equal(test, crops[3::4])
    flat = [t.flatten(1) for t in (calib, val, test)]
    for i in range(3):  # no crop in two roles
        for j in range(i + 1, 3):
            assert torch.cdist(flat[i], flat[j]).min() > 0
    assert split.search.calibration is not split.test.validation
