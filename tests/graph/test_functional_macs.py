"""Products computed by hand in a ``forward`` are in the MACs total, once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeslim.graph.layers import layer_table, total_macs


class HandAttention(nn.Module):
    """timm-style attention: a packed qkv linear, ``q @ k^T`` and ``a @ v`` by hand."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class TiedHead(nn.Module):
    """A classifier tied to an embedding: ``x @ E^T`` in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.block = HandAttention()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(ids)) @ self.embed.weight.T


def _flop_macs(model: nn.Module, *x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*x)
    return int(counter.get_total_flops()) // 2


def test_hand_written_attention_and_tied_head_match_torchs_flop_counter() -> None:
    model = TiedHead().eval()
    ids = torch.randint(0, 50, (2, 7))
    table = layer_table(model, ids)
    assert total_macs(table) == _flop_macs(model, ids)
    # the products land on the module that ran them; the model's own row has its own params
    b, t, d = 2, 7, 32
    assert table["block"].macs == 2 * b * t * t * d and table["block"].params == 0
    assert table[""].macs == b * t * d * 50 and table[""].params == 0
    assert table["block.qkv"].macs == b * t * d * 3 * d  # linears still counted once


def test_sdpa_and_einsum_are_counted_once() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))
            self.lin = nn.Linear(16, 16)

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            y = F.scaled_dot_product_attention(q, q, q)  # (b, h, L, E) @ (b, h, S, E)
            return self.lin(torch.einsum("bhld,ed->bhle", y, self.w))

    q = torch.randn(2, 3, 5, 16)
    table = layer_table(Block().eval(), q)
    rows = 2 * 3 * 5
    assert table[""].macs == rows * 5 * (16 + 16) + rows * 16 * 16
    assert table["lin"].macs == rows * 16 * 16


def test_products_inside_counted_modules_are_not_counted_again() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.GRU(8, 8)
    )
    x = torch.randn(1, 4, 8)
    lin = layer_table(model[0], x)  # the model itself is a linear: its row is ""
    assert set(lin) == {""} and total_macs(lin) == 4 * 8 * 8
    mha = layer_table(model[1], x, x, x)
    assert set(mha) == {""}  # the ops inside the MHA add no row of their own
    assert mha[""].macs == _flop_macs(model[1], x, x, x)
    gru = layer_table(nn.Sequential(model[2]), x)
    assert set(gru) == {"0"} and gru["0"].macs == 4 * 3 * 8 * (8 + 8)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 6),
    k=st.integers(1, 6),
    m=st.integers(1, 6),
    form=st.sampled_from(["matmul", "op", "bmm", "einsum", "rmatmul"]),
)
def test_matmul_forms_count_n_k_m_per_batch(b: int, n: int, k: int, m: int, form: str) -> None:
    class Product(nn.Module):
        def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if form == "matmul":
                return torch.matmul(a, c)
            if form == "op":
                return a @ c
            if form == "bmm":
                return torch.bmm(a, c)
            if form == "einsum":
                return torch.einsum("bnk,bkm->bnm", a, c)
            return c.__rmatmul__(a)

    a, c = torch.randn(b, n, k), torch.randn(b, k, m)
    assert total_macs(layer_table(Product(), a, c)) == b * n * k * m


def test_einsum_with_an_ellipsis_counts_the_summed_letters() -> None:
    class Product(nn.Module):
        def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.einsum("...nk,...km->...nm", a, c)

    a, c = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)
    assert total_macs(layer_table(Product(), a, c)) == 2 * 3 * 4 * 5 * 6
