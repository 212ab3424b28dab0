"""Recipe stage ``datafree``: fields validated at load time, and runs that read no data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import edgeslim.data
import edgeslim.data.fashion_mnist
from edgeslim.cli import app
from edgeslim.data import Split
from edgeslim.errors import RecipeError
from edgeslim.graph import example_input
from edgeslim.recipe import STAGES, StageContext, load_recipe, parse_recipe
from edgeslim.stages.datafree import DataFreeStage, run_datafree, stage_spec
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model

EXAMPLE = Path(__file__).parents[2] / "examples" / "datafree.yaml"
METHODS = "rtn, dfq, dfmpc, naive, merge, udfc"


def _parse(**fields: object) -> DataFreeStage:
    stage = parse_recipe({"stages": [{"kind": "datafree", **fields}]}).stages[0]
    assert isinstance(stage, DataFreeStage)
    return stage


def test_datafree_stage_is_registered_with_its_defaults() -> None:
    assert "datafree" in STAGES and STAGES["datafree"].data_used == "none"
    stage = _parse()
    assert (stage.method, stage.low_bits, stage.high_bits, stage.edge_bits) == ("dfmpc", 4, 4, 8)
    assert stage.prune_ratio == 0.0 and stage.act_bits == 8 and stage.criterion == "l2"
    assert _parse(act_bits=None).act_bits is None  # weight-only
    assert _parse(method="udfc", prune_ratio=0.5, criterion="fpgm").prune_ratio == 0.5
    assert stage.granularity == "channel"
    assert stage_spec(_parse(method="dfq", granularity="tensor")).granularity == "tensor"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"method": "magic"},
            f"stages[0].method: Value error, unknown data-free method 'magic'; allowed values: "
            f"{METHODS}",
        ),
        ({"low_bits": 1}, "stages[0].low_bits: Input should be greater than or equal to 2"),
        ({"high_bits": 9}, "stages[0].high_bits: Input should be less than or equal to 8"),
        ({"edge_bits": 0}, "stages[0].edge_bits: Input should be greater than or equal to 2"),
        ({"act_bits": 16}, "stages[0].act_bits: Input should be less than or equal to 8"),
        ({"prune_ratio": 1.0}, "stages[0].prune_ratio: Input should be less than 1"),
        ({"prune_ratio": -0.1}, "stages[0].prune_ratio: Input should be greater than or equal"),
        (
            {"method": "dfmpc", "prune_ratio": 0.3},
            "stages[0]: Value error, prune_ratio 0.3 needs a pruning method (naive, merge, "
            "udfc); 'dfmpc' only quantizes",
        ),
        (
            {"method": "udfc", "prune_ratio": 0.3, "criterion": "taylor"},
            "stages[0].criterion: Value error, 'taylor' is not a data-free pruning criterion "
            "(it needs data); allowed values: l1, l2, fpgm, random",
        ),
        (
            {"low_bits": 6, "high_bits": 4},
            "stages[0]: Value error, low_bits (6) must not exceed high_bits (4)",
        ),
        ({"criterion": "l3"}, "'l3' is not a data-free pruning criterion; allowed values:"),
        ({"granularity": "group"}, "stages[0].granularity: Input should be 'channel' or 'tensor'"),
        ({"bits": 4}, "stages[0].bits: unknown field; allowed fields: method, low_bits"),
    ],
)
def test_invalid_fields_name_the_field_and_allowed_values(
    fields: dict[str, object], expected: str
) -> None:
    with pytest.raises(RecipeError) as err:
        _parse(**fields)
    assert expected in str(err.value)


def test_shipped_datafree_recipe_is_valid() -> None:
    stage = load_recipe(EXAMPLE).stages[0]
    assert isinstance(stage, DataFreeStage) and stage.method in ("dfmpc", "udfc")


def test_datafree_stage_quantizes_without_data(
    tmp_path: Path, fmnist_test_small: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the datafree stage read data")

    model = load_zoo_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = _parse(method="dfmpc", low_bits=4, high_bits=8)
    ctx = StageContext(out=tmp_path, model_name="resnet20")
    for module in (edgeslim.data, edgeslim.data.fashion_mnist):
        monkeypatch.setattr(module, "load_fashion_mnist", no_data)
    quantized = run_datafree(model, stage, ctx)
    monkeypatch.undo()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert ctx.notes[0].startswith("datafree: dfmpc, weights at 4/8 bits")
    assert "no data read" in ctx.notes[0]
    assert quantized(example_input((2, 1, 28, 28))).shape == (2, 10)
    assert evaluate(quantized, fmnist_test_small) > evaluate(model, fmnist_test_small) - 5.0


@pytest.mark.slow  # ~1 min: evaluation, ONNX export and latency of `edgeslim compress`
def test_compress_runs_the_example_recipe_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["compress", "resnet20", "--recipe", str(EXAMPLE), "--out", str(out), "--quick"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert {r["runtime"] for r in records} == {"torch", "onnxruntime"}
    assert all(r["data_used"] == "none" for r in records)
    assert all(r["method"] == "edgeslim:datafree-dfmpc" for r in records)
    assert any(n.startswith("datafree: dfmpc") for n in records[0]["extra"]["notes"])
    torch_rec, ort_rec = records
    assert torch_rec["value"] > torch_rec["baseline_value"] - 5.0
    assert abs(ort_rec["value"] - torch_rec["value"]) <= 1.0  # the exported graph agrees
    assert torch_rec["size_bytes"] < 0.35 * 4 * torch_rec["params"]
    for name in ("model.onnx", "model.safetensors", "report.md", "recipe.yaml"):
        assert (out / name).is_file()


def test_datafree_stage_reports_what_it_did(tmp_path: Path) -> None:
    from edgeslim.zoo.edge import prelu_cnn

    torch.manual_seed(0)
    stage = _parse(method="dfq", low_bits=4, high_bits=4)
    ctx = StageContext(out=tmp_path, model_name="prelu-cnn")
    run_datafree(prelu_cnn().eval(), stage, ctx)
    assert "6 layer(s) changed" in ctx.notes[0]
    assert any(n.startswith("datafree: features.0 -> features.2: equalized") for n in ctx.notes)
    report = json.loads((tmp_path / "datafree.json").read_text())
    assert report["method"] == "dfq" and report["weight_bits"]["features.2"] == 4
    assert report["pairs"]["features.2 -> features.5"].startswith("equalized through prelu")


def _hardswish_net() -> torch.nn.Module:
    """conv -> BN -> hardswish -> conv -> BN -> hardswish -> pool -> linear."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip


def test_datafree_stage_with_nothing_to_do_fails_the_stage(tmp_path: Path) -> None:
    from edgeslim.datafree import NothingToCompressError
    from edgeslim.errors import EdgeslimError

    stage = _parse(method="udfc", low_bits=6, high_bits=6, prune_ratio=0.3)
    ctx = StageContext(out=tmp_path, model_name="prelu-cnn")  # 1x1x28x28 inputs
    with pytest.raises(NothingToCompressError, match=r"stage datafree \(udfc\) failed") as err:
        run_datafree(_hardswish_net(), stage, ctx)
    assert isinstance(err.value, EdgeslimError) and "no channel group" in str(err.value)


class _TokenConvNet(torch.nn.Module):
    """Token ids (int64) -> embedding -> Conv1d/BN/ReLU x2 -> linear: a text classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.body = torch.nn.Sequential(
            torch.nn.Conv1d(8, 16, 3, padding=1), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
            torch.nn.Conv1d(16, 16, 3, padding=1), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
            torch.nn.Conv1d(16, 16, 3, padding=1), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        )  # fmt: skip
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.emb(ids).transpose(1, 2)).mean(-1))


def test_datafree_stage_traces_integer_inputs_with_their_dtype(tmp_path: Path) -> None:
    """A token-id model was traced on a random float tensor of its input's shape and
    crashed inside the embedding; the example now keeps the input's dtype (zeros)."""
    from edgeslim import Task, TensorBatches

    torch.manual_seed(0)
    model = _TokenConvNet().eval()
    ids = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(1))
    task = Task(example_inputs=(ids[:1],), calibration=TensorBatches(ids, batch_size=16))
    ctx = StageContext(out=tmp_path, model_name="tokens", task=task)
    quantized = run_datafree(model, _parse(method="dfmpc", low_bits=4, high_bits=8), ctx)
    assert ctx.notes[0].startswith("datafree: dfmpc, weights at 4/8 bits")
    with torch.no_grad():
        assert quantized(ids).shape == (32, 3)


def test_datafree_stage_takes_the_first_layers_input_range_from_the_task(
    tmp_path: Path,
) -> None:
    """A task that knows its input's format (normalised pixels) gives the first layer's
    input quantizer that exact range; one that does not leaves the +-6 std guess."""
    from edgeslim.quant.modules import ActQuant
    from edgeslim.task import Task
    from edgeslim.zoo.edge import prelu_cnn

    torch.manual_seed(0)
    model = prelu_cnn().eval()
    x = torch.zeros(1, 1, 28, 28)
    stage = _parse(method="dfq", low_bits=8, high_bits=8)
    steps = []
    guessed = []
    for ranges in (None, ((-0.5, 2.0),)):
        ctx = StageContext(out=tmp_path, model_name="", task=Task((x,), input_ranges=ranges))
        quantized = run_datafree(model, stage, ctx)
        guessed.append(any("input's range is not known" in n for n in ctx.notes))
        # the edge pass moved layer input quantizers onto the graph: the first reads the input
        first = next(m for m in quantized.modules() if isinstance(m, ActQuant))
        steps.append(float(first.quantizer.scale.flatten()[0]))  # type: ignore[union-attr]
    assert steps[0] == pytest.approx(12.0 / 255, rel=1e-3)
    assert steps[1] == pytest.approx(2.5 / 255, rel=1e-3)
    assert guessed == [True, False]  # the guess is said, never silent


def test_the_float_input_note_names_only_layers_that_stay_float(tmp_path: Path) -> None:
    """A head after ``x.mean((2, 3))`` has no statistics of its own, but the edge pass
    carries the range through the mean and quantizes its input: the note said it stayed
    float (ONNX Runtime ran it as QGemm). The first conv of a token model reads an
    embedding, which nothing bounds: that one is named."""

    class MeanHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16),
                torch.nn.ReLU(),
            )  # fmt: skip
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x).mean((2, 3)))

    torch.manual_seed(0)
    model = MeanHead()
    with torch.no_grad():
        model.train()(torch.randn(32, 3, 16, 16))
    from edgeslim import Task

    stage = _parse(method="rtn", low_bits=8, high_bits=8)
    task = Task((torch.randn(1, 3, 16, 16),))
    ctx = StageContext(out=tmp_path / "mean", model_name="mean-head", task=task)
    run_datafree(model.eval(), stage, ctx)
    assert not [n for n in ctx.notes if "no statistics for the inputs" in n], ctx.notes
    task = Task((torch.randint(0, 50, (1, 12)),))
    ctx = StageContext(out=tmp_path / "tokens", model_name="tokens", task=task)
    run_datafree(_TokenConvNet().eval(), stage, ctx)
    (note,) = [n for n in ctx.notes if "no statistics for the inputs" in n]
    assert "body.0" in note and "fc" not in note.split("inputs of")[1]
