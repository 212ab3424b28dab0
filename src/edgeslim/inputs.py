"""Example inputs for a named model: what ``info``, tracing and export feed it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgeslim.errors import TaskError
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
    name: str, input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None = None
) -> tuple[torch.Tensor, ...]:
    """Example inputs (random values: shapes only) for ``info`` and data-free stages.

    ``input_shape``: one shape, or one per input. Without it, a zoo model's own input
    (MiniLM 1 x 128 tokens, the 28x28 zoo CNNs 1x1x28x28, ``mobilenetv2-imagenet``
    1x3x224x224); any other model needs the shapes.
    """
    if input_shape:
        shapes = [input_shape] if isinstance(input_shape[0], int) else list(input_shape)
        return tuple(example_input(tuple(s)) for s in shapes)  # type: ignore[arg-type]
    if name == "minilm":
        from edgeslim.task.builtin import minilm_task

        task = minilm_task(n_sentences=2, latency_batch=1)
        return tuple(a[:1] for a in task.latency_feeds())
    from edgeslim.task.resolve import zoo_data

    if name == "mobilenetv2-imagenet":
        return (example_input((1, 3, 224, 224)),)
    if zoo_data(name) == "fashion-mnist":
        return (example_input((1, 1, 28, 28)),)
    raise TaskError(
        f"{name} is not a zoo model, so its input shape is unknown: pass --input-shape "
        "(e.g. 1,3,224,224; repeat it for several inputs) or --data"
    )


def refuse_float_ids(model: nn.Module) -> None:
    """``--input-shape`` builds float inputs; a model that looks up integer ids (an
    ``Embedding``) would crash inside torch on them. Say what to pass instead."""
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
            raise TaskError(
                f"the model reads integer ids (`{name}` is an {type(layer).__name__}), and "
                "--input-shape only gives shapes: it makes float inputs. Pass --data with an "
                ".npz whose arrays hold the ids as integers (x, or x0, x1, ... for several "
                "inputs)."
            )
