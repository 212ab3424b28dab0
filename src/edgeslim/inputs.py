"""Example inputs for a named model: what ``info``, tracing and export feed it."""

from __future__ import annotations

import torch

from edgeslim.graph.trace import example_input


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``, with a clear error."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"--input-shape must be comma-separated integers like 1,1,28,28; got {text!r}"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"--input-shape must be positive integers; got {text!r}")
    return shape


def example_args_for(
    name: str, input_shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, ...]:
    """One example input batch: MiniLM gets 1 x 128 tokens, CNNs a 1x1x28x28 image."""
    if name == "minilm":
        from edgeslim.bench.tasks import EmbeddingTask

        return tuple(a[:1] for a in EmbeddingTask(n_sentences=1).latency_feeds())
    return (example_input(input_shape or (1, 1, 28, 28)),)
