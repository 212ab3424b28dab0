"""Real datasets, all offline: Fashion-MNIST, sklearn digits and a small text corpus."""

from edgeslim.data.batching import MappedBatches, TensorBatches, crop_flip
from edgeslim.data.digits import load_digits_split
from edgeslim.data.fashion_mnist import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Split,
    fashion_mnist_dir,
    load_fashion_mnist,
)
from edgeslim.data.text import load_sentences

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MappedBatches",
    "Split",
    "TensorBatches",
    "crop_flip",
    "fashion_mnist_dir",
    "load_digits_split",
    "load_fashion_mnist",
    "load_sentences",
]
