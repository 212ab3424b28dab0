from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edgeslim.bench.records import Record, load_records, save_records
from edgeslim.report import pareto_front, write_report


def _rec(model: str, value: float, lat: float) -> Record:
    return Record(
        suite="t",
        model=model,
        method="edgeslim:x",
        config={"w_bits": 8},
        metric="top1",
        value=value,
        baseline_value=90.0,
        params=10,
        macs=100,
        size_bytes=40,
        latency_ms=lat,
        baseline_latency_ms=2.0,
        runtime="onnxruntime",
        seconds=1.0,
        data_used="none",
    )


def test_records_round_trip_and_report_is_made_from_them(tmp_path: Path) -> None:
    recs = [_rec("a", 89.5, 1.0), _rec("a", 90.0, 2.0), _rec("b", 70.25, 0.5)]
    save_records(recs, tmp_path / "results.json")
    assert load_records(tmp_path / "results.json") == recs
    write_report(recs, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| a | edgeslim:x | w_bits=8 | onnxruntime | top1 | 89.50 | 90.00 | -0.50 |" in text
    assert "2.00x" in text and "70.25" in text
    # the run writing the report measured it: it names this machine and records it
    assert "Measured on " in text and (tmp_path / "machine.json").is_file()
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_report_when_the_last_model_lacks_a_runtime(tmp_path: Path) -> None:
    torch_row = _rec("a", 90.0, 1.0).model_copy(update={"runtime": "torch"})
    recs = [torch_row, _rec("a", 89.0, 1.0), _rec("b", 0.9, 2.0)]  # b: onnxruntime only
    write_report(recs, tmp_path)
    assert (tmp_path / "tradeoff_torch_latency_ms.png").is_file()


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 100)), min_size=1, max_size=30))
def test_pareto_front_is_exactly_the_non_dominated_points(pts: list[tuple[float, float]]) -> None:
    front = set(pareto_front(pts))

    def dominated(i: int) -> bool:
        c, q = pts[i]
        return any(
            (c2 <= c and q2 >= q) and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(pts) if j != i
        )

    for i in range(len(pts)):
        if dominated(i):
            assert i not in front
    # every non-dominated point is on the front unless an identical point already is
    for i in range(len(pts)):
        if not dominated(i) and i not in front:
            assert any(pts[j] == pts[i] for j in front)
