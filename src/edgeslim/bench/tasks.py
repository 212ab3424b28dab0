"""What a model is measured on: its example input, its metric and how to evaluate it.

CNNs: top-1 on the Fashion-MNIST test set, latency at batch 1. MiniLM: mean cosine of the
sentence embeddings to the fp32 model's, latency at batch 32 x 128 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from edgeslim.data import Split, load_fashion_mnist
from edgeslim.train.loop import evaluate


@dataclass
class ClassificationTask:
    """Fashion-MNIST classification (top-1 on the test split unless told otherwise)."""

    split: str = "test"
    limit: int | None = None
    metric: str = "top1"
    latency_batch: int = 1
    input_names: list[str] = field(default_factory=lambda: ["input"])

    @cached_property
    def data(self) -> Split:
        return load_fashion_mnist(self.split, limit=self.limit)  # type: ignore[arg-type]

    def example_args(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return (self.data.images[:batch].contiguous(),)

    def export_module(self, model: nn.Module) -> nn.Module:
        return model

    def dynamic_axes(self) -> dict[str, dict[int, str]] | None:
        return None  # batch axis only (export_onnx's default)

    def evaluate_torch(self, model: nn.Module) -> float:
        return evaluate(model, self.data)

    def evaluate_ort(self, session: Any) -> float:
        from edgeslim.runtime.ort import ort_top1

        return ort_top1(session, self.data.images, self.data.labels)

    def latency_feeds(self) -> tuple[torch.Tensor, ...]:
        return self.example_args(self.latency_batch)


@dataclass
class EmbeddingTask:
    """MiniLM sentence embeddings: mean cosine to the fp32 reference embeddings."""

    n_sentences: int = 256
    max_length: int = 128
    metric: str = "cosine"
    latency_batch: int = 32
    input_names: list[str] = field(
        default_factory=lambda: ["input_ids", "attention_mask", "token_type_ids"]
    )
    reference: torch.Tensor | None = None

    @cached_property
    def tokens(self) -> dict[str, torch.Tensor]:
        from edgeslim.data import load_sentences
        from edgeslim.zoo.minilm import tokenize

        return tokenize(load_sentences(self.n_sentences), max_length=self.max_length)

    def _args(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids = tokens["input_ids"]
        return (ids, tokens["attention_mask"], tokens.get("token_type_ids", torch.zeros_like(ids)))

    def example_args(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        return tuple(t[:batch] for t in self._args(self.tokens))

    def export_module(self, model: nn.Module) -> nn.Module:
        from edgeslim.zoo.minilm import MiniLMEmbedder

        return model if isinstance(model, MiniLMEmbedder) else MiniLMEmbedder(model)

    def dynamic_axes(self) -> dict[str, dict[int, str]] | None:
        axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "seq"} for n in self.input_names}
        return {**axes, "output": {0: "batch"}}

    def embeddings_torch(self, model: nn.Module) -> torch.Tensor:
        module = self.export_module(model).eval()
        args = self._args(self.tokens)
        outs = []
        with torch.no_grad():
            for s in range(0, args[0].shape[0], 32):
                outs.append(module(*(a[s : s + 32] for a in args)))
        return torch.cat(outs)

    def _score(self, emb: torch.Tensor) -> float:
        from edgeslim.zoo.minilm import mean_cosine

        if self.reference is None:
            self.reference = emb
        return mean_cosine(emb, self.reference)

    def evaluate_torch(self, model: nn.Module) -> float:
        return self._score(self.embeddings_torch(model))

    def evaluate_ort(self, session: Any) -> float:
        args = self._args(self.tokens)
        names = [i.name for i in session.get_inputs()]
        outs = []
        for s in range(0, args[0].shape[0], 32):
            feeds = {n: a[s : s + 32].numpy() for n, a in zip(names, args, strict=False)}
            outs.append(torch.from_numpy(session.run(None, feeds)[0]))
        return self._score(torch.cat(outs))

    def latency_feeds(self) -> tuple[torch.Tensor, ...]:
        """A batch of 32 sequences padded to exactly ``max_length`` tokens."""
        from edgeslim.data import load_sentences
        from edgeslim.zoo.minilm import tokenize

        toks = tokenize(load_sentences(self.latency_batch), self.max_length, pad_to_max=True)
        return self._args(toks)


Task = ClassificationTask | EmbeddingTask


QUICK_TEST_IMAGES = 2000  # the CNN test images of every suite's quick run


def task_for(model_name: str, quick: bool = False) -> Task:
    """The task a named model is measured on; ``quick``: fewer sentences, or the first
    :data:`QUICK_TEST_IMAGES` test images (mobilenetv3-small took 30 s of the demo's first
    step to evaluate all 10,000 in torch)."""
    if model_name == "minilm":
        return EmbeddingTask(n_sentences=64 if quick else 256)
    return ClassificationTask(limit=QUICK_TEST_IMAGES if quick else None)
