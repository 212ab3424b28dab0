"""MACs of tensor products a model computes outside any module that counts its own.

Why: hand-written attention (``q @ k.transpose(-2, -1)``, ``F.scaled_dot_product_attention``,
``torch.einsum``) and weight-tied heads (``x @ self.embed.weight.T``) multiply matrices in a
module's ``forward`` without a conv or linear child. Forward hooks never see them, so a
MACs total (and every MACs target measured against it) silently left them out.

:class:`FunctionalMacs` is a torch-function mode plus a stack of the modules running: each
matmul-like call made while the innermost running module is not one whose MACs are counted
from its parameters (conv, linear, recurrent, attention modules; see
:func:`~edgeslim.graph.layers.module_macs`) adds its MACs to that innermost module. Calls
inside a counted module are skipped, so nothing is counted twice (``nn.Linear`` itself calls
``F.linear``). Counted per call, batch included, as for layers: ``out.numel() x k`` for a
product reducing over ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _last(t: Any) -> int:
    return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.dim() else 1


def _matmul(args: tuple[Any, ...], out: torch.Tensor) -> int:
    return int(out.numel()) * _last(args[0])


def _rmatmul(args: tuple[Any, ...], out: torch.Tensor) -> int:
    # ``b.__rmatmul__(a)`` is ``a @ b``: the reduced size is b's second-to-last (or only) dim
    b = args[0]
    k = int(b.shape[-2]) if b.dim() >= 2 else int(b.shape[0]) if b.dim() else 1
    return int(out.numel()) * k


def _addmm(args: tuple[Any, ...], out: torch.Tensor) -> int:
    return int(out.numel()) * _last(args[1])  # (input, m1, m2): m1 is (.., n, k)


def _conv(args: tuple[Any, ...], out: torch.Tensor) -> int:
    w = args[1]  # (out, in / groups, *kernel)
    return int(out.numel()) * int(math.prod(w.shape[1:]))


def _sdpa(args: tuple[Any, ...], out: torch.Tensor) -> int:
    q, k, v = args[:3]  # (..., L, E), (..., S, E), (..., S, Ev)
    rows = int(q.numel()) // max(_last(q), 1)  # batch x heads x L
    return rows * int(k.shape[-2]) * (_last(q) + _last(v))


def _einsum(args: tuple[Any, ...], out: torch.Tensor) -> int:
    """``out.numel()`` times the sizes of the indices summed over (two or more operands);
    letters before and after an ellipsis name an operand's first and last dims."""
    if not args or not isinstance(args[0], str):
        return 0
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = args[0].replace(" ", "")
    if "->" not in equation or len(operands) < 2:
        return 0
    lhs, rhs = equation.split("->")
    sizes: dict[str, int] = {}
    for spec, t in zip(lhs.split(","), operands, strict=False):
        if not isinstance(t, torch.Tensor):
            continue
        head, _, tail = spec.partition("...")
        sizes.update(zip(head, (int(d) for d in t.shape[: len(head)]), strict=False))
        if tail:
            sizes.update(zip(tail, (int(d) for d in t.shape[t.dim() - len(tail) :]), strict=False))
    reduced = [size for c, size in sizes.items() if c not in rhs]
    return int(out.numel()) * int(math.prod(reduced))


MacsRule = Callable[[tuple[Any, ...], torch.Tensor], int]

RULES: dict[Any, MacsRule] = {
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: _rmatmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.addmm: _addmm,
    torch.baddbmm: _addmm,
    torch.einsum: _einsum,
    F.linear: _matmul,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.scaled_dot_product_attention: _sdpa,
}
"""Matmul-like functions and their MACs from ``(args, output)``."""


class FunctionalMacs(TorchFunctionMode):
    """Counts :data:`RULES` calls per innermost running module (see the module doc).

    ``counted(module)`` says whether a module's own MACs are already counted (then nothing
    inside it is). Use :meth:`track` around the forward pass.
    """

    def __init__(self, counted: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.counted = counted
        self.macs: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._stack: list[str] = []  # the modules running, innermost last
        self._counted = 0  # how many of them count their own MACs

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        rule = RULES.get(func)
        if rule is None or not self._stack or self._counted:
            return out
        if isinstance(out, torch.Tensor):
            merged = args + tuple((kwargs or {}).values())
            try:
                macs = rule(merged, out)
            except (AttributeError, IndexError, TypeError, ValueError):
                macs = 0  # an unusual call form: counted as nothing rather than failing
            name = self._stack[-1]
            self.macs[name] = self.macs.get(name, 0) + macs
        return out

    @contextmanager
    def track(self, model: nn.Module) -> Iterator[FunctionalMacs]:
        """Active during the block, with every module of ``model`` on the stack while it runs."""
        handles = []
        for name, mod in model.named_modules():
            counted = self.counted(mod)
            handles.append(mod.register_forward_pre_hook(self._enter(name, counted)))
            handles.append(mod.register_forward_hook(self._leave(name, counted), always_call=True))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self, name: str, counted: bool) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
            self._stack.append(name)
            self._counted += counted
            if name not in self.shapes:
                t = next((a for a in args if isinstance(a, torch.Tensor)), None)
                self.shapes[name] = (tuple(t.shape) if t is not None else (), ())

        return fn

    def _leave(self, name: str, counted: bool) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
                self._counted -= counted
            if name in self.macs:
                self.calls[name] = self.calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor) and not self.shapes[name][1]:
                    self.shapes[name] = (self.shapes[name][0], tuple(out.shape))

        return fn
