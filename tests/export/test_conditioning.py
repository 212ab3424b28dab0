"""Rows of an fp32 export check held to torch's own float32 precision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeslim.export.conditioning import (
    FLOAT_NOISE,
    ROW_BOUND,
    Float64Reference,
    judge_rows,
    row_max,
)


def _case(rows: int = 8, ill: tuple[int, ...] = (3,)) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's float32 logits and the exact ones: rows in ``ill`` carry a float32 error of
    1% of the output's scale (100x FLOAT_NOISE), the others 1e-6."""
    exact = torch.linspace(-10.0, 10.0, rows * 5, dtype=torch.float64).reshape(rows, 5)
    ref = exact + 1e-6 * 10.0
    for r in ill:
        ref[r] = exact[r] + 0.01 * 10.0
    return ref.float(), exact


def test_an_ill_conditioned_row_is_judged_by_torchs_own_error() -> None:
    ref, exact = _case()
    got = ref.clone()
    got[3] += 0.05 * 10.0  # 5x torch's own error on that row, 5% of the scale
    got[0] += 2e-4  # an ordinary rounding difference elsewhere
    diff, aside = judge_rows("batch", 0, ref, got, exact, 0, 10.0)
    assert aside is not None and (aside.rows, aside.of) == (1, 8)
    assert abs(diff - 2e-4) < 1e-6  # the other rows' largest difference
    assert abs(aside.onnx_error - 0.05) < 1e-4 and abs(aside.torch_error - 0.01) < 1e-4
    assert "1 of 8 rows" in aside.describe()


def test_a_row_far_beyond_torchs_error_is_not_set_aside() -> None:
    ref, exact = _case()
    got = ref.clone()
    got[3] += (ROW_BOUND + 5) * 0.01 * 10.0
    diff, aside = judge_rows("batch", 0, ref, got, exact, 0, 10.0)
    assert aside is None and diff > 1.0


def test_most_or_all_rows_may_be_ill_conditioned() -> None:
    """A MobileNetV1 after low-rank fine-tuning had 9 of 16 rows past 1e-4 in torch itself."""
    ref, exact = _case(ill=(0, 1, 2, 3, 4))
    got = ref + 0.02  # within 20x of torch's own error on the ill rows
    diff, aside = judge_rows("batch", 0, ref, got, exact, 0, 10.0)
    assert aside is not None and aside.rows == 5 and abs(diff - 0.02) < 1e-5
    ref, exact = _case(ill=tuple(range(8)))
    diff, aside = judge_rows("batch", 0, ref, ref + 0.02, exact, 0, 10.0)
    assert aside is not None and aside.rows == 8 and diff == 0.0


def test_well_conditioned_rows_set_nothing_aside() -> None:
    ref, exact = _case(ill=())
    got = ref + 0.5  # a mistranslation: 5% of the scale on every row
    diff, aside = judge_rows("batch", 0, ref, got, exact, 0, 10.0)
    assert aside is None and abs(diff - 0.5) < 1e-5
    assert FLOAT_NOISE * 10.0 > 1e-6 * 10.0


def test_rows_follow_the_batch_axis() -> None:
    t = torch.zeros(2, 3, 4)  # a recurrent state: (layers, batch, hidden)
    t[1, 2, 0] = -5.0
    assert row_max(t, 1).tolist() == [0.0, 0.0, 5.0]
    assert row_max(t, None).tolist() == [5.0]


def test_float64_reference_runs_a_copy_and_gives_up_on_float32_only_code() -> None:
    lin = nn.Linear(3, 2)
    x = (torch.randn(4, 3),)
    out = Float64Reference(lin).outputs(x)
    assert out is not None and out[0].dtype == torch.float64
    assert lin.weight.dtype == torch.float32  # the model itself is untouched

    class Float32Only(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ torch.ones(3, 2, dtype=torch.float32)

    assert Float64Reference(Float32Only()).outputs(x) is None


class _Rounded:
    """A real ONNX Runtime session whose output row ``row`` moves by ``delta``: another
    float summation order, as another CPU's kernels would give, made certain here."""

    def __init__(self, session: object, row: int | None, delta: float) -> None:
        self._session, self._row, self._delta = session, row, delta

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run(self, names: object, feeds: dict[str, object]) -> list[object]:
        (out,) = self._session.run(names, feeds)  # type: ignore[attr-defined]
        out = out.copy()
        if self._row is None:
            out += self._delta
        else:
            out[self._row] += self._delta
        return [out]


def _cancelling() -> tuple[nn.Module, torch.Tensor, float]:
    """A linear layer and inputs whose row 3 sums values of 1e4 that cancel to about 0:
    torch's float32 result there is off by a few percent of the output's scale (the other
    rows' by 1e-7); returned with that error."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 4, bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.sign(torch.randn(4, 1024)))
        w = lin.weight.double()
        big = torch.randn(1024, dtype=torch.float64) * 1e4
        big -= w.T @ torch.linalg.solve(w @ w.T, w @ big)  # every output of row 3 near 0
    x = torch.randn(8, 1024) * 1e-2
    x[3] = big.float()
    with torch.no_grad():
        error = float((lin(x).double() - lin.double()(x.double())).abs().max())
    lin.float()
    return lin, x, error


def test_check_parity_sets_an_ill_conditioned_row_aside(tmp_path: Path) -> None:
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.verify import check_parity
    from edgeslim.runtime.ort import ort_session

    lin, x, error = _cancelling()
    with torch.no_grad():
        scale = float(lin(x).abs().max())
    assert error > FLOAT_NOISE * scale  # the row is ill-conditioned in torch itself
    path = export_onnx(lin, (x[:1],), tmp_path / "lin.onnx", ["x"], ["output"],
                       {"x": {0: "batch"}, "output": {0: "batch"}})  # fmt: skip
    session = ort_session(path)

    parity = check_parity(lin, _Rounded(session, 3, 5 * error), [("held", (x,))])
    assert [(a.rows, a.of) for a in parity.set_aside] == [(1, 8)]
    assert parity.failures(1e-3) == []
    assert "held, output 0: 1 of 8 rows" in parity.describe()

    moved = check_parity(lin, _Rounded(session, None, 5 * error), [("held", (x,))])
    assert moved.failures(1e-3)  # every row moved: the others still fail
