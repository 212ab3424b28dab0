"""``edgeslim.compress``: the Python API on a model and task the project did not make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import edgeslim
from edgeslim import Task, TensorBatches
from edgeslim.errors import EdgeslimError, RecipeError, TaskError
from edgeslim.task import digits_task

W8A8 = {"name": "w8a8", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8}]}


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    ).eval()  # fmt: skip


def test_compress_returns_model_records_and_the_files_it_wrote(tmp_path: Path) -> None:
    task = digits_task()
    out = tmp_path / "run"
    result = edgeslim.compress(_digits_cnn(), W8A8, task, out=out, quick=True)
    assert set(result.paths) >= {"onnx", "weights", "results", "report", "recipe"}
    assert all(p.is_file() and p.parent == out for p in result.paths.values())
    records = json.loads((out / "results.json").read_text())
    assert [r["runtime"] for r in records] == ["torch", "onnxruntime"]
    assert all(r["metric"] == "top1" and r["extra"]["task"] == "digits" for r in records)
    assert records[0]["config"] == {"w_bits": 8, "a_bits": 8}
    # no stray temporary folder beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_compress_without_out_keeps_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = edgeslim.compress(_digits_cnn(), W8A8, digits_task(), quick=True)
    assert result.paths == {} and len(result.records) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_with_force_replaces_the_output_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.plan.json").write_text("{}")  # stale file of an earlier prune run
    edgeslim.compress(_digits_cnn(), W8A8, digits_task(), out=out, quick=True, force=True)
    assert not (out / "model.plan.json").exists() and (out / "model.onnx").is_file()


def test_mixed_bits_are_labelled_from_the_layers_not_the_request(tmp_path: Path) -> None:
    """W8 requested, the last layer selected at 4 bits: every label says W4/8A8."""
    act = {"bits": 8, "granularity": "tensor", "symmetric": False}
    recipe = {"name": "mixed", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8,
              "select": {"4": {"weight": {"bits": 4}, "activation": act}}}]}  # fmt: skip
    out = tmp_path / "run"
    result = edgeslim.compress(_digits_cnn(), recipe, digits_task(), out=out, quick=True)
    config = result.records[0].config
    assert config == {"w_bits": "4/8", "a_bits": 8, "low_bits": 4, "high_bits": 8}
    assert result.records[0].extra["weight_bits"] == {"0": 8, "4": 4}
    from edgeslim.records import precision_label
    from edgeslim.report.plots import _label

    assert precision_label(config) == "W4/8A8" and _label(result.records[0]) == "mixed W4/8A8"
    report = (out / "report.md").read_text()
    assert "w_bits=4/8" in report and "w_bits=8" not in report


def test_layers_left_with_float_inputs_show_in_a_bits(tmp_path: Path) -> None:
    """W8A8 with the last layer's input kept float (``activation: null``): the record says
    ``a_bits: "8/32"``, not the 8 the stage asked for."""
    recipe = {"name": "wonly", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8,
              "select": {"4": {"weight": {"bits": 8}, "activation": None}}}]}  # fmt: skip
    result = edgeslim.compress(_digits_cnn(), recipe, digits_task(), quick=True)
    assert result.records[0].config == {"w_bits": 8, "a_bits": "8/32"}


def test_select_takes_the_stages_own_fields_and_refuses_what_matches_nothing(
    tmp_path: Path,
) -> None:
    """``select: {fc: {w_bits: 4}}`` reads like the stage; a selector that matches no layer
    fails naming the layers (a typo would otherwise quantize what it meant to keep float)."""
    from edgeslim.recipe import parse_recipe

    def recipe(select: dict[str, object]) -> dict[str, object]:
        stage = {"kind": "quantize", "w_bits": 8, "a_bits": 8, "select": select}
        return {"name": "sel", "stages": [stage]}

    result = edgeslim.compress(_digits_cnn(), recipe({"4": {"w_bits": 4}}), digits_task(),
                               tmp_path / "ok", quick=True)  # fmt: skip
    assert result.records[0].extra["weight_bits"] == {"0": 8, "4": 4}
    with pytest.raises(RecipeError, match=r"select\['4'\].*w_bits.*weight"):
        parse_recipe(recipe({"4": {"w_bits": 4, "weight": {"bits": 4}}}))
    with pytest.raises(RecipeError, match=r"'fc' matches no layer.*its conv/linear layers: 0, 4"):
        edgeslim.compress(_digits_cnn(), recipe({"fc": None}), digits_task(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_recipes_that_cannot_work_say_what_to_change(tmp_path: Path) -> None:
    """A quantize stage after a datafree one (already quantized), and training on batches
    without labels with KD switched off: each one error naming the fix."""
    both = {"name": "dq", "stages": [{"kind": "datafree", "method": "rtn", "low_bits": 8,
            "high_bits": 8}, {"kind": "quantize", "w_bits": 8, "a_bits": 8}]}  # fmt: skip
    with pytest.raises(RecipeError, match=r"already quantized.*act_bits"):
        edgeslim.compress(_digits_cnn(), both, digits_task(), tmp_path / "dq", quick=True)
    full = digits_task()
    x = torch.cat([b[0] for b in full.calibration_batches()])
    unlabelled = Task(example_inputs=full.example_inputs, calibration=full.calibration,
                      train=TensorBatches(x, None, 32, shuffle=True, pairs=True))  # fmt: skip
    prune = {"name": "p", "stages": [{"kind": "prune", "macs_reduction": 0.2, "kd": False,
             "finetune_epochs": 1, "allow_target_miss": True}]}  # fmt: skip
    with pytest.raises(TaskError, match="kd: true"):
        edgeslim.compress(_digits_cnn(), prune, unlabelled, tmp_path / "p", quick=True)
    assert not (tmp_path / "dq").exists() and not (tmp_path / "p").exists()


def test_targets_that_are_not_class_indices_ask_for_the_tasks_loss(tmp_path: Path) -> None:
    """Training batches ``(x, [labels, values])`` (a classifier beside a regression head)
    with no loss given: one error naming ``Task(loss=...)``, not an AttributeError from
    inside the default cross-entropy."""
    full = digits_task()
    x = torch.cat([b[0] for b in full.calibration_batches()])
    pairs = [(x[i : i + 32], [torch.zeros(len(x[i : i + 32]), dtype=torch.long),
              torch.zeros(len(x[i : i + 32]))]) for i in range(0, 128, 32)]  # fmt: skip
    task = Task(example_inputs=full.example_inputs, calibration=full.calibration, train=pairs)
    recipe = {"name": "ft", "stages": [{"kind": "finetune", "epochs": 1}]}
    with pytest.raises(TaskError, match=r"target is a list, not a tensor.*Task\(loss=fn\)"):
        edgeslim.compress(_digits_cnn(), recipe, task, tmp_path / "ft", quick=True)
    assert not (tmp_path / "ft").exists()


def test_an_int8_file_that_computes_something_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compress held an int8 file to no metric check (only fp32 files to the parity
    tolerance): a file whose every prediction differed from torch's was written with exit 0.
    Here ONNX Runtime's outputs are reversed along the classes: refused, nothing written."""
    import edgeslim.compression as compression
    from edgeslim.runtime.ort import OrtModel

    class Reversed(OrtModel):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            out = super().forward(*inputs)
            assert isinstance(out, torch.Tensor)
            return out.flip(-1)

    monkeypatch.setattr(compression, "OrtModel", Reversed)
    with pytest.raises(EdgeslimError, match="does not compute what torch computed"):
        edgeslim.compress(_digits_cnn(), W8A8, digits_task(), tmp_path / "run", quick=True)
    assert not (tmp_path / "run").exists()


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _digits_cnn()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"logits": logits, "embedding": torch.tanh(logits)}


def test_a_metric_reads_a_dict_output_from_the_file_too(tmp_path: Path) -> None:
    """A model returning a dict: its metric reads ``out["logits"]`` from the torch model and
    from the ONNX Runtime file alike (the file's outputs came back a flat tuple)."""
    from edgeslim.data import load_digits_split

    train, test = load_digits_split("train"), load_digits_split("test")
    x, y = test.images, test.labels
    seen: list[type] = []

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            out = model(x)
        seen.append(type(out))
        return float((out["logits"].argmax(1) == y).float().mean() * 100)

    calibration = TensorBatches(train.images[:256], batch_size=64)
    task = Task((x[:1],), calibration=calibration, evaluate=accuracy, metric="acc")
    result = edgeslim.compress(_DictOut().eval(), W8A8, task, out=tmp_path / "run", quick=True)
    assert seen and all(t is dict for t in seen) and len(seen) >= 3
    assert result.records[1].runtime == "onnxruntime" and result.records[1].metric == "acc"


def test_a_failing_run_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def broken(model: nn.Module) -> float:
        raise RuntimeError("metric service down")

    x = torch.rand(16, 1, 8, 8)
    task = Task((x[:1],), calibration=TensorBatches(x, batch_size=8), evaluate=broken)
    with pytest.raises(TaskError, match="metric function raised RuntimeError"):
        edgeslim.compress(_digits_cnn(), W8A8, task, out=out)
    assert list(tmp_path.iterdir()) == []


def test_inputs_that_do_not_fit_the_model_are_one_clear_error() -> None:
    x = torch.rand(8, 3, 8, 8)  # three channels for a one-channel model
    task = Task((x[:1],), calibration=TensorBatches(x, batch_size=8))
    with pytest.raises(
        TaskError, match=r"does not run on the task's example inputs \(\[1, 3, 8, 8\]\)"
    ):
        edgeslim.compress(_digits_cnn(), W8A8, task)


def test_a_stage_error_names_the_stage(tmp_path: Path) -> None:
    x = torch.rand(8, 1, 8, 8)
    task = Task((x[:1],), calibration=TensorBatches(x, batch_size=8))  # no train data
    recipe = {"stages": [{"kind": "finetune", "epochs": 1}]}
    with pytest.raises(TaskError, match="fine-tuning, QAT, learned gates"):
        edgeslim.compress(_digits_cnn(), recipe, task, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_empty_recipes_and_file_outputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no stages"):
        edgeslim.compress(_digits_cnn(), {"stages": []}, digits_task())
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(EdgeslimError, match="not a folder"):
        edgeslim.compress(_digits_cnn(), W8A8, digits_task(), out=path)


def test_a_compressed_model_slower_than_its_original_is_said() -> None:
    from edgeslim.compression import slower_warnings

    prune = [{"kind": "prune", "round_to": 1}]
    notes = slower_warnings({"torch": (1.0, 1.02), "onnxruntime": (0.99, 0.52)}, prune)
    assert len(notes) == 1 and notes[0].startswith("WARNING: the compressed model runs slower")
    assert "onnxruntime (0.990 ms vs 0.520 ms, 0.53x)" in notes[0] and "round_to: 8" in notes[0]
    # rounded widths, or a quantized model: the slowdown is said without the pruning hint
    for stages in ([{"kind": "prune", "round_to": 8}], [{"kind": "quantize"}]):
        (note,) = slower_warnings({"onnxruntime": (2.0, 1.0)}, stages)
        assert "round_to" not in note
    assert slower_warnings({"onnxruntime": (1.04, 1.0)}, prune) == []  # within the noise


def test_from_an_output_reuses_the_data_its_command_line_recorded(tmp_path: Path) -> None:
    """``compress``/``export onnx --from OUT`` on a model from outside the zoo needs its data
    again: the command line recorded in OUT's manifest gives it (with its shapes and
    metric), unless --data is given or the recorded path is not found from here."""
    from edgeslim.compression import recorded_data

    npz = tmp_path / "samples.npz"
    npz.write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["edgeslim", "compress", "nets.py:build", "--input-shape", "1,3,8,8",
            "--input-shape=1,4", f"--data={npz}", "--metric", "top1"]  # fmt: skip
    (out / "manifest.json").write_text(
        json.dumps({"format": "edgeslim-manifest", "version": 1, "command": argv})
    )
    assert recorded_data(out, None, None, ()) == (str(npz), "top1", ((1, 3, 8, 8), (1, 4)), ())
    assert recorded_data(out, "other.npz", None, ()) == ("other.npz", None, (), ())
    # a chain: an output compressed --from `out` without --data uses what `out` recorded
    later = tmp_path / "later"
    later.mkdir()
    chained = ["edgeslim", "compress", "--from", str(out), "--recipe", "w8a8.yaml"]
    (later / "manifest.json").write_text(
        json.dumps({"format": "edgeslim-manifest", "version": 1, "command": chained})
    )
    assert recorded_data(later, None, None, ()) == (str(npz), "top1", ((1, 3, 8, 8), (1, 4)), ())
    assert recorded_data(None, None, None, ()) == (None, None, (), ())
    # the free dimensions it was exported with come back too, "" for an input with none
    argv += ["--dynamic-dims", "2,3", "--dynamic-dims="]
    (out / "manifest.json").write_text(
        json.dumps({"format": "edgeslim-manifest", "version": 1, "command": argv})
    )
    assert recorded_data(out, None, None, ())[3] == ((2, 3), ())
    assert recorded_data(out, None, None, (), ((1,),))[3] == ((1,),)  # given: kept
    npz.unlink()  # recorded, but not found from here: left to the usual error
    assert recorded_data(out, None, None, ()) == (None, None, (), ())


def _tanh_net(gain: float) -> nn.Module:
    """A 24-layer tanh MLP with weights N(0, gain^2 / fan_in): ordered for gain 1, chaotic
    (any input difference grows layer by layer) for gain 4."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(24):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, std=gain / 32**0.5)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 10)).eval()


@pytest.mark.parametrize(("gain", "said"), [(4.0, "itself is that sensitive"),
                                            (1.0, "Report this with the model")])  # fmt: skip
def test_a_metric_gap_refusal_says_when_the_torch_model_amplifies_any_noise(
    gain: float, said: str
) -> None:
    from edgeslim.compression import refuse_metric_gap
    from edgeslim.export.verify import Parity

    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    model = _tanh_net(gain)
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x[:64], batch_size=64),
                validation=TensorBatches(x[64:], batch_size=64))  # fmt: skip
    task.bind_reference(model)
    torch_m = task.measure(model)
    assert torch_m["agreement"] == 100.0
    file_m = {**torch_m, "agreement": 90.0}  # a file 10 points off
    with pytest.raises(EdgeslimError, match=said):
        refuse_metric_gap(task, torch_m, file_m, Parity([0.5], [0.1], 4), model=model)
