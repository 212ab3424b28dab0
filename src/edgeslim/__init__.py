"""edgeslim: make trained PyTorch models small and fast for edge hardware, and measure it.

Start here: ``edgeslim.compress(model, recipe, task)`` with an ``edgeslim.Task`` carrying
your example inputs, data and (optionally) metric; ``edgeslim.load(out_dir)`` rebuilds the
compressed model a run wrote. The public API is re-exported lazily,
so ``import edgeslim`` stays fast and loads no optional heavy dependency (onnxruntime,
transformers, matplotlib) until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "edgeslim.graph",
    "trace": "edgeslim.graph",
    "layer_table": "edgeslim.graph",
    "cost_report": "edgeslim.cost",
    "compare_latency": "edgeslim.cost",
    "load_zoo_model": "edgeslim.zoo",
    "resolve_model": "edgeslim.zoo",
    "export_onnx": "edgeslim.export",
    "run_suite": "edgeslim.bench",
    "load_recipe": "edgeslim.recipe",
    "compress": "edgeslim.compression",
    "compress_model": "edgeslim.compression",
    "CompressResult": "edgeslim.compression",
    "load": "edgeslim.artifacts",
    "load_artifact": "edgeslim.artifacts",
    "Task": "edgeslim.task",
    "TensorBatches": "edgeslim.data.batching",
    "MappedBatches": "edgeslim.data.batching",
    "load_fashion_mnist": "edgeslim.data",
    "SearchSpace": "edgeslim.search",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgeslim' has no attribute {name!r}")
