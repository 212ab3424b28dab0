"""Conformance models: the shapes real users bring, tiny, random-init with a fixed seed.

Each factory is importable as ``models:<factory>`` once this folder is on ``sys.path`` (the
test files' own folder is, under pytest's default import mode), which is how the command line
loads a user's ``module:factory``. :data:`SPECS` says, per model, what its inputs look like
(shapes at batch 1, each input's batch dimension) and what each output is (``logits`` or a
``float`` vector), and :func:`write_npz` writes an ``.npz`` in the layout ``--data`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0
NUM_SAMPLES = 64
MASKED_SEQ = 12


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so folding them changes weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Cnn32(nn.Module):
    """3 x 32 x 32 images -> 10 logits: conv-bn-relu x3, global average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 8), _conv_bn_relu(8, 16, stride=2), _conv_bn_relu(16, 16, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TwoInput(nn.Module):
    """An image (3 x 16 x 16) and a 12-feature vector, concatenated, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.vector = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(8 + 16, 10)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        a = torch.flatten(self.image(image), 1)
        return self.head(torch.cat([a, self.vector(features)], dim=1))


class TwoHeads(nn.Module):
    """A shared trunk over 20 features; a 5-class classification head and a 3-value regression
    head: returns ``(logits, values)``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.classify = nn.Linear(32, 5)
        self.regress = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.classify(h), self.regress(h)


class ConvGru(nn.Module):
    """Conv1d over ``(batch, 8, time=32)``, then a GRU from the state ``h0`` shaped
    ``(1, batch, 16)``: returns ``(logits, h_n)``, ``h_n`` with its batch on dimension 1."""

    hidden = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.rnn = nn.GRU(16, self.hidden, batch_first=True)
        self.fc = nn.Linear(self.hidden, 6)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.relu(self.conv(x)).transpose(1, 2)  # (batch, time, channels)
        out, h_n = self.rnn(seq, h0)
        return self.fc(out[:, -1]), h_n


class ConvLstm(nn.Module):
    """As :class:`ConvGru` with an LSTM: inputs ``(x, h0, c0)``, returns ``(logits, h_n, c_n)``."""

    hidden = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, self.hidden, batch_first=True)
        self.fc = nn.Linear(self.hidden, 6)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq = torch.relu(self.conv(x)).transpose(1, 2)
        out, (h_n, c_n) = self.rnn(seq, (h0, c0))
        return self.fc(out[:, -1]), h_n, c_n


class ConvLstmCell(nn.Module):
    """A streaming audio step, as keyword spotters are written: a Conv1d with BatchNorm over
    ``(batch, 8, time=32)`` frames, mean over time, one ``nn.LSTMCell`` step from the state
    ``(h, c)`` (each ``(batch, 24)``), 6 logits: returns ``(logits, h, c)``."""

    hidden = 24

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.cell = nn.LSTMCell(32, self.hidden)
        self.fc = nn.Linear(self.hidden, 6)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.bn(self.conv(x))).mean(dim=2)
        h, c = self.cell(feats, (h, c))
        return self.fc(h), h, c


class TinyEncoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` over ``(batch, seq=16, d=32)`` floats (no
    embedding), mean-pooled over the sequence, then 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(dim=1))


class TinyAttention(nn.Module):
    """The same block written by hand, as many users do: multi-head self-attention and a
    feed-forward net, each with a residual and a LayerNorm; mean-pool, 10 logits."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            t.unflatten(-1, (self.heads, self.dh)).transpose(1, 2)  # (batch, heads, seq, dh)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        att = torch.softmax(q @ k.transpose(-2, -1) * self.dh**-0.5, dim=-1)
        h = self.norm1(x + self.proj((att @ v).transpose(1, 2).flatten(2)))
        h = self.norm2(h + self.ffn(h))
        return self.fc(h.mean(dim=1))


class MaskedTokenEncoder(nn.Module):
    """Token ids and a padding mask (``True`` = padding) through ``nn.Embedding`` and a
    two-layer ``nn.TransformerEncoder`` (its nested-tensor fast path on, torch's default),
    mean-pooled over the unpadded tokens, then 5 logits: an integer and a boolean input."""

    def __init__(self, vocab: int = 200, d: int = 32, seq: int = MASKED_SEQ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.1)
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.fc = nn.Linear(d, 5)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))


def masked_token_inputs(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of token ids and their padding masks (lengths 4 to the full sequence)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (n, MASKED_SEQ), generator=gen)
    lengths = torch.randint(4, MASKED_SEQ + 1, (n, 1), generator=gen)
    return ids, torch.arange(MASKED_SEQ).unsqueeze(0) >= lengths


class HardswishSe(nn.Module):
    """A MobileNetV3-style net on 3 x 32 x 32 images: conv-BN-hardswish stem, an inverted
    residual block (1x1 expand, depthwise 3x3, squeeze-excite gated by ``F.hardsigmoid``,
    1x1 project, residual add), a hardswish head, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
            nn.Hardswish(),
        )  # fmt: skip
        self.expand = nn.Sequential(
            nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
            nn.Hardswish(),
        )  # fmt: skip
        self.squeeze = nn.Conv2d(48, 12, 1)
        self.excite = nn.Conv2d(12, 48, 1)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.depthwise(self.expand(x))
        gate = nn.functional.hardsigmoid(
            self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True))))
        )
        x = x + self.project(h * gate)
        return self.head(x.mean((2, 3)))


class PreluCnn(nn.Module):
    """3 x 32 x 32 images through convs with per-channel PReLU and no BatchNorm (a face
    detector's backbone), global average pool, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.PReLU(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU(32),
            nn.Conv2d(32, 32, 3, padding=1), nn.PReLU(32),
        )  # fmt: skip
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class UNetSkip(nn.Module):
    """3 x 32 x 32 -> 4 x 32 x 32 per-pixel logits: an encoder-decoder whose skip tensor is
    read twice (concatenated into the decoder, and max-pooled into the next encoder conv)
    and whose decoder upsamples with a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(_conv_bn_relu(3, 16), _conv_bn_relu(16, 16))
        self.mid = _conv_bn_relu(16, 32)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = nn.Sequential(_conv_bn_relu(32, 16), _conv_bn_relu(16, 16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        low = self.mid(nn.functional.max_pool2d(skip, 2))
        return self.head(self.dec(torch.cat([self.up(low), skip], 1)))


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    model = cls()
    _randomize_bn(model, torch.Generator().manual_seed(SEED + 1))
    return model.eval()


def cnn32() -> nn.Module:
    return _seeded(Cnn32)


def two_input() -> nn.Module:
    return _seeded(TwoInput)


def two_heads() -> nn.Module:
    return _seeded(TwoHeads)


def conv_gru() -> nn.Module:
    return _seeded(ConvGru)


def conv_lstm() -> nn.Module:
    return _seeded(ConvLstm)


def conv_lstm_cell() -> nn.Module:
    return _seeded(ConvLstmCell)


def hardswish_se() -> nn.Module:
    return _seeded(HardswishSe)


def prelu_cnn() -> nn.Module:
    return _seeded(PreluCnn)


def tiny_encoder() -> nn.Module:
    return _seeded(TinyEncoder)


def tiny_attention() -> nn.Module:
    return _seeded(TinyAttention)


def unet_skip() -> nn.Module:
    return _seeded(UNetSkip)


def masked_token_encoder() -> nn.Module:
    return _seeded(MaskedTokenEncoder)


@dataclass(frozen=True)
class Spec:
    """One conformance model: its factory, inputs and outputs.

    - ``shapes``: each input's shape at batch 1 (the batch dimension holds 1);
    - ``batch_dims``: each input's batch dimension;
    - ``outputs``: per output, ``logits`` (compared by argmax) or ``float`` (by cosine);
    - ``labelled``: the ``.npz`` carries ``y`` = the fp32 model's argmax (metric top-1),
      else none (metric: agreement with the fp32 model).
    """

    name: str
    factory: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    batch_dims: tuple[int, ...]
    outputs: tuple[str, ...]
    labelled: bool

    @property
    def spec(self) -> str:
        """The command line's ``module:factory`` for this model."""
        return f"models:{self.factory.__name__}"


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("cnn32", cnn32, ((1, 3, 32, 32),), (0,), ("logits",), labelled=True),
        Spec("two_input", two_input, ((1, 3, 16, 16), (1, 12)), (0, 0), ("logits",), False),
        Spec("two_heads", two_heads, ((1, 20),), (0,), ("logits", "float"), labelled=False),
        Spec("conv_gru", conv_gru, ((1, 8, 32), (1, 1, 16)), (0, 1), ("logits", "float"), False),
        Spec(
            "conv_lstm",
            conv_lstm,
            ((1, 8, 32), (1, 1, 16), (1, 1, 16)),
            (0, 1, 1),
            ("logits", "float", "float"),
            labelled=False,
        ),
        Spec(
            "conv_lstm_cell",
            conv_lstm_cell,
            ((1, 8, 32), (1, 24), (1, 24)),
            (0, 0, 0),
            ("logits", "float", "float"),
            labelled=False,
        ),
        Spec("hardswish_se", hardswish_se, ((1, 3, 32, 32),), (0,), ("logits",), labelled=True),
        Spec("prelu_cnn", prelu_cnn, ((1, 3, 32, 32),), (0,), ("logits",), labelled=False),
        Spec("tiny_encoder", tiny_encoder, ((1, 16, 32),), (0,), ("logits",), labelled=True),
        Spec("tiny_attention", tiny_attention, ((1, 16, 32),), (0,), ("logits",), False),
        Spec("unet_skip", unet_skip, ((1, 3, 32, 32),), (0,), ("float",), labelled=False),
    )
}


def sample_inputs(spec: Spec, n: int, seed: int = SEED) -> tuple[torch.Tensor, ...]:
    """``n`` standard-normal samples of every input, along each input's batch dimension."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, d in zip(spec.shapes, spec.batch_dims, strict=True):
        full = list(shape)
        full[d] = n
        out.append(torch.randn(full, generator=gen))
    return tuple(out)


def write_npz(spec: Spec, path: Path, n: int = NUM_SAMPLES, seed: int = SEED) -> Path:
    """An ``.npz`` for ``spec``'s model: ``x`` (one input) or ``x0, x1, ...``, ``batch_dims``
    when an input's batch is not first, and ``y`` (the fp32 model's argmax) when labelled."""
    inputs = sample_inputs(spec, n, seed)
    arrays: dict[str, np.ndarray] = {}
    if len(inputs) == 1:
        arrays["x"] = inputs[0].numpy()
    else:
        arrays.update({f"x{i}": t.numpy() for i, t in enumerate(inputs)})
    if any(spec.batch_dims):
        arrays["batch_dims"] = np.asarray(spec.batch_dims, dtype=np.int64)
    if spec.labelled:
        with torch.no_grad():
            out = spec.factory()(*inputs)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        arrays["y"] = logits.argmax(-1).numpy().astype(np.int64)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path
