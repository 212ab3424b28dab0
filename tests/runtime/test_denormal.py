"""The flush-denormals mode of the calling thread survives sessions and timings."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from edgeslim.cost.latency import measure_latency
from edgeslim.runtime.denormal import denormal_mode, flushes_denormals
from edgeslim.runtime.ort import ort_session


def _onnx_bytes() -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(nn.Linear(4, 3), (torch.randn(1, 4),), buf, dynamo=False)
    return buf.getvalue()


def test_denormal_mode_sets_and_restores() -> None:
    assert not flushes_denormals()
    with denormal_mode(flush=True):
        assert flushes_denormals()
        assert float(torch.tensor(1e-39) * 1.0) == 0.0
    assert not flushes_denormals()
    assert float(torch.tensor(1e-39) * 1.0) > 0.0


def test_ort_session_leaves_the_thread_as_it_found_it() -> None:
    session = ort_session(_onnx_bytes())
    out = session.run(None, {session.get_inputs()[0].name: np.ones((1, 4), np.float32)})
    assert out[0].shape == (1, 3)
    assert not flushes_denormals()
    with denormal_mode(flush=True):
        ort_session(_onnx_bytes())
        assert flushes_denormals()  # a caller who flushes keeps flushing


def test_timing_restores_a_flushing_caller() -> None:
    with denormal_mode(flush=True):
        measure_latency(lambda: None, warmup=1, repeats=2)
        assert flushes_denormals()
    measure_latency(lambda: None, warmup=1, repeats=2)
    assert not flushes_denormals()
