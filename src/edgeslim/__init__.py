"""edgeslim: make trained PyTorch models small and fast for edge hardware, and measure it."""

__version__ = "0.1.0"

__all__ = ["__version__"]
