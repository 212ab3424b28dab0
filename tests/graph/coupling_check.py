"""Check a coupling group by what it means (see test_coupling.py)."""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.graph import CouplingGroup, GroupMember


def _rows(mem: GroupMember, i: int, unit: int) -> slice:
    step = unit * mem.repeat
    return slice(mem.offset + i * step, mem.offset + (i + 1) * step)


@torch.no_grad()
def _forward_isolated(
    model: nn.Module, group: CouplingGroup, i: int, scramble: bool, x: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Output with channel i cut from every consumer (and scrambled in every other member)."""
    backup: list[tuple[torch.Tensor, torch.Tensor]] = []
    g = torch.Generator().manual_seed(7)
    for mem in group.members:
        mod = model.get_submodule(mem.fqn)
        rows = _rows(mem, i, group.unit)
        if mem.role == "in":
            backup.append((mod.weight, mod.weight.clone()))
            mod.weight[:, rows] = 0
        elif scramble:
            tensors = list(mod.named_parameters(recurse=False)) + list(
                mod.named_buffers(recurse=False)
            )
            for name, t in tensors:
                if t.dim() == 0:
                    continue
                backup.append((t, t.clone()))
                noise = torch.randn(t[rows].shape, generator=g)
                t[rows] = noise.abs() + 0.5 if name == "running_var" else noise * 3
    try:
        out = model(*x)
    finally:
        for t, saved in reversed(backup):
            t.copy_(saved)
    return getattr(out, "last_hidden_state", out)


def check_group(model: nn.Module, group: CouplingGroup, x: tuple[torch.Tensor, ...]) -> None:
    model.eval()
    for i in sorted({0, group.size - 1}):
        oa = _forward_isolated(model, group, i, False, x)
        ob = _forward_isolated(model, group, i, True, x)
        assert torch.allclose(oa, ob, atol=1e-4, rtol=1e-4), (
            f"group {group.id} channel {i} leaks: {group.describe()}"
        )
