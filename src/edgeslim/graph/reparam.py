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

A conv subclass that pads its input by TensorFlow's "SAME" rule before a padding-free conv
(timm's ``Conv2dSame`` in its ``tf_*`` models: the padding depends on the input's size, so
it is not a fixed ``padding``) becomes :class:`SamePad` followed by the plain conv, checked
on random inputs of several sizes. Left as it was, the layer stayed float in W8A8 (4.6% of
tf_efficientnet_lite0's MACs) and could not be pruned or factorized.

A norm subclass whose forward normalises (``F.batch_norm``/``F.group_norm``/
``F.layer_norm`` with its own statistics) and then runs its own children in a chain
(timm's ``BatchNormAct2d``/``GroupNormAct``: norm, dropout, activation in one module, in
nearly every timm CNN) becomes ``nn.Sequential(plain norm, *children)``, checked on a random
input. Left as it was, BatchNorm folding, pruning and the data-free methods saw a bare
``F.batch_norm`` call: pruning stopped at every such norm (timm's EfficientNet: no
prunable group).

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


def _computes(got: Any, want: torch.Tensor) -> bool:
    """Whether a replacement's output ``got`` is the original's ``want`` (float rounding
    aside): the check behind every replacement here."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-8)


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
    if not _computes(plain(probe), want):
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
    if not _computes(got, probe @ weight + (bias if bias is not None else 0)):
        return None
    plain = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    plain.weight.copy_(weight.T)
    if bias is not None:
        plain.get_parameter("bias").copy_(bias)
    return plain.to(device=weight.device, dtype=weight.dtype).train(module.training)


class SamePad(nn.Module):
    """Zero padding of the last ``len(kernel_size)`` dims by TensorFlow's "SAME" rule: the
    output of a stride-``s`` conv has ``ceil(size / s)`` positions, the extra pixel (when
    the total is odd) on the end side. Computed from the input's size at each call."""

    def __init__(
        self, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        dims = len(self.kernel_size)
        for i in reversed(range(dims)):  # F.pad lists the last dim first
            size = int(x.shape[x.dim() - dims + i])
            k, s, d = self.kernel_size[i], self.stride[i], self.dilation[i]
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


@torch.no_grad()
def _same_padded_conv(module: nn.Module, base: type[nn.Module]) -> nn.Sequential | None:
    """``SamePad`` + the plain conv when ``module``'s own forward computes exactly that
    (see the module doc), else None. Checked at sizes of every remainder of the stride."""
    if base is nn.Linear or not isinstance(module, nn.modules.conv._ConvNd):
        return None
    if any(p != 0 for p in module.padding) or module.padding_mode != "zeros":
        return None
    conv = base(
        module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
        module.dilation, module.groups, bias=module.bias is not None,
    )  # fmt: skip
    conv.load_state_dict(module.state_dict())
    weight = module.weight
    conv.to(device=weight.device, dtype=weight.dtype).train(module.training)
    same = nn.Sequential(SamePad(module.kernel_size, module.stride, module.dilation), conv)
    span = max((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True))
    for extra in range(max(module.stride)):
        size = [2 * span + 3 + extra] * len(module.kernel_size)
        probe = torch.randn(2, module.in_channels, *size, dtype=weight.dtype, device=weight.device)
        try:
            want = module(probe)
        except Exception:
            return None
        if not isinstance(want, torch.Tensor) or not _computes(same(probe), want):
            return None
    return same


_NORMS: dict[type[nn.Module], Any] = {
    nn.BatchNorm1d: F.batch_norm, nn.BatchNorm2d: F.batch_norm, nn.BatchNorm3d: F.batch_norm,
    nn.GroupNorm: F.group_norm, nn.LayerNorm: F.layer_norm,
}  # fmt: skip


def _plain_norm(module: nn.Module, base: type[nn.Module]) -> nn.Module:
    """A ``base`` norm with ``module``'s settings and state."""
    if isinstance(module, nn.GroupNorm):
        plain: nn.Module = nn.GroupNorm(
            module.num_groups, module.num_channels, module.eps, module.affine
        )
    elif isinstance(module, nn.LayerNorm):
        plain = nn.LayerNorm(
            module.normalized_shape, module.eps, module.elementwise_affine,
            bias=module.bias is not None,
        )  # fmt: skip
    else:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        plain = base(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
    own = {k: v for k, v in module.state_dict().items() if "." not in k}
    plain.load_state_dict(own)
    return plain


def _norm_probe(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        return torch.randn(2, 3, *module.normalized_shape)
    channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm3d: 3}
    spatial = next((d for b, d in dims.items() if isinstance(module, b)), 2)
    return torch.randn(2, int(channels), *[5] * spatial)  # type: ignore[arg-type]


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule it calls is one step."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@torch.no_grad()
def _norm_then_children(module: nn.Module) -> nn.Sequential | None:
    """``nn.Sequential(plain norm, *children)`` when ``module`` is a norm subclass whose own
    forward normalises with its own state and then runs its children in a chain (see the
    module doc), else None."""
    base = next((b for b in _NORMS if isinstance(module, b)), None)
    if base is None or type(module).forward is base.forward:
        return None
    if type(module).__module__.startswith(("torch.", "edgeslim.")):
        return None
    try:  # each child a leaf: timm's GELU would otherwise be traced into F.gelu
        gm = fx.GraphModule(module, _ChildrenAsLeaves().trace(module))
    except Exception:
        return None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    live = {n for n in gm.graph.nodes if _depends_on(output, n)}  # (checks feed no output)
    steps = [n for n in gm.graph.nodes if n in live and n.op in ("call_function", "call_module")]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or not steps or steps[0].target is not _NORMS[base]:
        return None
    previous, children = steps[0], []
    if previous.args[0] is not inputs[0]:
        return None
    for n in steps[1:]:
        if n.op != "call_module" or n.args != (previous,) or n.kwargs or "." in n.target:
            return None
        children.append(module.get_submodule(n.target))
        previous = n
    if output.args[0] is not previous:
        return None
    try:
        plain = nn.Sequential(_plain_norm(module, base), *children)
    except Exception:
        return None
    weight = next(iter(module.parameters()), None)
    if weight is not None:
        plain.to(device=weight.device, dtype=weight.dtype)
    was = module.training
    module.eval()
    plain.eval()
    probe = _norm_probe(module).to(device=weight.device if weight is not None else None)
    try:
        want, got = module(probe), plain(probe)
    except Exception:
        return None
    finally:
        module.train(was)
        plain.train(was)
    if not isinstance(want, torch.Tensor) or not _computes(got, want):
        return None
    return plain


def has_reparametrizations(model: nn.Module) -> bool:
    return any(
        parametrize.is_parametrized(m)
        or _hooks(m)
        or _computing_forward(m) is not None
        or _transposed_linear(m) is not None
        or _norm_then_children(m) is not None
        for m in model.modules()
    )


def _replacement(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The plain module(s) computing what ``module`` does, with what was done (after the
    FQN), or None."""
    name = type(module).__name__
    base = _computing_forward(module)
    if base is not None:
        if (plain := _plain_layer(module, base)) is not None:
            return plain, f".weight ({name}.forward)"
        if (same := _same_padded_conv(module, base)) is not None:
            return same, f".weight ({name} as SAME pad + conv)"
    if (linear := _transposed_linear(module)) is not None:
        return linear, f".weight ({name} as nn.Linear)"
    if (norm := _norm_then_children(module)) is not None:
        return norm, f" ({name} as norm + children)"
    return None


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
        found = _replacement(module) if fqn else None
        if found is not None:
            plain, what = found
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, plain)
            baked.append(f"{fqn}{what}")
    return baked
