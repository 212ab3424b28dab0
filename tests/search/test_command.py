"""``edgeslim search`` end to end on a small CNN trained on sklearn digits (real data)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from edgeslim.cli import app

runner = CliRunner()

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from edgeslim.data import TensorBatches, load_digits_split
    from edgeslim.train.loop import TrainConfig, train_classifier

    def make() -> nn.Module:
        train = load_digits_split("train")
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        batches = TensorBatches(train.images, train.labels, 64, shuffle=True)
        train_classifier(model, batches, TrainConfig(epochs=6, lr=0.05, channels_last=False),
                         description="digits")
        return model.eval()
    """
)


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "digits_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "digits_factory:make"


def _search(factory: str, out: Path, *extra: str) -> Result:
    args = ["search", factory, "--data", "digits", "--constraint", "size<=0.2x", "--max-drop",
            "6", "--w-bits", "4,8", "--keep", "1", "--out", str(out), *extra]  # fmt: skip
    return runner.invoke(app, args)


def test_search_writes_policy_onnx_plot_and_resumes(factory: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _search(factory, out, "--budget", "3", "--strategy", "random")
    assert first.exit_code == 0, first.output
    journal = (out / "journal.jsonl").read_text().splitlines()
    data = json.loads((out / "search.json").read_text())
    assert data["search"]["measured"] == 3 and len(journal) >= 4  # a header, then results
    assert len(data["uniform"]) == 2  # W4 and W8 everywhere, drawn beside the search
    assert data["search"]["feasible"]  # mixed 4/8-bit weights fit in a fifth of the bytes
    assert (out / "policy.json").is_file() and (out / "model.onnx").is_file()
    structure = json.loads((out / "policy.structure.json").read_text())  # for a later apply
    assert structure["policy"] == data["search"]["best"]["result"]["policy_id"]
    assert data["export"]["parity"]["inputs_checked"] >= 2  # checked on more than one input
    assert data["search"]["best"]["result"]["relative"]["size"] <= 0.2
    assert "top1" in data["test_metrics"]  # the test split, read once for the chosen model
    assert (out / "search_size.png").is_file()
    # a rerun with a larger budget continues the journal: finished lines stay as they were
    again = _search(factory, out, "--budget", "5", "--strategy", "random")
    assert again.exit_code == 0, again.output
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert lines[: len(journal)] == journal and len(lines) > len(journal)
    assert json.loads((out / "search.json").read_text())["search"]["measured"] > 3
    # another strategy in the same folder is refused (the journal names what differs)
    other = _search(factory, out, "--budget", "5", "--strategy", "evolutionary")
    assert other.exit_code == 2 and "strategy" in other.output


def test_search_refuses_bad_input_before_writing(factory: str, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    bad = runner.invoke(app, ["search", factory, "--data", "digits", "--constraint",
                              "speed<=2x", "--out", str(out)])  # fmt: skip
    assert bad.exit_code == 2 and "allowed" in bad.output and "size" in bad.output
    assert not out.exists()
    none = runner.invoke(app, ["search", factory, "--data", "digits", "--out", str(out)])
    assert none.exit_code == 2 and "--constraint" in none.output
    bits = runner.invoke(app, ["search", factory, "--data", "digits", "--constraint",
                               "size<=0.5x", "--w-bits", "4,16", "--out", str(out)])  # fmt: skip
    assert bits.exit_code == 2 and "1..8" in bits.output and "16" in bits.output
    assert not out.exists()
    wrong = _search(factory, out, "--strategy", "evolutionary", "--option", "pop=4")
    assert wrong.exit_code == 2 and "'pop'" in wrong.output and "population" in wrong.output
    shape = _search(factory, out, "--option", "population")
    assert shape.exit_code == 2 and "KEY=VALUE" in shape.output
    assert not out.exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    refused = _search(factory, used, "--budget", "2")
    assert refused.exit_code == 2 and "--force" in refused.output
    assert (used / "notes.txt").read_text() == "keep me"


def test_search_with_no_feasible_policy_writes_its_files_and_exits_1(
    factory: str, tmp_path: Path
) -> None:
    out = tmp_path / "none"
    args = ["search", factory, "--data", "digits", "--constraint", "size<=0.01x",
            "--w-bits", "4,8", "--keep", "1", "--budget", "2", "--strategy", "random",
            "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # a result, not a usage error (2)
    assert "NO FEASIBLE POLICY" in result.output
    data = json.loads((out / "search.json").read_text())
    assert not data["search"]["feasible"] and not (out / "policy.json").exists()


def test_a_chosen_file_that_computes_differently_on_this_cpu_is_warned_about(
    factory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an x86 without VNNI the int8 kernels saturate with full-range 8-bit weights and
    the exported file computes differently from the scored model: the search says so and
    names its own way to 7-bit weights (forced here, so the check runs on every CPU)."""
    import edgeslim.compression  # noqa: F401  (imported here first, it would keep the patch)
    from edgeslim.export import verify
    from edgeslim.export.verify import Parity

    monkeypatch.setattr("edgeslim.runtime.machine.int8_sums_saturate", lambda: True)
    monkeypatch.setattr(
        verify, "check_parity",
        lambda *a, **k: Parity(max_abs_diff=[2.0], max_rel_diff=[0.2], inputs_checked=7),
    )  # fmt: skip
    out = tmp_path / "run"
    args = ["search", factory, "--data", "digits", "--constraint", "size<=0.5x", "--w-bits", "8",
            "--keep", "1", "--budget", "1", "--strategy", "random", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (said,) = json.loads((out / "search.json").read_text())["export"]["warnings"]
    assert "20.0%" in said and "--w-bits 4,6,7" in said


def test_depth_on_a_model_without_residual_branches_exits_2_saying_so(
    factory: str, tmp_path: Path
) -> None:
    result = _search(factory, tmp_path / "run", "--budget", "1", "--depth")
    assert result.exit_code == 2
    assert "no removable residual branch" in result.output
    assert "search without depth" in result.output


def test_reconstruct_without_pruning_choices_exits_2_saying_so(
    factory: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = _search(factory, out, "--budget", "1", "--reconstruct")  # --keep 1: no pruning
    assert result.exit_code == 2
    assert "reconstruct refits the layers that channel pruning narrowed" in result.output
    assert not (out / "search.json").exists()


DISTANCE = textwrap.dedent(
    """
    import numpy as np
    import torch
    from torch import nn

    class Distance(nn.Module):  # one score per sample, never negative
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.a(x) - self.b(x)).norm(dim=1)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return Distance().eval()
    """
)


def test_search_refuses_agreement_that_cannot_fall_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    (tmp_path / "distance_factory.py").write_text(DISTANCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 16)).astype("float32"))
    out = tmp_path / "out"
    args = ["search", "distance_factory:make", "--input-shape", "1,16", "--data", str(data),
            "--constraint", "size<=0.5x", "--max-drop", "1", "--budget", "2"]  # fmt: skip
    refused = runner.invoke(app, [*args, "--out", str(out)])
    assert refused.exit_code == 2 and "--metric cosine" in refused.output
    assert not out.exists()


def test_parse_options_reads_json_lists_files_and_strings(tmp_path: Path) -> None:
    from edgeslim.errors import EdgeslimError
    from edgeslim.search.command import parse_options

    (tmp_path / "start.json").write_text('{"layers": {"0": {"w_bits": 4}}}')
    got = parse_options(
        [
            "population=12",
            "trim=false",
            "preference=0.7, 0.3",
            "weights=[1,2]",
            "rank=hessian",
            f"start=@{tmp_path / 'start.json'}",
        ]
    )
    assert got == {"population": 12, "trim": False, "preference": [0.7, 0.3],
                   "weights": [1, 2], "rank": "hessian",
                   "start": {"layers": {"0": {"w_bits": 4}}}}  # fmt: skip
    for bad, says in [("=3", "KEY=VALUE"), ("a b=3", "KEY=VALUE"), ("noequals", "KEY=VALUE"),
                      (f"start=@{tmp_path / 'missing.json'}", "does not exist")]:  # fmt: skip
        with pytest.raises(EdgeslimError, match=says):
            parse_options([bad])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EdgeslimError, match=r"broken\.json: not JSON"):
        parse_options([f"start=@{tmp_path / 'broken.json'}"])
    with pytest.raises(EdgeslimError, match="given twice"):
        parse_options(["population=2", "population=3"])


def test_strategy_options_reach_the_strategy_and_the_journal(factory: str, tmp_path: Path) -> None:
    out = tmp_path / "opts"
    args = ("--budget", "2", "--strategy", "evolutionary", "--option", "population=2")
    first = _search(factory, out, *args)
    assert first.exit_code == 0, first.output
    header = json.loads((out / "journal.jsonl").read_text().splitlines()[0])
    assert header["options"] == {"population": 2}
    assert json.loads((out / "search.json").read_text())["command"]["options"] == {"population": 2}
    # the value is the strategy's to check: evolutionary refuses a population of 1
    bad = _search(factory, tmp_path / "bad", *args[:-1], "population=1")
    assert bad.exit_code == 2 and "population must be >= 2" in bad.output
    # resuming with other options is refused: the journal names what differs
    other = _search(factory, out, *args[:-1], "population=3")
    assert other.exit_code == 2 and "options" in other.output


def test_exclude_skip_and_criterion_shape_the_space(factory: str, tmp_path: Path) -> None:
    out = tmp_path / "shaped"
    bad = _search(factory, out, "--criterion", "loudest")
    assert bad.exit_code == 2 and "fpgm" in bad.output and not out.exists()
    unmatched = _search(factory, out, "--exclude", "head*")
    assert unmatched.exit_code == 2 and "head*" in unmatched.output and not out.exists()
    run = _search(factory, out, "--budget", "2", "--strategy", "random", "--exclude", "0",
                  "--criterion", "fpgm", "--skip", "3")  # fmt: skip
    assert run.exit_code == 0, run.output
    policy = json.loads((out / "policy.json").read_text())
    assert "0" not in policy["layers"] and {"3", "8"} <= set(policy["layers"])
    structure = json.loads((out / "policy.structure.json").read_text())
    assert structure["select"]["0"] is None  # the excluded first conv stays float
    choices = json.loads((out / "search.json").read_text())["command"]["choices"]
    assert choices["criterion"] == "fpgm" and choices["skip"] == ["3"]


def test_a_searched_policy_is_applied_by_a_recipe_on_the_command_line(
    factory: str, tmp_path: Path
) -> None:
    """edgeslim search, then edgeslim compress with a recipe naming its policy: the same
    bits, measured and exported as any compress output."""
    import yaml

    found = tmp_path / "found"
    assert _search(factory, found, "--budget", "2", "--strategy", "random").exit_code == 0
    recipe = tmp_path / "apply.yaml"
    stage = {"kind": "search", "policy": str(found / "policy.json"), "w_bits": [4, 8],
             "keep": [1.0]}  # fmt: skip
    recipe.write_text(yaml.safe_dump({"name": "apply", "stages": [stage]}))
    out = tmp_path / "applied"
    done = runner.invoke(app, ["compress", factory, "--recipe", str(recipe), "--data", "digits",
                               "--out", str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert (out / "model.onnx").is_file()
    chosen = json.loads((found / "policy.json").read_text())
    assert json.loads((out / "search.policy.json").read_text()) == chosen


def test_the_executor_is_closed_before_the_candidates_are_timed(
    digits_model: object, digits_task: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parallel executor's workers would share the cores with the whole-model timing that
    decides a latency limit: ``search_task`` closes it first."""
    from edgeslim.search import LocalExecutor
    from edgeslim.search import verify as verify_module
    from edgeslim.search.choices import SpaceChoices
    from edgeslim.search.command import search_task
    from edgeslim.search.constraints import Constraints

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    events: list[str] = []

    class Closing(LocalExecutor):
        def close(self) -> None:
            events.append("closed")

    timed = verify_module.measure_candidates

    def measure(*args: object, **kwargs: object) -> object:
        events.append("timed")
        return timed(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_module, "measure_candidates", measure)
    _, _, _, result = search_task(
        digits_model, digits_task, Constraints.parse(["latency<=10x"], None), strategy="random",
        budget=2, seed=0, choices=SpaceChoices(w_bits=(8,), keep=(1.0,)), quick=True,
        executor=Closing(),
    )  # fmt: skip
    assert events == ["closed", "timed"]
    assert result.policy is not None
