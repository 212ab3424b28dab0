"""The fx tracers behind :func:`edgeslim.graph.trace.trace`.

:class:`PathTracer` is torch.fx's tracer plus the module path it is in (for error messages)
and a few unpacking rules. :class:`ShapeResolvingTracer` also knows each node's value on
example inputs, computed when a Python condition asks (on fake tensors: shapes, no
arithmetic), so control flow on *shapes* resolves to the branch the model takes:
``if pixel_values.shape[1] != self.num_channels: raise ...`` (Hugging Face's ResNet),
``pad = max(k - int(x.shape[-2]) % s, 0)`` (TF "same" padding). A condition is resolved only
when it is computed from shapes alone; one that reads tensor values still stops the trace.
One that changes with the batch is traced as at batch 2 (the general case), and the trace
stands only if the graph then computes the model at batches 1-3
(:func:`edgeslim.graph.trace.check_general_branches`), since the graph and the ONNX file,
whose batch axis stays dynamic, fix it. Non-batch dimensions are fixed anyway: a task's
data must match its example inputs but for the batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.proxy import Attribute

from edgeslim.graph.ops import SHAPE_ATTRS, SHAPE_METHODS
from edgeslim.graph.swap import swapped

VALUES = "edgeslim_values"  # node.meta: the node's value at each example batch size, or None
SHAPE_ONLY = "edgeslim_shape_only"  # node.meta: computed from shapes, never tensor values
_ORDER = "edgeslim_order"  # node.meta: creation index (a topological order)
BATCH_SIZES = (1, 2)  # 1: the batch a deployed model often runs at (`if B == 1:` caught)
# tensor factories taking sizes: recorded as graph nodes when a size is traced
_SIZED_FACTORIES = ("ones", "zeros", "full", "empty", "rand", "randn", "arange")
# a tensor's fixed properties: read at once from the example values, as Python needs them
# (HF's masks call `torch.finfo(x.dtype)`: SqueezeBERT did not trace)
_METADATA_ATTRS = frozenset({"dtype", "device", "layout"})
ExampleSpec = Sequence[tuple[tuple[int, ...], torch.dtype, int]]


class PathTracer(fx.Tracer):
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
        self.input_names: list[str] = []  # the placeholders that are model inputs, in order

    @contextmanager
    def session(self, model: nn.Module) -> Iterator[None]:
        """Context around one trace of ``model``: the plain attributes of its modules are put
        back afterwards. Why: a forward that caches in the module (Hugging Face's LeViT keeps
        its attention biases in a dict in eval mode) stored a proxy of this trace there, and
        the next trace read it: "Node to insert after is not in graph"."""
        saved = [(m, _plain_state(m)) for m in model.modules()]
        for _, state in saved:
            for value, copied in state.values():
                if copied is not None and _holds_tensor(value):
                    value.clear()  # a cache: traced as a fresh model computes it (below)
        try:
            with swapped(torch, self.torch_replacements()):
                yield
        finally:
            for m, state in saved:
                added = [k for k in vars(m) if k not in state and k not in _MODULE_DICTS]
                for key in added:  # (fx's own additions, tensor constants, stay)
                    if _holds_proxy(vars(m)[key]):
                        delattr(m, key)
                for key, (value, copied) in state.items():
                    if copied is not None:  # a container changed in place: its old content
                        _refill(value, copied)
                    object.__setattr__(m, key, value)

    def torch_replacements(self) -> dict[str, Any]:
        """torch functions replaced while tracing: the tensor factories (below)."""
        return {name: self._recorded(getattr(torch, name)) for name in _SIZED_FACTORIES}

    def _recorded(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """``torch.ones(x.shape[0], n)`` and the like: torch's argument parser takes no proxy
        as a size (``ones() takes 1 positional argument but 2 were given``: OPT's position
        mask), so a call given one is recorded as a graph node, its sizes left free."""

        @functools.wraps(make)
        def factory(*args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs))):
                return self.create_proxy("call_function", make, args, kwargs)
            return make(*args, **kwargs)

        return factory

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def iter(self, obj: fx.Proxy) -> Any:
        """Iterate a proxy whose length the graph says: ``chunk(n)`` and ``split`` with a
        list of sizes, as in ``for t in qkv.chunk(3, dim=-1)`` (fx only unpacks
        ``a, b, c = ...`` itself)."""
        n = known_length(obj.node)
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
        try:
            path = self.path_of_module(m)
        except NameError:
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise
            # A stateless module built inside forward (``nn.ReLU()(x)``, DistilBERT's head)
            # belongs to no path: its forward is traced as written.
            return forward(*args, **kwargs)
        self.stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module, recorded as we unwind
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()


_SIDE_EFFECTS = (torch._assert, operator.setitem)  # nodes kept though nothing reads them
_MODULE_DICTS = frozenset({"_parameters", "_buffers", "_modules"})


def _contains(value: Any, kind: type) -> bool:
    """A dict/list/tuple/set holding a ``kind``."""
    if not isinstance(value, (dict, list, tuple, set)):
        return False
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, kind) for v in items)


def _holds_proxy(value: Any) -> bool:
    """A proxy, or a container holding one (a cache a forward made on first call)."""
    return isinstance(value, fx.Proxy) or _contains(value, fx.Proxy)


def _holds_tensor(value: Any) -> bool:
    """A container holding a tensor: a cache a forward filled on an earlier call.

    Decision: it is emptied while tracing (and given back after). LeViT's eval-mode cache
    of attention biases made the graph depend on whether the model had run before: read
    from the cache, the biases were a constant; on a fresh model (``edgeslim.load``) they
    were computed, and the reloaded quantizers did not match the saved ones."""
    return _contains(value, torch.Tensor)


def _refill(container: Any, content: Any) -> None:
    """Give a dict, list or set back the content it had."""
    if isinstance(container, list):
        container[:] = content
    else:
        container.clear()
        container.update(content)


def _plain_state(m: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{name: (value, copy of its content when a dict/list/set)}`` of ``m``'s own
    attributes besides its parameters, buffers and submodules."""
    state: dict[str, tuple[Any, Any]] = {}
    for key, value in vars(m).items():
        if key in _MODULE_DICTS:
            continue
        copied = copy.copy(value) if type(value) in (dict, list, set) else None
        state[key] = (value, copied)
    return state


def known_length(node: fx.Node) -> int | None:
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


class _ResolvingProxy(fx.Proxy):
    """A proxy Python may read as a number or a length, when its tracer can resolve it."""

    tracer: ShapeResolvingTracer

    def __getattr__(self, k: str) -> Any:
        if k in _METADATA_ATTRS:  # `torch.finfo(x.dtype)` needs a dtype, not a proxy
            found = self.tracer.metadata(self, k)
            if found is not None:
                return found
        return _ResolvingAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.resolve(self, len, values_allowed=True)

    def __int__(self) -> int:
        return self.tracer.resolve(self, int)

    def __index__(self) -> int:
        return self.tracer.resolve(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.resolve(self, float)

    def __setitem__(self, key: Any, value: Any) -> None:
        """In-place slice assignment (BEiT builds its relative position index with
        ``coords[:, :, 0] += n - 1``), recorded as ``operator.setitem``."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ResolvingAttribute(Attribute, _ResolvingProxy):
    """``proxy.shape`` and the like, resolvable as :class:`_ResolvingProxy` is."""


def model_line(
    frames: traceback.StackSummary, outside: tuple[str, ...] = ("/edgeslim/graph/",)
) -> str:
    """``file:line: `code``` of the innermost frame outside torch and ``outside`` (path
    fragments): the model's own line."""
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not any(part in path for part in outside):
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return "unknown location"


def example_at(shape: tuple[int, ...], dtype: torch.dtype, dim: int, batch: int) -> torch.Tensor:
    """An input of the example's shape at ``batch`` on its batch dimension: random floats,
    zeros for integer and boolean inputs (token ids: 0 is an index every embedding has)."""
    size = list(shape)
    size[dim] = batch
    if dtype.is_floating_point:
        return torch.randn(size, generator=torch.Generator().manual_seed(batch)).to(dtype)
    return torch.zeros(size, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode while the context lasts; every submodule's mode restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _torch_layer(cls: type) -> type | None:
    """The first torch layer ``cls`` derives from (``nn.Conv2d`` for a quantized conv),
    besides ``nn.Module``; None when it derives from none or is one."""
    for base in cls.__mro__[1:]:
        if base is not nn.Module and base.__module__.startswith("torch.nn."):
            return base
    return None


def _zeros_like_fake(t: FakeTensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype)


def _at(node: fx.Node, b: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``node``'s arguments with every input node replaced by its value at batch ``b``."""

    def value(n: fx.Node) -> Any:
        return n.meta[VALUES][b]

    return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)


class ShapeResolvingTracer(PathTracer):
    """:class:`PathTracer` that answers Python's ``bool``/``int``/``len``/iteration of a proxy
    from its values at two batch sizes (computed when asked, :meth:`_values`) when the answer
    is computed from shapes alone and does not depend on the batch size."""

    def __init__(self, leaf_types: tuple[type, ...], spec: ExampleSpec) -> None:
        super().__init__(leaf_types)
        # Shapes, not values, decide what is resolved: ops run on fake tensors (no compute;
        # real parameters are read as fakes), so a large model costs no more than a small one.
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.examples = [
            tuple(
                self._fake.from_tensor(example_at(shape, dtype, dim, b))
                for shape, dtype, dim in spec
            )
            for b in BATCH_SIZES
        ]
        self._running = False  # inside an op run on example values: record nothing
        self._created = 0  # nodes made so far: each node's creation index orders them
        # conditions that answered differently at batch 1 and 2, traced as at batch 2 (the
        # general case): the trace stands only if the graph then computes the model at
        # every batch size (:func:`edgeslim.graph.trace.check_general_branches`)
        self.assumed: list[str] = []

    @contextmanager
    def session(self, model: nn.Module) -> Iterator[None]:
        """Running the ops may update the model's state (BatchNorm statistics in training
        mode, in-place ops on buffers) and draws random numbers (dropout): both are put back."""
        tensors = [*model.parameters(), *model.buffers()]
        saved = [t.detach().clone() for t in tensors]
        rng = torch.random.get_rng_state()
        try:
            with super().session(model):
                yield
        finally:
            with torch.no_grad():
                for t, s in zip(tensors, saved, strict=True):
                    t.copy_(s)
            torch.random.set_rng_state(rng)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ResolvingProxy(node, self)

    def torch_replacements(self) -> dict[str, Any]:
        return {**super().torch_replacements(), "tensor": self._constant(torch.tensor)}

    def _constant(self, make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``torch.tensor`` taking sizes the trace can fix (DeBERTa's
        ``torch.tensor(q.size(-1), dtype=torch.float)``): fx cannot record the call, and
        the value is a constant of the exported model, as every resolved size is."""

        def fixed(value: Any) -> Any:
            if isinstance(value, fx.Proxy):
                return self.resolve(value, lambda v: v)
            if isinstance(value, (list, tuple)):
                return type(value)(fixed(v) for v in value)
            return value

        @functools.wraps(make)
        def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return make(fixed(data), *args, **kwargs)

        return tensor

    # While tracing, fx routes every module call and parameter read through the tracer;
    # running a leaf module on example values must reach the module itself.
    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self._running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        node.meta[SHAPE_ONLY] = self._shape_only(node)
        node.meta[_ORDER] = self._created
        self._created += 1
        return proxy

    def _shape_only(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return node.target not in self.input_names
        if node.op == "get_attr":
            return False
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in SHAPE_ATTRS or bool(node.args[0].meta.get(SHAPE_ONLY))  # type: ignore[union-attr]
        if node.op == "call_method" and node.target in SHAPE_METHODS:
            return True
        return all(n.meta.get(SHAPE_ONLY, False) for n in node.all_input_nodes)

    def metadata(self, proxy: fx.Proxy, attr: str) -> Any:
        """``proxy``'s tensor ``attr`` (a dtype, a device) from its example values, or None
        when they cannot be computed or disagree between batch sizes."""
        values = self._values(proxy.node)
        if not values or not all(isinstance(v, torch.Tensor) for v in values):
            return None
        found = [getattr(v, attr) for v in values]
        return found[0] if all(f == found[0] for f in found) else None

    def _values(self, node: fx.Node) -> list[Any] | None:
        """The node's value at each batch size (None when it cannot be computed), computed
        when first asked for, with the ancestors it needs: most of a graph never is."""
        todo: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if VALUES not in n.meta and n not in todo:
                todo.add(n)
                stack.extend(n.all_input_nodes)
        # (a tensor constant fx stores while tracing has no creation index: no inputs either)
        for n in sorted(todo, key=lambda n: n.meta.get(_ORDER, -1)):
            n.meta[VALUES] = self._evaluate(n)
        return node.meta[VALUES]

    def _evaluate(self, node: fx.Node) -> list[Any] | None:
        """The node's value at each batch size; None when it cannot be computed."""
        if node.op == "placeholder":
            if node.target in self.input_names:
                i = self.input_names.index(str(node.target))
                return [example[i] for example in self.examples]
            return [node.args[0] if node.args else None] * len(self.examples)
        if node.op not in ("get_attr", "call_function", "call_method", "call_module"):
            return None
        if any(n.meta.get(VALUES) is None for n in node.all_input_nodes):
            return None
        self._running = True
        try:
            if node.op == "get_attr":
                return [operator.attrgetter(str(node.target))(self.root)] * len(self.examples)
            return [self._run_at(node, b) for b in range(len(self.examples))]
        except Exception:
            return None
        finally:
            self._running = False

    def _run_at(self, node: fx.Node, b: int) -> Any:
        """Run ``node`` at batch ``b`` on fake tensors; when that fails (an op that reads a
        value, as a quantizer's ``.item()`` does), on zeros of the same shapes: only shapes
        are ever resolved, and zeros have the fakes' shapes."""
        args, kwargs = _at(node, b)
        try:
            with torch.no_grad(), self._fake:
                return self._run(node, args, kwargs)
        except Exception:
            if node.op == "call_module":
                module = self.root.get_submodule(str(node.target))
                # in eval mode: a BatchNorm training on one value per channel (batch 1, a
                # 1x1 map) refuses to run, and its shapes are the same in both modes
                with contextlib.suppress(Exception), eval_mode(module), torch.no_grad(), self._fake:
                    return self._run(node, args, kwargs)
                base = _torch_layer(type(module))  # a torch layer's subclass: its shapes
                if base is not None:
                    with contextlib.suppress(Exception), torch.no_grad(), self._fake:
                        return base.forward(module, *args, **kwargs)  # type: ignore[attr-defined]
            real = pytree.tree_map_only(FakeTensor, _zeros_like_fake, (args, kwargs))
            with torch.no_grad():
                return self._run(node, *real)

    def _run(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return self.root.get_submodule(str(node.target))(*args, **kwargs)

    def resolve(
        self, proxy: fx.Proxy, how: Callable[[Any], Any], values_allowed: bool = False
    ) -> Any:
        """``how(value)`` of ``proxy``, when the trace may fix it; otherwise raise as fx does.

        ``values_allowed``: the answer depends on no tensor value even when the node does
        (a length)."""
        node = proxy.node
        values = self._values(node)
        if values is None:
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow "
                f"(`{node.format_node()}` could not be computed on example inputs)"
            )
        if not (values_allowed or node.meta.get(SHAPE_ONLY)):
            raise fx.proxy.TraceError(
                "symbolically traced variables cannot be used as inputs to control flow "
                "(the condition reads tensor values, not only shapes)"
            )
        answers = [how(v) for v in values]
        if any(a != answers[0] for a in answers[1:]):
            seen = ", ".join(
                f"{a!r} at batch {b}" for a, b in zip(answers, BATCH_SIZES, strict=True)
            )
            # GPT-2's masks: `if batch_size != position_ids.shape[0]: position_ids =
            # position_ids.expand(batch_size, -1)`, a no-op at batch 1: the branch taken at
            # batch 2 is kept, and checked on real inputs once the trace is done
            where = model_line(traceback.extract_stack())
            self.assumed.append(f"{where}: a value that depends on the batch size ({seen})")
            return answers[-1]
        return answers[0]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.resolve(obj, bool))

    def iter(self, obj: fx.Proxy) -> Any:
        if known_length(obj.node) is None:
            n = self.resolve(obj, len, values_allowed=True)
            return (obj[i] for i in range(n))  # type: ignore[index]
        return super().iter(obj)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Trace, then drop what only served resolved conditions: shape reads nothing uses
        (they would read as ops the graph's passes do not know) and the stored values."""
        graph = super().trace(root, concrete_args)
        for node in reversed(list(graph.nodes)):
            unused = not node.users and node.op in ("call_function", "call_method")
            if unused and node.meta.get(SHAPE_ONLY) and node.target not in _SIDE_EFFECTS:
                graph.erase_node(node)
        for node in graph.nodes:
            for key in (VALUES, SHAPE_ONLY, _ORDER):
                node.meta.pop(key, None)
        return graph
