"""Shared fixtures: real data is small-subset loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two threads, like CI and the benchmarks; EDGESLIM_TEST_THREADS=1 when another job shares
# the cores (two 2-thread torch processes on 2 cores spin-wait for each other). Under
# pytest-xdist (`make test` runs two workers) each worker takes one thread by default.
_THREADS = "1" if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else "2"
torch.set_num_threads(int(os.environ.get("EDGESLIM_TEST_THREADS", _THREADS)))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, whichever tests ran before it in the
    process: under pytest-xdist that order changes from run to run."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist_test_small():  # type: ignore[no-untyped-def]
    from edgeslim.data import load_fashion_mnist

    return load_fashion_mnist("test", limit=512)


class Int8Export:
    """W8A8 with edge quantizers, the QDQ export, and the check every operator test makes:
    ONNX Runtime computes what the torch simulation does, one sample at a time."""

    @staticmethod
    def quantize(model: torch.nn.Module, data: torch.Tensor) -> torch.fx.GraphModule:
        from edgeslim.quant import calibrate, quantize_, w8a8
        from edgeslim.quant.edges import quantize_edges

        # 7-bit weights: ONNX Runtime then computes what torch does on every x86 CPU (full
        # range saturates 16-bit sums without VNNI; docs/quantization.md)
        quantize_(model.eval(), w8a8(reduce_range=True))
        gm = quantize_edges(model)
        calibrate(gm, [(data,)], progress=False)
        return gm.eval()

    @staticmethod
    def export(gm: torch.nn.Module, data: torch.Tensor, tmp: Path) -> tuple[list[str], list[str]]:
        """The op types written (the file ``tmp/int8.onnx``) and those ONNX Runtime runs after
        its optimisation (``tmp/o.onnx``, kept for tests that read the graph further); asserts
        ORT matches torch on 4 samples within 5% of the largest output."""
        import numpy as np
        import onnx

        from edgeslim.export.qdq import export_qdq
        from edgeslim.runtime.kernels import optimized_graph
        from edgeslim.runtime.ort import ort_session

        path = export_qdq(gm, (data[:1],), tmp / "int8.onnx")
        written = [n.op_type for n in onnx.load(str(path)).graph.node]
        ran = [n.op_type for n in onnx.load(str(optimized_graph(path, tmp / "o.onnx"))).graph.node]
        sess = ort_session(path)
        name = sess.get_inputs()[0].name
        with torch.no_grad():
            want = gm(data[:4]).numpy()
        got = np.concatenate([sess.run(None, {name: data[i : i + 1].numpy()})[0] for i in range(4)])
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-6
        return written, ran


@pytest.fixture
def int8() -> Int8Export:
    return Int8Export()
