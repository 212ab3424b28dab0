from __future__ import annotations

import json
from pathlib import Path

import torch

from edgeslim.checkpoint import load_state, sha256_file
from edgeslim.zoo import ZOO
from edgeslim.zoo.train import train_zoo_model


def test_train_writes_weights_and_an_honest_card(tmp_path: Path) -> None:
    card = train_zoo_model("vgg-small", epochs=1, seed=3, out_dir=tmp_path, train_limit=1024)
    weights = tmp_path / "vgg-small.safetensors"
    on_disk = json.loads((tmp_path / "vgg-small.json").read_text())
    assert on_disk == card
    assert card["sha256"] == sha256_file(weights)
    assert card["versions"]["edgeslim"] and card["versions"]["torch"] == torch.__version__
    assert card["command"] == "edgeslim zoo train vgg-small --epochs 1 --seed 3 --train-limit 1024"
    assert 20.0 < card["test_top1"] <= 100.0  # 1 epoch on 1k images: well above chance
    model = load_state(ZOO["vgg-small"].factory(), weights)
    assert not any(torch.isnan(p).any() for p in model.parameters())
