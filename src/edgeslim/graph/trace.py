"""Trace a model once with torch.fx, naming the op and module path where tracing fails."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgeslim.errors import TraceError
from edgeslim.graph.tracer import (
    ExampleSpec,
    PathTracer,
    ShapeResolvingTracer,
    example_at,
    model_line,
)


def user_frame(exc: BaseException, outside: tuple[str, ...] = ("/edgeslim/graph/",)) -> str:
    """The model's own line that raised ``exc`` (see :func:`~.tracer.model_line`)."""
    return model_line(traceback.extract_tb(exc.__traceback__), outside)


INPUTS_ATTR = "_edgeslim_inputs"
EXAMPLES_ATTR = "_edgeslim_examples"
# set on a model (and its graph) whose trace kept a condition on the batch size as at batch
# 2 (checked to compute the model at every batch): its export then runs at batch 2 too, so
# torch's exporter records that branch rather than batch 1's
GENERAL_BATCH_ATTR = "_edgeslim_general_batch"


def declare_inputs(
    model: nn.Module,
    count: int,
    examples: Sequence[torch.Tensor] = (),
    batch_dims: Sequence[int] = (),
) -> None:
    """Record that ``model`` is called with ``count`` positional inputs (a
    :class:`~edgeslim.task.Task` does, from its example inputs), so every later
    :func:`trace` of it, or of a copy, keeps exactly those arguments as graph inputs.

    ``examples`` (one tensor per input, with its batch dimension in ``batch_dims``) let a
    trace resolve Python control flow on shapes (:class:`ShapeResolvingTracer`); only
    their shapes and dtypes are kept."""
    object.__setattr__(model, INPUTS_ATTR, int(count))
    spec = _spec(examples, batch_dims)
    if spec is not None:
        object.__setattr__(model, EXAMPLES_ATTR, spec)


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
def _positional_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Swap the instance's class, while the context lasts, for a subclass whose ``forward``
    takes ``*args`` and passes them on: module names (and so ONNX node names and fx module
    paths) stay, and the original ``forward`` fills its other arguments from its defaults."""
    cls = type(model)

    def forward(self: nn.Module, *args: Any) -> Any:
        return cls.forward(self, *args)

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward})
    try:
        yield model
    finally:
        model.__class__ = cls


@contextmanager
def inputs_only(model: nn.Module, inputs: int) -> Iterator[nn.Module]:
    """``model`` whose ``forward`` takes just its ``inputs`` positional arguments, for as long
    as the context lasts (the arguments :func:`bound_defaults` fixes keep their defaults).

    Why: torch's ONNX exporter fills every missing ``forward`` argument from its default
    and turns a ``scale: float = 1.0`` into a model input.
    """
    if not bound_defaults(model, inputs) and _reads_own_arguments(type(model)):
        yield model
        return
    with _positional_forward(model) as swapped:
        yield swapped


def _reads_own_arguments(cls: type) -> bool:
    """Whether fx can take ``cls.forward``'s inputs from its own signature: not when a
    decorator wraps it (Hugging Face's ``@can_return_tuple``: fx reads the inner function's
    arguments but calls the wrapper, whose ``**kwargs`` then arrive as ``None``) nor when it
    takes ``*args``/``**kwargs`` (fx would trace them as inputs)."""
    forward = cls.forward  # type: ignore[attr-defined]
    if hasattr(forward, "__wrapped__"):
        return False
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return all(p.kind not in kinds for p in inspect.signature(forward).parameters.values())


def _required_inputs(cls: type) -> int:
    """How many positional ``forward`` arguments have no default (at least one)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # type: ignore[attr-defined]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    return max(len(required), 1)


def trace(
    model: nn.Module,
    leaf_types: tuple[type, ...] = (),
    inputs: int | None = None,
    examples: Sequence[Any] = (),
) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the op and module path.

    ``leaf_types`` are module types kept whole (not traced into), e.g. custom ops.
    ``forward`` arguments with defaults beyond the model's ``inputs`` are fixed at their
    defaults (:func:`bound_defaults`). When fx stops at Python control flow and the model's
    example inputs are declared (:func:`declare_inputs`), the trace is retried resolving
    conditions on shapes that do not depend on the batch size
    (:class:`ShapeResolvingTracer`); a model fx traces as it is gets the same graph.
    ``examples`` (tensors, batch on dimension 0) serve when none are declared.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            f"cannot trace {type(model).__name__}: a TorchScript module (torch.jit.script, "
            "trace or load) has no Python forward() for torch.fx to read. Pass the original "
            "nn.Module (its class with the state_dict loaded), or, on the command line, a "
            "module:function that builds it."
        )
    count = inputs if inputs is not None else getattr(model, INPUTS_ATTR, None)
    try:
        return _trace(model, PathTracer(leaf_types), count)
    except TraceError:
        spec = getattr(model, EXAMPLES_ATTR, None) or _spec(examples)
        if spec is None or (inputs is not None and inputs != len(spec)):
            raise
    tracer = ShapeResolvingTracer(leaf_types, spec)
    gm = _trace(model, tracer, len(spec))
    if tracer.assumed:
        check_general_branches(model, gm, spec, tracer.assumed)
        for m in (model, gm):
            object.__setattr__(m, GENERAL_BATCH_ATTR, True)
    return gm


CHECK_BATCHES = (1, 2, 3)


def check_general_branches(
    model: nn.Module, gm: fx.GraphModule, spec: ExampleSpec, assumed: Sequence[str]
) -> None:
    """A graph traced with conditions on the batch size taken as at batch 2 stands only if
    it computes what the model computes at batches 1, 2 and 3 on real inputs; otherwise
    the trace is refused, naming the conditions (``if B == 1: x = x.squeeze(0)`` changes
    the output's shape at batch 1, so it is refused)."""

    def flat(out: Any) -> list[torch.Tensor]:
        return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    why = ""
    for b in CHECK_BATCHES:
        inputs = [example_at(shape, dtype, dim, b) for shape, dtype, dim in spec]
        try:
            with torch.no_grad():
                want, got = flat(model(*inputs)), flat(gm(*inputs))
        except Exception as exc:
            why = f"at batch {b} it raised {type(exc).__name__}: {exc}"
            break
        same = len(want) == len(got) and all(
            w.shape == g.shape and torch.allclose(w, g, rtol=1e-4, atol=1e-5)
            for w, g in zip(want, got, strict=False)
        )
        if not same:
            why = f"at batch {b} its outputs differ from the model's"
            break
    if why:
        raise TraceError(
            f"cannot trace {type(model).__name__}: {'; '.join(assumed)}. Traced as at batch "
            f"2, the graph does not compute the model ({why}), and the exported model keeps "
            "the batch size free: compute the condition with tensor ops."
        )


def _spec(examples: Sequence[Any], batch_dims: Sequence[int] = ()) -> ExampleSpec | None:
    """``(shape, dtype, batch dim)`` of each example tensor (batch dims default to 0), or
    None when there is none or one is not a tensor."""
    if not examples or not all(isinstance(t, torch.Tensor) for t in examples):
        return None
    dims = tuple(batch_dims) or (0,) * len(examples)
    return tuple((tuple(t.shape), t.dtype, d) for t, d in zip(examples, dims, strict=True))


def _trace(model: nn.Module, tracer: PathTracer, count: int | None) -> fx.GraphModule:
    cls = type(model)
    concrete: dict[str, Any] | tuple[Any, ...] | None
    if _reads_own_arguments(cls):
        concrete = bound_defaults(model, count) or None
        params = list(inspect.signature(cls.forward).parameters)[1:]
        tracer.input_names = [p for p in params if p not in (concrete or {})]
        swap: Any = nullcontext(model)
    else:
        n = count if count is not None else _required_inputs(cls)
        concrete = (fx.PH,) * n
        tracer.input_names = [f"input_{i}" for i in range(n)]
        swap = _positional_forward(model)
    try:
        with swap, tracer.session(model):
            graph = tracer.trace(model, concrete_args=concrete)  # type: ignore[arg-type]
    except Exception as exc:
        where = tracer.failed_at or "(top-level forward)"
        mod = model if where.startswith("(") else model.get_submodule(where)
        raise TraceError(
            f"cannot trace {cls.__name__}: in module `{where}` "
            f"({type(mod).__name__}) at {user_frame(exc)}: {type(exc).__name__}: {exc}. "
            "torch.fx needs forward() free of data-dependent Python control flow; rewrite "
            "that op with tensor ops (e.g. torch.where), or pass its module type in "
            "`leaf_types` to keep it whole (it is then treated as an opaque op)."
        ) from exc
    try:
        return fx.GraphModule(tracer.root, graph, cls.__name__)
    except Exception as exc:  # a submodule whose name an fx.GraphModule attribute takes
        taken = [n for n, _ in tracer.root.named_children() if n in _GRAPH_MODULE_NAMES]
        what = f"its submodule(s) {', '.join(map(repr, taken))}" if taken else "one of its names"
        raise TraceError(
            f"cannot trace {cls.__name__}: torch.fx could not build a graph module from it "
            f"({type(exc).__name__}: {exc}); {what} clash with torch.fx.GraphModule's own "
            "attributes: rename them in the model (the weights load by the new name with "
            "a state_dict key rename)"
        ) from exc


# attributes an fx.GraphModule sets on itself: a child module of the same name cannot exist
_GRAPH_MODULE_NAMES = frozenset({"meta", "graph", "code", "_code", "_graph"})


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
