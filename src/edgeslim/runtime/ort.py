"""ONNX Runtime sessions pinned to a fixed thread count, and batched classification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.runtime.denormal import denormal_mode

DEFAULT_THREADS = 2


def ort_session(path: Path | bytes, threads: int = DEFAULT_THREADS) -> Any:
    """A CPU ``InferenceSession`` with ``threads`` intra-op threads and full optimisation;
    ``path`` may also be a serialized model (bytes).

    Decision: intra-op threads do not spin-wait. Benchmarks interleave two or more sessions
    in one process (compressed and fp32); a spinning pool of the session that just ran
    keeps burning the cores the next one needs, which on 2 cores made the same fp32 file
    measure 3.1 ms or 4.9 ms depending on what ran beside it (mobilenetv2-imagenet).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # as torch does in timing
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    with denormal_mode():  # the option would otherwise leave this thread flushing for good
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_predict(session: Any, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of a single-input classifier session over ``images``."""
    name = session.get_inputs()[0].name
    outs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].numpy().astype(np.float32)
        outs.append(torch.from_numpy(np.asarray(session.run(None, {name: batch})[0])))
    return torch.cat(outs)


def ort_top1(session: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of a classifier session."""
    pred = ort_predict(session, images).argmax(1)
    return 100.0 * float((pred == labels).float().mean())


def ort_fused_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its optimisations).

    Shows whether QDQ pairs became integer kernels (QLinearConv, QLinearAdd, ...).
    """
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    return dict(Counter(n.op_type for n in graph.node))


class OrtModel(torch.nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call a task's metric expects.

    ``model(*inputs)`` feeds the session's inputs in order and returns its outputs as tensors
    (one tensor, or a tuple for several outputs), so the same ``evaluate(model)`` measures
    the torch model and the exported file. ``structure`` (:func:`output_structure` of the
    torch model the file came from) gives them back in the torch model's nesting: a model
    returning ``{"logits": ..., "embedding": ...}`` gives a metric a dict from both (a
    flat tuple made ``out["logits"]`` fail on the file only).
    """

    def __init__(self, session: Any, structure: Any = None) -> None:
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.structure = structure

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"the ONNX model takes {len(self.input_names)} inputs; got {len(inputs)}"
            )
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs, strict=True)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        if self.structure is not None and self.structure.num_leaves == len(outs):
            from torch.utils._pytree import tree_unflatten

            return tree_unflatten(outs, self.structure)
        return outs[0] if len(outs) == 1 else tuple(outs)


@torch.no_grad()
def output_structure(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """The nesting of ``module``'s outputs (a pytree spec: dicts, tuples, lists), whose
    leaves the ONNX export writes as its outputs in the same order."""
    from torch.utils._pytree import tree_flatten

    was = module.training
    module.eval()
    try:
        return tree_flatten(module(*inputs))[1]
    finally:
        module.train(was)
