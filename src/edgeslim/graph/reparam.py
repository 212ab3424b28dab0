"""Weight reparametrizations baked into plain weights before compression.

``weight_norm`` (``torch.nn.utils.parametrizations`` or the older hook-based
``torch.nn.utils.weight_norm``) and ``spectral_norm`` compute a layer's weight from other
tensors at every call. Temporal conv nets, vocoders and GAN discriminators use them. A
compressed model needs the weight itself: quantization swaps a plain ``Conv1d`` for its
fake-quant twin (a ``ParametrizedConv1d`` has none, so it stayed float), and pruning cuts
``weight`` (the hook then rebuilt it from the uncut ``weight_v`` and the model no longer
ran). At inference the reparametrized weight is a constant, so fixing it is exact.

Decision: :func:`edgeslim.compress`, the search space and :func:`edgeslim.load` bake on
their own copy (the caller's model keeps its parametrizations); training after that
(fine-tuning, QAT) trains the plain weight, as deployed models are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def _hooks(module: nn.Module) -> list[tuple[str, str]]:
    """``(kind, tensor name)`` of the hook-based reparametrizations on ``module``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: list[tuple[str, str]] = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            found.append(("weight_norm", hook.name))
        elif isinstance(hook, SpectralNorm):
            found.append(("spectral_norm", hook.name))
    return found


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its parametrized class. Why: ``copy.deepcopy`` of
    a parametrized module shares the generated class with the original, and removing a
    parametrization deletes its property from that class, which broke the caller's model
    (``'ParametrizedConv1d' object has no attribute 'weight'``)."""
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def has_reparametrizations(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) or _hooks(m) for m in model.modules())


@torch.no_grad()
def bake_reparametrizations(model: nn.Module) -> list[str]:
    """Replace every reparametrized tensor of ``model`` (in place) by its current value;
    returns ``"fqn.tensor (kind)"`` for each, empty when there was none."""
    baked: list[str] = []
    for fqn, module in model.named_modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
            for name in list(module.parametrizations.keys()):
                kinds = [type(p).__name__ for p in module.parametrizations[name]]
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                baked.append(f"{fqn}.{name} ({', '.join(kinds)})")
        for kind, name in _hooks(module):
            if kind == "weight_norm":
                torch.nn.utils.remove_weight_norm(module, name)
            else:
                torch.nn.utils.remove_spectral_norm(module, name)
            baked.append(f"{fqn}.{name} ({kind})")
    return baked
