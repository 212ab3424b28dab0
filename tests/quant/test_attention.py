"""nn.MultiheadAttention's quantized twin: float parity, W8A8 accuracy, integer kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.export.qdq import export_qdq
from edgeslim.quant import w8a8
from edgeslim.quant.attention import QuantMultiheadAttention
from edgeslim.quant.config import QuantConfig
from edgeslim.quant.ptq import ptq
from edgeslim.quant.spec import QuantConfigError
from edgeslim.runtime.kernels import kernel_coverage


@pytest.mark.parametrize("batch_first", [True, False])
def test_float_twin_computes_what_torch_computes(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    twin = QuantMultiheadAttention.from_float(mha, QuantConfig(None, None)).eval()
    shape, kv_shape = ((3, 7, 32), (3, 5, 32)) if batch_first else ((7, 3, 32), (5, 3, 32))
    x, kv = torch.randn(shape), torch.randn(kv_shape)
    mask = torch.rand(7, 7) > 0.7
    mask.fill_diagonal_(False)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        for args, kwargs, twin_kwargs in (
            ((x, x, x), {}, {}),
            ((x, x, x), {"attn_mask": mask}, {"attn_mask": mask}),
            ((x, x, x), {"key_padding_mask": padding}, {"key_padding_mask": padding}),
            ((x, kv, kv), {}, {}),
            ((x, x, x), {"attn_mask": causal, "is_causal": True}, {"is_causal": True}),
        ):
            (a, wa), (b, wb) = mha(*args, **kwargs), twin(*args, **twin_kwargs)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            assert wa is not None and wb is not None
            torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-5)


def test_unsupported_configurations_are_refused_by_name() -> None:
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
    with pytest.raises(QuantConfigError, match="select"):
        QuantMultiheadAttention.from_float(mha, w8a8())


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(dim=1))


def test_encoder_layer_w8a8_is_close_and_runs_on_integer_kernels(tmp_path: Path) -> None:
    """Every matmul of a TransformerEncoderLayer runs as an integer kernel in ONNX Runtime;
    W8A8 logits stay within 5% (relative L2) of fp32 on random inputs."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x = torch.randn(64, 16, 32)
    q = ptq(model, w8a8(), [(x[:48],)])
    assert isinstance(q.get_submodule("encoder.self_attn"), QuantMultiheadAttention)
    with torch.no_grad():
        ref, got = model(x[48:]), q(x[48:])
    assert float((got - ref).norm() / ref.norm()) < 0.05
    path = export_qdq(q, (x[:1],), tmp_path / "int8.onnx")
    coverage = kernel_coverage(path, (x[:1],))
    assert coverage.int8_mac_share >= 0.95, coverage.summary()
