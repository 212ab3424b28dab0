"""Exit codes and messages of the real entry point (``edgeslim.cli.main``): user errors exit 2
with one paragraph, internal errors exit 1 naming a log file, Ctrl-C exits 130."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import typer

from edgeslim import exits
from edgeslim.cli import main
from edgeslim.errors import DataCorruptError


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    out = capsys.readouterr()
    code = ended.value.code
    assert isinstance(code, int)
    return code, " ".join((out.out + out.err).split())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A folder with an (empty) results.json, as `bench` leaves one."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text("[]\n")
    return d


@pytest.fixture(autouse=True)
def _logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    logs = tmp_path / "logs"
    monkeypatch.setenv(exits.LOG_DIR_ENV, str(logs))
    return logs


def test_version_names_edgeslim_torch_and_onnxruntime(capsys: pytest.CaptureFixture[str]) -> None:
    import edgeslim

    code, text = _run(["--version"], capsys)
    assert code == 0
    assert text.startswith(f"edgeslim {edgeslim.__version__} (torch ")
    assert "onnxruntime" in text and "not installed" not in text


def test_report_refuses_the_same_folder_twice(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = run_dir / ".." / run_dir.name  # the same folder, spelled differently
    code, text = _run(["report", str(run_dir), str(again), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "is given twice" in text and not (tmp_path / "r").exists()


def test_report_never_writes_over_a_compress_output_or_a_run_it_merges(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compress output's report and results are checksummed in its manifest: a merged
    report written there broke its reload (exit 0 before). Nor over a run being merged."""
    out = tmp_path / "compressed"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "results.json").write_text("[]\n")
    code, text = _run(["report", str(run_dir), "--out", str(out)], capsys)
    assert code == 2 and "output of a compress or export run" in text
    assert (out / "results.json").read_text() == "[]\n" and not (out / "report.md").exists()
    code, text = _run(["report", str(run_dir), "--out", str(run_dir)], capsys)
    assert code == 2 and "is one of the runs merged" in text


def test_out_that_is_a_file_exits_2_naming_it(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "taken"
    f.write_text("x")
    code, text = _run(["report", str(run_dir), "--out", str(f)], capsys)
    assert code == 2
    assert f"{f} is an existing file where a folder is needed" in text
    assert "Traceback" not in text


def test_unwritable_out_exits_2_with_what_to_do(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "ro" / "results.json"

    def refuse(records: object, path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr("edgeslim.bench.records.save_records", refuse)
    code, text = _run(["report", str(run_dir), "--out", str(target.parent)], capsys)
    assert code == 2
    assert f"permission denied for {target}" in text and "--out" in text


def test_internal_error_exits_1_with_a_log_holding_the_traceback(
    run_dir: Path, _logs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(path: Path) -> list[object]:
        raise RuntimeError("boom in the loader")

    monkeypatch.setattr("edgeslim.bench.records.load_records", boom)
    code, text = _run(["report", str(run_dir)], capsys)
    assert code == 1
    assert "internal error (RuntimeError: boom in the loader)" in text
    logs = list(_logs.glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in text
    log = logs[0].read_text()
    assert "Traceback (most recent call last)" in log and "boom in the loader" in log
    assert "command: edgeslim report" in log
    assert "Traceback" not in text  # the terminal gets one paragraph, the log the details


def test_ctrl_c_exits_130_saying_what_was_kept(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(*args: object, **kwargs: object) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr("edgeslim.compression.compress_model", interrupted)
    out = tmp_path / "c"
    recipe = tmp_path / "q.yaml"
    code, text = _run(["compress", "resnet20", "--recipe", str(recipe), "--out", str(out)], capsys)
    assert code == 130
    assert text.startswith("edgeslim compress resnet20")  # printed at once, before loading
    assert f"interrupted (Ctrl-C): {out} was left as it was before this run" in text
    monkeypatch.setattr("edgeslim.bench.records.load_records", interrupted)
    code, text = _run(["report", str(run_dir), "--out", str(tmp_path / "r")], capsys)
    assert code == 130
    assert "holds only what was finished before the interrupt" in text


def test_a_truncated_stream_is_not_aborted_and_a_data_error_exits_2() -> None:
    app = typer.Typer()

    @app.command()
    def eof() -> None:
        raise EOFError  # what gzip raises on a cut file; typer alone prints "Aborted."

    @app.command()
    def corrupt() -> None:
        raise DataCorruptError("x.gz is truncated or corrupt")

    said: list[str] = []
    cmd = typer.main.get_command(app)
    assert exits.run(cmd, ["eof"], said.append) == 1
    assert said[-1].startswith("error: internal error (EOFError)")
    assert exits.run(cmd, ["corrupt"], said.append) == 2
    assert said[-1] == "error: x.gz is truncated or corrupt"
    assert exits.run(cmd, ["nosuch"], said.append) == 2  # usage error


def _module(tmp_path: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write ``name.py`` into a fresh folder and make it the current directory."""
    folder = tmp_path / "cwd"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(body)
    monkeypatch.chdir(folder)
    return name


NET = "import torch\n\ndef good():\n    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))\n"


def test_module_factory_in_the_current_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _module(tmp_path, f"cwdnet_{tmp_path.name}", NET, monkeypatch)
    code, text = _run(["info", f"{mod}:good", "--input-shape", "1,1,8,8"], capsys)
    assert code == 0, text
    assert "MACs" in text


@pytest.mark.parametrize(
    ("body", "attr", "expected"),
    [
        ("def build():\n    raise ValueError('needs a width')\n", "build",
         "raised ValueError: needs a width"),
        ("BUILD = 3\n", "BUILD", "is a int, not a function"),
        ("def build(:\n", "build", "raised SyntaxError"),
    ],
)  # fmt: skip
def test_bad_module_factory_exits_2(
    body: str,
    attr: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mod = _module(tmp_path, f"badnet_{tmp_path.name}", body, monkeypatch)
    code, text = _run(["info", f"{mod}:{attr}", "--input-shape", "1,1,8,8"], capsys)
    assert code == 2, text
    assert expected in text and "Traceback" not in text


def test_an_embedding_model_given_only_shapes_is_told_to_pass_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = (
        "import torch\n\ndef text():\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(), "
        "torch.nn.Linear(8 * 12, 3))\n"
    )
    mod = _module(tmp_path, f"textnet_{tmp_path.name}", body, monkeypatch)
    code, text = _run(["info", f"{mod}:text", "--input-shape", "1,12"], capsys)
    assert code == 2, text
    assert "integer ids" in text and "--data" in text and "Traceback" not in text


def test_a_folder_as_checkpoint_is_called_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    code, text = _run(["info", "resnet20", "--checkpoint", str(tmp_path)], capsys)
    assert code == 2
    assert f"checkpoint {tmp_path} is a folder, not a safetensors file" in text
    assert "model.safetensors" in text and "does not exist" not in text


@pytest.mark.parametrize(
    ("dims", "said"),
    [("2,x", "is not a list of dimensions"), ("0,2", "dimension 0 cannot be made dynamic")],
)
def test_bad_dynamic_dims_exit_2_naming_them(
    dims: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    np.savez(tmp_path / "s.npz", x=np.zeros((4, 1, 28, 28), dtype=np.float32))
    argv = ["export", "onnx", "resnet20", "--data", str(tmp_path / "s.npz"),
            "--dynamic-dims", dims, "--out", str(tmp_path / "m.onnx")]  # fmt: skip
    code, text = _run(argv, capsys)
    assert code == 2 and said in text, text
    assert not (tmp_path / "m.onnx").exists()
