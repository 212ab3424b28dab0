"""nn.MultiheadAttention split into four linears: same outputs, prunable heads."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.graph import analyze, layer_table, total_macs
from edgeslim.graph.attention import SplitMultiheadAttention, split_attention
from edgeslim.prune import apply_plan, load_pruned, plan_pruning, prune_, save_pruned
from edgeslim.prune.planner import MacModel


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_split_attention_computes_what_torch_does(batch_first: bool, kdim: int | None) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    split = SplitMultiheadAttention.from_mha(mha).eval()
    n, length, s = 3, 5, 7
    q = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    k = torch.randn(n, s, kdim or 16) if batch_first else torch.randn(s, n, kdim or 16)
    padding = torch.zeros(n, s, dtype=torch.bool)
    padding[:, -2:] = True
    float_mask = torch.randn(length, s)
    for kwargs in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": float_mask},
        {"attn_mask": float_mask > 1.0, "average_attn_weights": False},
        {"attn_mask": torch.randn(n * 4, length, s)},
        {"need_weights": False},
    ):
        want, got = mha(q, k, k, **kwargs), split(q, k, k, **kwargs)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)


def test_split_encoder_keeps_its_outputs_and_stays_off_the_packed_fast_path() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    want = [enc(x, src_key_padding_mask=padding), enc(x, mask=causal, is_causal=True)]
    split = copy.deepcopy(enc)
    assert split_attention(split) == {f"layers.{i}.self_attn": "split" for i in range(2)}
    got = [split(x, src_key_padding_mask=padding), split(x, mask=causal, is_causal=True)]
    torch.testing.assert_close(got[0][~padding], want[0][~padding], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    assert total_macs(layer_table(split, x)) == total_macs(layer_table(enc, x))


def test_attention_that_cannot_be_split_is_left_with_its_reason() -> None:
    model = nn.Sequential()
    model.add_module("att", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert "add_bias_kv" in split_attention(model)["att"]
    assert isinstance(model.att, nn.MultiheadAttention)


class Block(nn.Module):
    """An encoder layer, then an attention called on its own with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        y = y + self.att(y, y, y, need_weights=False)[0]
        return self.head(y.mean(1))


def _heads(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, bool]]:
    return {
        g.producers[0].rsplit(".", 1)[0]: (g.size, g.unit, g.prunable)
        for g in analyze(model, x).groups
        if g.kind == "head"
    }


def test_heads_are_groups_once_split_and_named_before() -> None:
    model, x = Block().eval(), torch.randn(1, 8, 32)
    assert _heads(model, x) == {}
    split_attention(model)
    assert _heads(model, x) == {"enc.self_attn": (4, 8, True), "att": (4, 8, True)}
    # unsplit, the group feeding an attention says how to make its heads prunable
    first = nn.Sequential(nn.Linear(32, 32), nn.MultiheadAttention(32, 4, batch_first=True))

    class Front(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.att = first[0], first[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inp(x)
            return self.att(y, y, y)[0]

    (group,) = [g for g in analyze(Front().eval(), x).groups if "inp" in g.producers]
    assert not group.prunable and "split_attention" in group.reason


def test_pruning_heads_that_contribute_nothing_leaves_the_output_unchanged() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 32)
    with torch.no_grad():  # heads 1 and 3 of each attention: no weight, no bias
        for mha in (model.enc.self_attn, model.att):
            for h in (1, 3):
                rows = torch.cat([torch.arange(h * 8, h * 8 + 8) + 32 * j for j in range(3)])
                mha.in_proj_weight[rows] = 0.0
                mha.in_proj_bias[rows] = 0.0
                mha.out_proj.weight[:, h * 8 : h * 8 + 8] = 0.0
    want = model(x)
    pruned, _ = prune_(copy.deepcopy(model), (x[:1],), "l1", ratio=0.5, skip=["enc.linear1"])
    assert pruned.enc.self_attn.num_heads == pruned.att.num_heads == 2
    assert pruned.att.q_proj.out_features == 16 and pruned.att.out_proj.in_features == 16
    torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=1e-4)
    # a MACs model built on the split model predicts the pruned model's measured MACs
    split = copy.deepcopy(model)
    split_attention(split)
    graph = analyze(split, x[:1])
    heads = [g for g in graph.groups if g.kind == "head"]
    predicted = MacModel(split, graph, heads).macs([2, 2])
    assert predicted == pytest.approx(total_macs(layer_table(pruned, x[:1])), rel=1e-6)


def test_a_plan_with_heads_applies_to_a_fresh_model_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(1, 8, 32)
    plan = plan_pruning(model, (x,), "l1", ratio=0.5)
    assert isinstance(model.att, nn.MultiheadAttention)  # planning changed nothing
    assert "att.q_proj" in plan.keep
    pruned = apply_plan(copy.deepcopy(model), plan, (x,))
    assert isinstance(pruned.att, SplitMultiheadAttention) and pruned.att.num_heads == 2
    save_pruned(pruned, plan, tmp_path / "p")
    again = load_pruned(Block().eval(), tmp_path / "p", (x,))
    torch.testing.assert_close(again(x), pruned(x))


def test_pruned_heads_export_to_onnx_and_match_torch() -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Block().eval()
    pruned, _ = prune_(model, (torch.randn(1, 8, 32),), "l1", ratio=0.5)
    buf = io.BytesIO()
    torch.onnx.export(
        pruned, (torch.randn(1, 8, 32),), buf, input_names=["x"],
        dynamic_axes={"x": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for seed in (1, 2):
        x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(seed))
        got = sess.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, pruned(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_pruned_heads_quantize_to_integer_kernels(tmp_path) -> None:
    """After head pruning, W8A8 runs every matmul of the block on integers in ONNX Runtime
    (the split attention's twin quantizes its projections and both attention matmuls)."""
    from edgeslim.export.qdq import export_qdq
    from edgeslim.quant import w8a8
    from edgeslim.quant.attention import QuantSplitAttention
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.kernels import kernel_coverage

    torch.manual_seed(0)
    x = torch.randn(64, 8, 32)
    pruned, _ = prune_(Block().eval(), (x[:1],), "l1", ratio=0.5)
    q = ptq(pruned, w8a8(), [(x[:48],)])
    assert isinstance(q.get_submodule("att"), QuantSplitAttention)
    assert isinstance(q.get_submodule("enc.self_attn"), QuantSplitAttention)
    with torch.no_grad():
        ref, got = pruned(x[48:]), q(x[48:])
    assert float((got - ref).norm() / ref.norm()) < 0.05
    path = export_qdq(q, (x[:1],), tmp_path / "int8.onnx")
    coverage = kernel_coverage(path, (x[:1],))
    assert coverage.int8_mac_share >= 0.95, coverage.summary()


def test_a_decoder_layer_prunes_the_heads_of_both_its_attentions() -> None:
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.fc = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.fc(self.dec(x, memory).mean(1))

    x, memory = torch.randn(1, 6, 32), torch.randn(1, 9, 32)
    pruned, _ = prune_(Decoder().eval(), (x, memory), "l1", ratio=0.5)
    assert pruned.dec.self_attn.num_heads == pruned.dec.multihead_attn.num_heads == 2
    assert pruned.dec.multihead_attn.k_proj.out_features == 16
    assert pruned(x, memory).shape == (1, 5)
