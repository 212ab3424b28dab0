"""Weight reparametrizations baked into plain weights before compression.

``weight_norm`` (``torch.nn.utils.parametrizations`` or the older hook-based
``torch.nn.utils.weight_norm``) and ``spectral_norm`` compute a layer's weight from other
tensors at every call. Temporal conv nets, vocoders and GAN discriminators use them. A
compressed model needs the weight itself: quantization swaps a plain ``Conv1d`` for its
fake-quant twin (a ``ParametrizedConv1d`` has none, so it stayed float), and pruning cuts
``weight`` (the hook then rebuilt it from the uncut ``weight_v`` and the model no longer
ran). At inference the reparametrized weight is a constant, so fixing it is exact.

The same holds for a conv or linear *subclass* whose ``forward`` computes its weight from
its parameters before the usual call: weight standardisation (BiT, timm's ``StdConv2d``,
NFNet's ``ScaledStdConv2d`` with its gain). Such a layer is traced alone; when its output
is one ``F.conv1d``/``F.conv2d``/``F.linear`` of its input whose other arguments do not
depend on the input, it is replaced by the plain layer holding the computed weight, checked
on a random input against the original. Any other custom forward is left as it is.

A module of its own holding a ``weight`` of shape ``(in, out)`` (and a ``bias``) that
computes ``x @ weight + bias`` is a linear layer stored transposed: Hugging Face's
``Conv1D`` in GPT-2 (``torch.addmm``). Checked on a random input, it becomes the
``nn.Linear`` holding ``weight.T``, which quantization and pruning know (GPT-2 ran 0.4% of
its MACs on integer kernels before).

Decision: :func:`edgeslim.compress`, the search space and :func:`edgeslim.load` bake on
their own copy (the caller's model keeps its parametrizations); training after that
(fine-tuning, QAT) trains the plain weight, as deployed models are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

_CALLS: dict[type[nn.Module], Any] = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Linear: F.linear}


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


def _computing_forward(module: nn.Module) -> type[nn.Module] | None:
    """The plain base (``nn.Conv2d``...) of a subclass with a forward of its own, else None."""
    base = next((b for b in _CALLS if isinstance(module, b)), None)
    if base is None or type(module).forward is base.forward or parametrize.is_parametrized(module):
        return None
    if type(module).__module__.startswith("edgeslim."):
        return None  # edgeslim's own twins (fake-quant layers) are no user reparametrization
    return base


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = out = super().run_node(n)
        return out


@torch.no_grad()
def _plain_layer(module: nn.Module, base: type[nn.Module]) -> nn.Module | None:
    """The plain ``base`` layer computing what ``module``'s own forward does, or None."""
    try:
        gm = fx.symbolic_trace(module)
    except Exception:
        return None
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op == "call_function" and n.target is _CALLS[base]]
    output = nodes[-1]
    if len(inputs) != 1 or len(calls) != 1 or output.args[0] is not calls[0]:
        return None
    call, x = calls[0], inputs[0]
    rest = [*call.args[1:], *call.kwargs.values()]
    if call.args[0] is not x or any(isinstance(a, fx.Node) and _depends_on(a, x) for a in rest):
        return None
    w0 = module.weight
    assert isinstance(w0, torch.Tensor)
    if isinstance(module, nn.Linear):
        probe = torch.randn(2, module.in_features)
    else:
        assert isinstance(module, nn.modules.conv._ConvNd)
        span = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        probe = torch.randn(2, module.in_channels, *[3 * n + 2 for n in span])
    rec = _Recorder(gm)
    want = rec.run(probe)
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, call.args, strict=False)) | dict(call.kwargs)
    value = {k: rec.values[v] if isinstance(v, fx.Node) else v for k, v in args.items()}
    weight, bias = value["weight"], value.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.shape != w0.shape:
        return None
    if base is nn.Linear:
        plain: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        plain = base(
            weight.shape[1] * int(value.get("groups", 1)), weight.shape[0], weight.shape[2:],
            value.get("stride", 1), value.get("padding", 0), value.get("dilation", 1),
            int(value.get("groups", 1)), bias=bias is not None,
        )  # fmt: skip
    plain.get_parameter("weight").copy_(weight)
    if bias is not None:
        plain.get_parameter("bias").copy_(bias)
    plain.to(device=w0.device).train(module.training)
    if not torch.allclose(plain(probe), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        return None
    return plain


@torch.no_grad()
def _transposed_linear(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` a module computing ``x @ weight + bias`` with ``weight`` of shape
    ``(in, out)`` is (see the module doc), or None."""
    if type(module).__module__.startswith(("torch.", "edgeslim.")) or any(module.children()):
        return None
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or weight.dim() != 2 or set(params) - {"weight", "bias"}:
        return None
    if bias is not None and bias.shape != (weight.shape[1],):
        return None
    probe = torch.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    try:
        got = module(probe)
    except Exception:
        return None
    want = probe @ weight + (bias if bias is not None else 0)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return None
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-8):
        return None
    plain = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    plain.weight.copy_(weight.T)
    if bias is not None:
        plain.get_parameter("bias").copy_(bias)
    return plain.to(device=weight.device, dtype=weight.dtype).train(module.training)


def has_reparametrizations(model: nn.Module) -> bool:
    return any(
        parametrize.is_parametrized(m)
        or _hooks(m)
        or _computing_forward(m) is not None
        or _transposed_linear(m) is not None
        for m in model.modules()
    )


@torch.no_grad()
def bake_reparametrizations(model: nn.Module) -> list[str]:
    """Replace every reparametrized tensor of ``model`` (in place) by its current value;
    returns ``"fqn.tensor (kind)"`` for each, empty when there was none."""
    baked: list[str] = []
    for fqn, module in list(model.named_modules()):  # removal deletes submodules
        if parametrize.is_parametrized(module):
            _own_class(module)
            for name in list(module.parametrizations.keys()):
                kinds = [type(p).__name__ for p in module.parametrizations[name]]
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                if name in module._buffers:  # several originals: torch leaves a buffer
                    value = module._buffers.pop(name)
                    assert value is not None
                    module.register_parameter(name, nn.Parameter(value.detach().clone()))
                baked.append(f"{fqn}.{name} ({', '.join(kinds)})")
        for kind, name in _hooks(module):
            if kind == "weight_norm":
                torch.nn.utils.remove_weight_norm(module, name)
            else:
                torch.nn.utils.remove_spectral_norm(module, name)
            baked.append(f"{fqn}.{name} ({kind})")
    for fqn, module in list(model.named_modules()):
        base = _computing_forward(module)
        plain = None if base is None else _plain_layer(module, base)
        how = f"{type(module).__name__}.forward"
        if plain is None and fqn:
            plain, how = _transposed_linear(module), f"{type(module).__name__} as nn.Linear"
        if plain is not None:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, plain)
            baked.append(f"{fqn}.weight ({how})")
    return baked
