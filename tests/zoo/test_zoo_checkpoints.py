"""The shipped checkpoints: accuracy re-checked on the real test set, safe loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from edgeslim.checkpoint import load_state, save_state, sha256_file
from edgeslim.data import load_fashion_mnist
from edgeslim.errors import CheckpointError, UnknownModelError
from edgeslim.train.loop import evaluate
from edgeslim.zoo import ZOO, checkpoint_path, load_card, load_zoo_model, resolve_model


@pytest.mark.parametrize("name", list(ZOO))
def test_shipped_checkpoint_reaches_its_target_on_the_test_set(name: str) -> None:
    card = load_card(name)
    assert card["sha256"] == sha256_file(checkpoint_path(name))
    model = load_zoo_model(name)
    top1 = evaluate(model, load_fashion_mnist("test"))
    assert top1 >= ZOO[name].target_top1
    assert abs(top1 - card["test_top1"]) < 0.05  # the card says what the file does
    assert card["command"].startswith(f"edgeslim zoo train {name}")
    assert card["epochs"] >= 1 and "seed" in card


def test_corrupt_checkpoint_is_refused_and_model_untouched(tmp_path: Path) -> None:
    src = checkpoint_path("resnet20")
    bad = tmp_path / "bad.safetensors"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    model = ZOO["resnet20"].factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_state(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tampered_checkpoint_fails_its_card_hash(tmp_path: Path) -> None:
    copy = tmp_path / "w.safetensors"
    shutil.copyfile(checkpoint_path("vgg-small"), copy)
    with copy.open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(
            ZOO["vgg-small"].factory(), copy, expected_sha256=load_card("vgg-small")["sha256"]
        )


def test_mismatched_checkpoint_names_the_first_difference(tmp_path: Path) -> None:
    path = tmp_path / "vgg.safetensors"
    save_state(ZOO["vgg-small"].factory(), path)
    model = ZOO["resnet20"].factory()
    before = model.conv1.weight.clone()
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_state(model, path)
    assert torch.equal(model.conv1.weight, before)


def test_unknown_model_error_says_what_to_do() -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve_model("resnet21")
    msg = str(err.value)
    assert "resnet20" in msg and "module:factory" in msg and "edgeslim zoo list" in msg
    with pytest.raises(UnknownModelError, match="importable"):
        resolve_model("no_such_module_xyz:build")


def test_module_factory_with_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    ref = load_zoo_model("resnet20")
    save_state(ref, path)
    model = resolve_model("edgeslim.zoo.resnet:resnet20", checkpoint=path)
    x = load_fashion_mnist("test", limit=8).images
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_a_factory_given_by_file_path(tmp_path: Path) -> None:
    """``path/to/file.py:build``: the file is imported (its sibling imports work), a
    missing file or a name another module already holds is refused naming it."""
    (tmp_path / "helpers_for_edgeslim_test.py").write_text("WIDTH = 5\n")
    (tmp_path / "nets_for_edgeslim_test.py").write_text(
        "import torch\nfrom helpers_for_edgeslim_test import WIDTH\n\n"
        "def build():\n    return torch.nn.Linear(3, WIDTH)\n"
    )
    model = resolve_model(f"{tmp_path / 'nets_for_edgeslim_test.py'}:build")
    assert isinstance(model, torch.nn.Linear) and model.out_features == 5
    with pytest.raises(UnknownModelError, match="is not a file"):
        resolve_model(f"{tmp_path / 'absent.py'}:build")
    (tmp_path / "json.py").write_text("def build():\n    return None\n")
    with pytest.raises(UnknownModelError, match="another module named 'json'"):
        resolve_model(f"{tmp_path / 'json.py'}:build")
