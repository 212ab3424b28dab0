from __future__ import annotations

import math
import random

from edgeslim.cost.lut import LatencyTable
from edgeslim.search import SearchSpace
from edgeslim.search.latency import LutLatency


def test_lut_latency_is_anchored_on_measured_models_and_checked(
    space: SearchSpace, tmp_path
) -> None:
    """After calibration the float and all-int8 predictions equal their whole-model
    measurements (the residual makes them exact); other policies get a measured error."""
    lut = LutLatency(space, LatencyTable(repeats=5, cache_dir=tmp_path), repeats=10, seconds=0.2)
    residual = lut.calibrate()
    # the space prunes (keep 0.5 or 1), so the narrowest all-int8 policy is an anchor too
    assert set(lut.anchors) == {"fp32", "int8", "int8_narrow"}
    # each anchor's ratio per calibration window: two at least (a gap apart), three at most
    assert set(lut.anchor_windows) == {"int8", "int8_narrow"}
    assert all(2 <= len(w) <= 3 and min(w) > 0 for w in lut.anchor_windows.values())
    assert math.isclose(lut.predict(None), lut.anchors["fp32"], rel_tol=1e-9)
    int8 = space.uniform(w_bits=8, a_bits=8, keep=1.0)
    assert math.isclose(lut.predict(int8), lut.anchors["int8"], rel_tol=1e-9)
    narrow = space.uniform(w_bits=8, a_bits=8, keep=0.5)
    if residual.floor_ms > 0:  # the line through both int8 anchors rose: it is exact too
        assert math.isclose(lut.predict(narrow), lut.anchors["int8_narrow"], rel_tol=1e-9)
    assert (residual.fp32_ms, residual.fp32_scale) != (residual.int8_ms, residual.int8_scale)
    # calibration timed the kernels of the uniforms and of random policies together first
    # (LutLatency.warm): a policy pruning one group, not an anchor, has its kernels at their
    # pruned shapes already, and warming again times nothing
    genes = list(space.top())
    genes[next(i for i, d in enumerate(space.dims) if d.kind == "keep")] = 0
    half = space.decode(genes)
    measured = lut.table.measured
    assert measured >= len({k.id() for p in (None, int8, narrow) for k in lut.keys(p)})
    assert lut.layers(half).macs < lut.layers(int8).macs and lut.table.measured == measured
    assert all(k.id() in lut.table._entries for k in lut.keys(half))
    assert lut.warm() == 0
    rng = random.Random(0)
    policies = [space.decode([rng.randrange(len(d.choices)) for d in space.dims]) for _ in range(2)]
    check = lut.check(policies)
    assert len(check.rows) == 2 and all(m > 0 and p > 0 for _, p, m in check.rows)
    assert math.isfinite(check.max_error) and check.to_dict()["rows"][0]["policy"] == policies[0].id
    # errors are of the ratio to the float model timed in the same interleaved run
    d = check.to_dict()
    assert d["errors_of"] == "ratio" and check.reference is not None
    pred_ref, meas_ref = check.reference
    assert math.isclose(pred_ref, lut.predict(None))
    row = d["rows"][0]
    assert math.isclose(row["measured_ratio"], round(check.rows[0][2] / meas_ref, 4), abs_tol=1e-4)
    # the row's ratios are rounded to 4 decimals: when prediction and measurement are close
    # (1.0878 vs 1.0904 in one run) that rounding alone exceeds 1% of their difference
    assert math.isclose(check.errors[0], abs(row["predicted_ratio"] - row["measured_ratio"])
                        / row["measured_ratio"], rel_tol=1e-2, abs_tol=2e-4)  # fmt: skip
    assert lut.table.path.is_file()  # the measured kernels are cached for the next run


def test_check_reanchors_on_the_anchors_timed_with_it(space: SearchSpace, tmp_path) -> None:
    """The check times the all-int8 anchor with the checked policies: under the residual
    re-derived there, the anchor and the float model predict their own timings exactly,
    and the errors differ from the start-of-run calibration's only by that residual."""
    lut = LutLatency(space, LatencyTable(repeats=5, cache_dir=tmp_path), repeats=10, seconds=0.2)
    lut.calibrate()
    int8 = space.uniform(w_bits=8, a_bits=8, keep=1.0)
    half = space.uniform(w_bits=8, a_bits=8, keep=0.5)
    check = lut.check([int8, half])
    again = check.reanchored
    assert again is not None and again.reference is not None
    assert [r[0] for r in again.rows] == [r[0] for r in check.rows]
    assert [r[2] for r in again.rows] == [r[2] for r in check.rows]  # the same timings
    assert math.isclose(again.reference[0], again.reference[1], rel_tol=1e-6)
    # the anchor, timed in the same run as its copy in the rows, is predicted near that copy
    assert again.errors[0] < 0.5
    # the kernels' sum is shared: only the residual moved
    assert check.residual is lut.residual and again.residual is not None
    for p, first, second in zip((int8, half), check.rows, again.rows, strict=True):
        lt = lut.layers(p)
        assert math.isclose(first[1], check.residual.predict(lt.total_ms, lt.int8_share))
        assert math.isclose(second[1], again.residual.predict(lt.total_ms, lt.int8_share))
    assert check.to_dict()["residual"] == lut.residual.to_dict()
    assert "reanchored" in check.to_dict() and "reanchored" not in again.to_dict()
