"""Built-in tasks: the zoo's own data sets, each just a :class:`~edgeslim.task.Task`.

- ``fashion_mnist_task``: top-1 on the official test split; calibration on the validation
  split (carved from the training set), training on the train split with crop + flip.
- ``digits_task``: sklearn's bundled 8x8 digits (top-1 on its fixed test part).
- ``minilm_task``: all-MiniLM-L6-v2 sentence embeddings, cosine to the fp32 model's.
- ``photos_task``: natural-photo crops at 224x224 (no labels: agreement with the fp32
  model, counted where it is at least 40% sure), for ImageNet models.
"""

from __future__ import annotations

import torch

from edgeslim.data.batching import TensorBatches, crop_flip
from edgeslim.task.core import Task, normalised_range
from edgeslim.train.loop import evaluate


def labelled_task(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    calib_x: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    augment: bool = False,
    batch_size: int = 128,
    description: str = "",
    input_range: tuple[float, float] | None = None,
) -> Task:
    """An image-classification task from in-memory tensors: top-1 on the test tensors
    (``input_range``: the interval the inputs' format bounds them to, when known)."""
    test = TensorBatches(test_x, test_y, batch_size=500)
    return Task(
        example_inputs=(calib_x[:1].contiguous(),),
        calibration=TensorBatches(calib_x, batch_size=64),
        train=TensorBatches(
            train_x,
            train_y,
            batch_size,
            shuffle=True,
            transform=crop_flip(2) if augment else None,
        ),
        evaluate=lambda m: evaluate(m, test),
        metric="top1",
        metric_rows=len(test_y),
        name=name,
        description=description,
        input_ranges=(input_range,),
    )


def fashion_mnist_task(test_limit: int | None = None, calibration: int = 5000) -> Task:
    """The zoo CNNs' task: Fashion-MNIST 28x28 (train 55k / val 5k / test 10k)."""
    from edgeslim.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    train, val = load_fashion_mnist("train"), load_fashion_mnist("val", limit=calibration)
    test = load_fashion_mnist("test", limit=test_limit)
    n = len(test)
    return labelled_task(
        "fashion-mnist", train.images, train.labels, val.images, test.images, test.labels,
        augment=True, description=f"Fashion-MNIST: top-1 on {n} test images, calibration "
        "on the validation split, training on the train split with crop + flip",
        input_range=normalised_range(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    )  # fmt: skip


def digits_task() -> Task:
    """sklearn's 8x8 digits (1 x 8 x 8 inputs): the tiny real data set of the tests."""
    from edgeslim.data import load_digits_split

    train, test = load_digits_split("train"), load_digits_split("test")
    return labelled_task(
        "digits", train.images, train.labels, train.images, test.images, test.labels,
        batch_size=64, description="sklearn digits: top-1 on its fixed 25% test part",
        input_range=(0.0, 1.0),  # pixel counts 0..16, scaled by 1/16
    )  # fmt: skip


def minilm_task(n_sentences: int = 256, max_length: int = 128, latency_batch: int = 32) -> Task:
    """all-MiniLM-L6-v2: mean cosine of the sentence embeddings to the fp32 model's."""
    from edgeslim.data import load_sentences
    from edgeslim.zoo.minilm import MiniLMEmbedder, tokenize

    def args(tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids = tokens["input_ids"]
        return ids, tokens["attention_mask"], tokens.get("token_type_ids", torch.zeros_like(ids))

    sentences = load_sentences(n_sentences)
    toks = args(tokenize(sentences, max_length=max_length))
    latency = args(tokenize(load_sentences(latency_batch), max_length, pad_to_max=True))
    return Task(
        example_inputs=tuple(t[:2] for t in toks),
        calibration=TensorBatches(toks, batch_size=32),
        name="minilm",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        wrap=lambda m: m if isinstance(m, MiniLMEmbedder) else MiniLMEmbedder(m),
        latency_inputs=latency,
        primary="cosine",
        description=f"MiniLM: mean cosine of {n_sentences} sentence embeddings to fp32's",
    )


def photos_task(
    limit: int | None = None, min_confidence: float = 0.4, held_only: bool = False
) -> Task:
    """Natural-photo crops at 224x224 for ImageNet models: agreement with the fp32 model.

    No labelled ImageNet image exists offline, so the figure is agreement (and top-5
    agreement) with the uncompressed model, counted on crops where it is at least
    ``min_confidence`` sure of its top-1 (``agreement_all`` counts them all).

    Decision: every second crop calibrates and trains (without labels: a training loss on
    this task must be distillation; each epoch sees them shifted by up to 16 pixels and
    flipped); the metric is on **all** crops by default (526, the
    set the data card describes), so calibration sees half of the measured crops, as the
    peers' calibration does in the benchmark. ``held_only`` measures on the other half only,
    for methods that train on the crops (fine-tuning would otherwise be scored on its own
    training inputs).
    """
    from edgeslim.data.photos import IMAGENET_MEAN, IMAGENET_STD, load_photo_crops

    crops = load_photo_crops(limit)
    held = torch.zeros(len(crops.images), dtype=torch.bool)
    held[1::2] = True
    seen = crops.images[~held]
    measured = crops.images[held] if held_only else crops.images
    return Task(
        example_inputs=(crops.images[:1].contiguous(),),
        calibration=TensorBatches(seen, batch_size=32),
        train=TensorBatches(
            seen, None, batch_size=32, shuffle=True, pairs=True, transform=crop_flip(16)
        ),
        validation=TensorBatches(measured, batch_size=50),
        min_confidence=min_confidence,
        name="photos",
        input_ranges=(normalised_range(IMAGENET_MEAN, IMAGENET_STD),),
        description=f"{len(crops.images)} natural-photo crops (224x224; data card "
        f"docs/data/photos.md); agreement on {len(measured)} crops, calibration and training "
        f"on {len(seen)}",
    )
