"""Re-estimating BatchNorm statistics for weights that changed since they were gathered.

Pruning cuts channels and quantization-aware training moves weights; either way the
running mean/variance stored in each BatchNorm describe activations the model no longer
produces. A few forward passes in training mode with a cumulative average (momentum None)
recompute them exactly for the current weights, with no gradient and no label: EagleEye's
"adaptive BN" for scoring pruned candidates, and the usual last step of low-bit QAT.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import input_batches


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], max_batches: int) -> int:
    """Recompute every BatchNorm's running mean/var as a plain average over at most
    ``max_batches`` of ``batches`` (input batches or ``(inputs, target)`` pairs, see
    :func:`~edgeslim.data.batching.input_batches`). The model's train/eval mode and the
    BatchNorms' momenta are restored. Returns the batches used (0: no BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    n = 0
    try:
        for inputs in input_batches(batches):
            if n >= max_batches:
                break
            model(*(x.contiguous() for x in inputs))
            n += 1
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        model.train(was_training)
    return n
