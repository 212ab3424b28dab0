"""Parameters two modules share (a language model's head tied to its embedding): pruning
leaves them alone, saying why, and quantization keeps them one tensor."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.graph import analyze
from edgeslim.graph.swap import tied_parameters
from edgeslim.quant import quantize_, w8a8
from edgeslim.quant.modules import QuantMixin


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 24)
        self.back = nn.Linear(24, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        return self.lm_head(self.back(torch.relu(self.mix(h))))


def test_groups_reaching_a_tied_weight_are_fixed_with_the_reason() -> None:
    model = TiedLM().eval()
    assert tied_parameters(model) == {"lm_head.weight": "embedding.weight"}
    graph = analyze(model, torch.randint(0, 50, (1, 7)))
    head = next(g for g in graph.groups if "lm_head" in g.consumers)
    assert not head.prunable and "tied to" in head.reason
    inner = next(g for g in graph.groups if "mix" in g.producers)
    assert inner.prunable  # the hidden layer between them stays prunable


def test_quantization_keeps_a_tied_weight_one_tensor() -> None:
    model = TiedLM().eval()
    quantize_(model, w8a8())
    assert isinstance(model.lm_head, QuantMixin)
    assert model.lm_head.weight is model.embedding.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in TiedLM().parameters()
    )
