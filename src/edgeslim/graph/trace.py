"""Trace a model once with torch.fx, naming the op and module path where tracing fails."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.errors import TraceError


class _PathTracer(fx.Tracer):
    """An fx tracer that remembers which module it is inside, for error messages.

    Buffers read in ``forward`` are traced as graph attributes (``proxy_buffer_attributes``),
    as parameters are: ``self.position_ids[:, :x.shape[1]]`` (Hugging Face style position
    ids) sliced a real tensor by a traced length and failed."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_at: str | None = None
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def iter(self, obj: fx.Proxy) -> Any:
        """Iterate a proxy whose length the graph says: ``chunk(n)`` and ``split`` with a
        list of sizes, as in ``for t in qkv.chunk(3, dim=-1)`` (fx only unpacks
        ``a, b, c = ...`` itself)."""
        n = _known_length(obj.node)
        if n is None:
            return super().iter(obj)
        return (obj[i] for i in range(n))  # type: ignore[index]

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module, recorded as we unwind
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _known_length(node: fx.Node) -> int | None:
    """The number of tensors a ``chunk``/``split`` node returns, when its arguments fix it."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    if name == "chunk" and isinstance(arg, int):
        return arg
    if name == "split" and isinstance(arg, (list, tuple)):
        return len(arg)
    return None


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: ``file:line: code``."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/edgeslim/graph/" not in path:
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return "unknown location"


INPUTS_ATTR = "_edgeslim_inputs"


def declare_inputs(model: nn.Module, count: int) -> None:
    """Record that ``model`` is called with ``count`` positional inputs (a
    :class:`~edgeslim.task.Task` does, from its example inputs), so every later
    :func:`trace` of it, or of a copy, keeps exactly those arguments as graph inputs."""
    object.__setattr__(model, INPUTS_ATTR, int(count))


def bound_defaults(model: nn.Module, inputs: int | None = None) -> dict[str, Any]:
    """The ``forward`` arguments :func:`trace` fixes at their default values.

    Why: ``forward(x, mask=None, scale=1.0)`` is common, and fx would otherwise trace
    ``mask`` as a tensor (taking the ``if mask is not None`` branch) and ``scale`` as an input,
    so the graph would not be the model the user runs. Every argument with a default is
    fixed, except the first ``inputs`` positional ones (default: the count
    :func:`declare_inputs` recorded), which stay inputs: a user who passes the mask keeps
    it. fx guards each fixed value, so calling the traced graph with another one raises.
    """
    count = inputs if inputs is not None else getattr(model, INPUTS_ATTR, None)
    bound: dict[str, Any] = {}
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # self
    for i, p in enumerate(params):
        if p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if count is not None and positional and i < count:
            continue
        bound[p.name] = p.default
    return bound


@contextmanager
def inputs_only(model: nn.Module, inputs: int) -> Iterator[nn.Module]:
    """``model`` whose ``forward`` takes just its ``inputs`` positional arguments, for as long
    as the context lasts (the arguments :func:`bound_defaults` fixes keep their defaults).

    Why: torch's ONNX exporter fills every missing ``forward`` argument from its default
    and turns a ``scale: float = 1.0`` into a model input. The instance's class is swapped
    for a subclass with a ``*args`` forward, so module names (and so ONNX node names) stay.
    """
    if not bound_defaults(model, inputs):
        yield model
        return
    cls = type(model)

    def forward(self: nn.Module, *args: Any) -> Any:
        return cls.forward(self, *args)

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward})
    try:
        yield model
    finally:
        model.__class__ = cls


def trace(
    model: nn.Module, leaf_types: tuple[type, ...] = (), inputs: int | None = None
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the op and module path.

    ``leaf_types`` are module types kept whole (not traced into), e.g. custom ops.
    ``forward`` arguments with defaults beyond the model's ``inputs`` are fixed at their
    defaults (:func:`bound_defaults`).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            f"cannot trace {type(model).__name__}: a TorchScript module (torch.jit.script, "
            "trace or load) has no Python forward() for torch.fx to read. Pass the original "
            "nn.Module (its class with the state_dict loaded), or, on the command line, a "
            "module:function that builds it."
        )
    tracer = _PathTracer(leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=bound_defaults(model, inputs) or None)
    except Exception as exc:
        where = tracer.failed_at or "(top-level forward)"
        mod = model if where.startswith("(") else model.get_submodule(where)
        raise TraceError(
            f"cannot trace {type(model).__name__}: in module `{where}` "
            f"({type(mod).__name__}) at {_user_frame(exc)}: {type(exc).__name__}: {exc}. "
            "torch.fx needs forward() free of data-dependent Python control flow; rewrite "
            "that op with tensor ops (e.g. torch.where), or pass its module type in "
            "`leaf_types` to keep it whole (it is then treated as an opaque op)."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def is_traceable(model: nn.Module) -> bool:
    try:
        trace(model)
    except TraceError:
        return False
    return True


def example_input(shape: tuple[int, ...] = (1, 1, 28, 28)) -> torch.Tensor:
    """A deterministic example input for shape propagation."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def example_like(sample: torch.Tensor) -> torch.Tensor:
    """An input of ``sample``'s shape and dtype that carries none of its values: random
    floats, or zeros for integer and boolean inputs (token ids: 0 is an index every
    embedding has, a random one may not be)."""
    if sample.is_floating_point():
        return example_input(tuple(sample.shape)).to(sample.dtype)
    return torch.zeros_like(sample)
