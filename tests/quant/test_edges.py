from __future__ import annotations

import operator

import torch

from edgeslim.data import load_fashion_mnist
from edgeslim.quant import calibrate, fold_batchnorm, quantize_, w8a8
from edgeslim.quant.edges import quantize_edges
from edgeslim.quant.modules import ActQuant, QuantMixin
from edgeslim.train.loop import evaluate
from edgeslim.zoo.resnet import resnet20


def test_one_quantizer_per_edge_and_every_add_operand_quantized() -> None:
    model = resnet20().eval()
    fold_batchnorm(model)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    assert all(m.input_quant is None for m in gm.modules() if isinstance(m, QuantMixin))
    nodes = list(gm.graph.nodes)
    quantized = {
        n
        for n in nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActQuant)
    }
    for n in nodes:
        if n.op == "call_function" and n.target in (operator.add, torch.add):
            assert all(a in quantized for a in n.all_input_nodes)
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), QuantMixin):
            assert n.all_input_nodes[0] in quantized
    # an edge read by a conv and an add has exactly one quantizer
    sources = [q.all_input_nodes[0] for q in quantized]
    assert len(sources) == len(set(sources))


def test_edge_ptq_keeps_accuracy_on_real_data() -> None:
    from edgeslim.zoo import load_zoo_model

    model = load_zoo_model("resnet20")
    test = load_fashion_mnist("test", limit=2000)
    fp32 = evaluate(model, test)
    fold_batchnorm(model)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    val = load_fashion_mnist("val", limit=256)
    calibrate(gm, [val.images[i : i + 64] for i in range(0, 256, 64)], progress=False)
    assert abs(evaluate(gm, test) - fp32) <= 0.5


def _act_quant_inputs(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes whose output passes through an ActQuant."""
    return {
        n.all_input_nodes[0]
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActQuant)
    }


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def test_conv_outputs_are_quantized_before_ops_without_integer_kernels() -> None:
    """A conv read by PReLU or hardswish gets a quantizer on its own output (ORT then fuses
    DQ -> Conv -> Q); a conv read by a ReLU alone is quantized after the ReLU, one read by a
    hardsigmoid alone by the gate's fixed grid (its ``+ 3`` folded into the bias)."""
    from edgeslim.quant.integer_gates import IntegerHardsigmoid, IntegerHardswish
    from edgeslim.zoo.edge import mobilenetv3_small, prelu_cnn

    for factory, act in ((prelu_cnn, torch.nn.PReLU), (mobilenetv3_small, IntegerHardswish)):
        model = factory().eval()
        fold_batchnorm(model)
        quantize_(model, w8a8())
        gm = quantize_edges(model)
        quantized = _act_quant_inputs(gm)
        convs = [
            n
            for n in gm.graph.nodes
            if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), torch.nn.Conv2d)
        ]
        assert convs
        for n in convs:
            while isinstance(_module(gm, next(iter(n.users))), torch.nn.Identity):
                n = next(iter(n.users))  # a folded BatchNorm
            (user,) = n.users
            reader = _module(gm, user)
            if isinstance(reader, torch.nn.ReLU):
                assert user in quantized, n.target
            else:
                gate = isinstance(reader, IntegerHardsigmoid) and reader.shift == 0
                assert n in quantized or isinstance(reader, ActQuant) or gate, n.target
        assert any(isinstance(m, act) for m in gm.modules())


def test_gate_products_have_both_operands_quantized() -> None:
    """Squeeze-excite ``x * gate``: both operands quantized (the gate by its integer
    hardsigmoid), so ORT runs QLinearMul."""
    from edgeslim.zoo.edge import mobilenetv3_small

    model = mobilenetv3_small().eval()
    fold_batchnorm(model)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    quantized = _act_quant_inputs(gm)
    products = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul]
    assert len(products) == 9  # one per SE block
    from edgeslim.quant.integer_gates import IntegerHardsigmoid

    for n in products:
        assert all(a.op == "call_module" for a in n.all_input_nodes)
        for a in n.all_input_nodes:  # an edge quantizer, or a gate on its fixed 8-bit grid
            gate = type(_module(gm, a)) is IntegerHardsigmoid
            assert a.all_input_nodes[0] in quantized or gate


def test_folded_batchnorm_does_not_quantize_a_conv_output_twice() -> None:
    """``Conv -> BN(folded: Identity) -> ReLU6``: one quantizer, after the ReLU6. A second
    one before the Identity rounded every MobileNetV2 activation twice (first on the wider
    pre-ReLU range) and left a float requantize between the integer kernels."""
    from edgeslim.zoo import load_zoo_model

    model = load_zoo_model("mobilenetv2-small", pretrained=False).eval()
    fold_batchnorm(model)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    passes = (torch.nn.Identity, torch.nn.Dropout, torch.nn.ReLU, torch.nn.ReLU6)
    checked = 0
    for q in gm.graph.nodes:
        if not isinstance(_module(gm, q), ActQuant):
            continue
        node = q.all_input_nodes[0]
        while isinstance(_module(gm, node), passes):
            node = node.all_input_nodes[0]
            twice = isinstance(_module(gm, node), ActQuant) and node.target != q.target
            assert not twice, f"{q.target} after {node.target}"  # one shared quantizer is exact
            checked += 1
    assert checked > 10  # the model does have Conv -> Identity -> ReLU6 chains


class ShapePooled(torch.nn.Module):
    """A global pool written with its input's own shape, as keyword-spotting and SE code
    does: ``F.avg_pool2d(y, y.shape[2:])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(torch.nn.functional.avg_pool2d(y, y.shape[2:]).flatten(1))


def test_a_size_read_from_a_shape_gets_no_quantizer() -> None:
    torch.manual_seed(0)
    model = ShapePooled().eval()
    x = torch.randn(16, 1, 10, 6)
    quantize_(model, w8a8())
    gm = quantize_edges(model)  # put a quantizer on the torch.Size before (AttributeError)
    calibrate(gm, [x])
    with torch.no_grad():
        out = gm(x)
    assert out.shape == (16, 4) and torch.isfinite(out).all()
    pools = [n for n in gm.graph.nodes if n.target is torch.nn.functional.avg_pool2d]
    assert pools and all(
        not isinstance(_module(gm, a), ActQuant) for p in pools for a in p.args[1:]
        if isinstance(a, torch.fx.Node)
    )  # fmt: skip


class NdimIndexed(torch.nn.Module):
    """Python arithmetic on ``x.ndim``, as Funnel Transformer's pooling computes its axis
    (``axis %= x.ndim``, then ``[slice(None)] * axis``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(h * (1 % h.ndim) + h * (h.ndim - 2))


def test_python_arithmetic_on_ndim_gets_no_quantizer() -> None:
    """Before, the quantizer on ``1 % h.ndim`` received an int at calibration
    (``AttributeError: 'int' object has no attribute 'is_floating_point'``)."""
    torch.manual_seed(0)
    model = NdimIndexed().eval()
    x = torch.randn(16, 5, 8)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    calibrate(gm, [x])
    with torch.no_grad():
        out = gm(x)
    assert out.shape == (16, 5, 3) and torch.isfinite(out).all()
    ndim = [n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "ndim"]
    sizes = {u for n in ndim for u in n.users}  # 1 % ndim, ndim - 2
    readers = sizes | {v for u in sizes for v in u.users}
    assert ndim and not any(isinstance(_module(gm, u), ActQuant) for u in readers)


class RelativeBuckets(torch.nn.Module):
    """WavLM/T5-style relative-position buckets, computed in float from ``arange`` (with
    ``log(0) = -inf`` on the diagonal, masked by ``where``) and cast back to indices."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.bias = torch.nn.Embedding(6, 1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1])
        rel = (pos[None, :] - pos[:, None]).abs().float()
        far = 2 + torch.log(rel / 2) / 1.3862943611198906 * 3
        bucket = torch.where(rel < 2, rel, far).clamp(max=5).long()
        h = self.fc(x)
        scores = h @ h.transpose(1, 2) + self.bias(bucket).squeeze(-1)
        return self.head(scores.softmax(-1) @ h)


def test_index_arithmetic_built_from_shapes_gets_no_quantizer() -> None:
    """Before, the bucket arithmetic got a quantizer: its range took ``-inf`` (a NaN scale,
    then NaN outputs and a failed export), and a quantized bucket can land in the next one
    when cast back to an index."""
    torch.manual_seed(0)
    model = RelativeBuckets().eval()
    x = torch.randn(16, 7, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    calibrate(gm, [x])
    with torch.no_grad():
        out = gm(x)
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.99
    built = [n for n in gm.graph.nodes if n.target is torch.arange]
    later, todo = set(), list(built)
    while todo:  # everything computed from the arange up to the embedding lookup
        n = todo.pop()
        for u in n.users:
            if u not in later and not (u.op == "call_module" and u.target == "bias"):
                later.add(u)
                todo.append(u)
    assert built and not any(
        isinstance(_module(gm, a), ActQuant) for n in later for a in n.all_input_nodes
        if a in later or a in built
    )  # fmt: skip


def test_1d_pools_share_their_input_quantizer_and_run_on_uint8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An audio CNN's max and average pools over time: no float op between the integer
    kernels (each pool once left a DequantizeLinear -> MaxPool -> QuantizeLinear island)."""
    import copy

    from torch import nn

    from edgeslim.export.verify import export_module
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.ort import ort_fused_ops

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 9, 2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(4),
        nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool1d(2),
        nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()  # fmt: skip
    x = torch.randn(32, 1, 400, generator=torch.Generator().manual_seed(1))
    gm = ptq(model, w8a8("tensor"), x)
    ops = ort_fused_ops(export_module(copy.deepcopy(gm), (x[:1],), tmp_path / "m.onnx", {}))
    assert ops.get("QLinearConv") == 3 and "DequantizeLinear" not in ops, ops


def test_a_conv_read_by_a_concat_and_a_float_op_still_runs_on_integers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pre-activation DenseNet: the stem's output is read by the concat (quantized) and
    by the next layer's BatchNorm (float, it cannot fold into the stem). With the
    BatchNorm on the float tensor beside the quantizer, ONNX Runtime ran the stem in float
    (11% of the MACs); every reader now reads the quantized tensor."""
    import copy

    from torch import nn

    from edgeslim.export.verify import export_module
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.ort import ort_fused_ops

    class PreActDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.layer = nn.Sequential(
                nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
            )
            self.norm = nn.BatchNorm2d(24)
            self.fc = nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = torch.cat([x, self.layer(x)], 1)
            return self.fc(torch.relu(self.norm(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = PreActDense().eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm = ptq(model, w8a8(), x)
    ops = ort_fused_ops(export_module(copy.deepcopy(gm), (x[:1],), tmp_path / "m.onnx", {}))
    assert ops.get("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops, ops


def test_a_layer_called_several_times_is_quantized_at_every_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Weights tied across depth (one block applied three times): the first call took the
    layer's input quantizer and the later calls were left without one, so ONNX Runtime ran
    two of the three in float (37% of the MACs on integers)."""
    import copy

    from torch import nn

    from edgeslim.export.verify import export_module
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.ort import ort_fused_ops

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for _ in range(3):
                x = x + self.block(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = ptq(model, w8a8(), x)
    quants = [m for m in gm.modules() if isinstance(m, ActQuant)]
    assert all(bool(q.quantizer.calibrated) for q in quants)
    ops = ort_fused_ops(export_module(copy.deepcopy(gm), (x[:1],), tmp_path / "m.onnx", {}))
    assert ops.get("QLinearConv") == 4 and "Conv" not in ops and "FusedConv" not in ops, ops
    with torch.no_grad():
        err = (gm(x) - model(x)).abs().max() / model(x).abs().max()
    assert err < 0.05, err


def test_a_linear_read_by_an_add_and_a_layernorm_runs_on_integers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Swin's patch merging: a linear's output is the residual (a quantized add) and the
    input of the next LayerNorm (float). With the LayerNorm on the float tensor beside the
    quantizer, ONNX Runtime ran that linear in float; every reader now reads the quantized
    tensor. Python arithmetic on sizes (``(n + 1) // 2``) gets no quantizer either."""
    import copy

    from torch import nn

    from edgeslim.export.verify import export_module
    from edgeslim.quant.ptq import ptq
    from edgeslim.runtime.kernels import kernel_coverage

    class Merge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduction = nn.Linear(16, 8, bias=False)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]
            h = self.reduction(x[:, : (n + 1) // 2 * 2])
            h = h + self.fc(self.norm(h))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model = Merge().eval()
    x = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(1))
    gm = ptq(model, w8a8(), x)
    path = export_module(copy.deepcopy(gm), (x[:1],), tmp_path / "m.onnx", {})
    coverage = kernel_coverage(path, (x[:1],))
    assert coverage.int8_mac_share == 1.0, coverage.summary()


def test_integer_tensors_pass_the_edge_quantizers_unchanged() -> None:
    """RoBERTa's position ids: an int mask times its cumsum is a product of two tensors,
    so the edge pass put a quantizer there and calibration raised (fake-quant of 'Int')."""
    from torch import nn

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(20, 8), nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = ids.ne(1).int()
            positions = torch.cumsum(mask, dim=1) * mask + 1
            return self.fc(self.tok(ids) + self.pos(positions)).mean(1)

    torch.manual_seed(0)
    model = Positions().eval()
    ids = torch.randint(0, 20, (16, 6), generator=torch.Generator().manual_seed(1))
    quantize_(model, w8a8())
    gm = quantize_edges(model)
    calibrate(gm, [ids])
    seen: list[torch.Tensor] = []
    gm.get_submodule("pos").register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    with torch.no_grad():
        out = gm(ids)
    mask = ids.ne(1).int()
    assert torch.equal(seen[0], torch.cumsum(mask, dim=1) * mask + 1)  # were rounded
    assert out.shape == (16, 3) and torch.isfinite(out).all()
