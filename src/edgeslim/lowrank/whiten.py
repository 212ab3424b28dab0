"""Data-aware truncation: ranks and factors that keep what a layer's inputs exercise.

A layer's output error at rank ``r`` on inputs ``x`` is ``E||(W - W_r) x||^2 =
||(W - W_r) S||_F^2`` with ``S`` the symmetric square root of the inputs' second moment
``E[x x^T]``. Its minimum over rank-``r`` matrices is ``W_r = [W S]_r S^-1``: the truncated
SVD of ``W S`` mapped back (Eckart-Young on ``W S``; SVD-LLM's whitening, Wang et al. 2024).
Plain SVD is the case ``S = I``, right only for white inputs; a conv's input patches are
anything but (neighbouring pixels and channels correlate). The singular values of ``W S``
are the output energy each rank keeps, so the rank rules of :mod:`edgeslim.lowrank.ranks`
(energy threshold, MACs target) apply to them unchanged.

:func:`input_moments` measures ``E[x x^T]`` per layer on calibration inputs (rows of
:func:`edgeslim.graph.patches.input_rows`), :class:`Whitening` holds ``S`` and ``S^-1``, and
:func:`whiten` turns a :class:`~edgeslim.lowrank.ranks.Candidate` (plain SVD) into its
data-aware twin, which :func:`~edgeslim.lowrank.svd.factorize_` and TRP use as they use the
plain one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import run_batches
from edgeslim.graph.patches import input_rows, num_rows
from edgeslim.lowrank.modules import LowRankError, weight_matrix
from edgeslim.lowrank.ranks import Candidate, cumulative_energy

DAMP = 1e-3  # added to the moment's diagonal, relative to its mean: keeps S invertible
ROWS_PER_BATCH = 4096  # input rows sampled per batch and layer (all when fewer)


@dataclass(frozen=True)
class Whitening:
    """``S`` (``sqrt`` of a layer's damped input second moment) and ``S^-1``, float64."""

    root: torch.Tensor
    inverse_root: torch.Tensor

    @classmethod
    def of(cls, moment: torch.Tensor, damp: float = DAMP) -> Whitening:
        m = moment.to(torch.float64)
        m = (m + m.T) / 2 + damp * (float(m.diagonal().mean()) or 1.0) * torch.eye(
            m.shape[0], dtype=torch.float64
        )
        evals, q = torch.linalg.eigh(m)
        evals = evals.clamp_min(float(evals.max()) * 1e-12)
        return cls((q * evals.sqrt()) @ q.T, (q * evals.rsqrt()) @ q.T)


@torch.no_grad()
def input_moments(
    model: nn.Module,
    fqns: Sequence[str],
    calibration: Iterable[Any],
    rows_per_batch: int = ROWS_PER_BATCH,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (float64) of each listed layer's input rows over ``calibration`` (input
    batches, or ``(inputs, target)`` pairs), the model in eval mode (restored after)."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(fqns, 0)

    def hook(fqn: str) -> Any:
        def add(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0].detach()
            n = num_rows(module, x)  # type: ignore[arg-type]
            # the sampled rows are gathered alone: a conv's whole unfolded input is its
            # kernel's size times the input (gigabytes for a 3x3x3 conv on video clips)
            pick = torch.randperm(n, generator=gen)[:rows_per_batch] if n > rows_per_batch else None
            rows = input_rows(module, x, pick).to(torch.float64)  # type: ignore[arg-type]
            sums[fqn] = sums.get(fqn, 0) + rows.T @ rows
            counts[fqn] += rows.shape[0]

        return add

    run_batches(model, calibration, [modules[f].register_forward_hook(hook(f)) for f in fqns])
    missing = [f for f in fqns if not counts[f]]
    if missing:
        raise LowRankError(
            f"data-aware ranks: {', '.join(missing)} did not run on the calibration inputs "
            "(or there were none)"
        )
    return {f: sums[f] / counts[f] for f in fqns}


def whiten(cand: Candidate, whitening: Whitening) -> Candidate:
    """``cand`` with the SVD of ``W S`` (its right factor mapped back by ``S^-1``), so ranks,
    energies, truncations and factorizations computed from it are the data-aware ones."""
    w = weight_matrix(cand.module)
    if whitening.root.shape[0] != w.shape[1]:
        raise LowRankError(
            f"data-aware ranks: {cand.fqn} has {w.shape[1]} inputs per output but its input "
            f"moment is {whitening.root.shape[0]} wide"
        )
    u, s, vh = torch.linalg.svd(w @ whitening.root, full_matrices=False)
    return Candidate(cand.fqn, cand.module, (u, s, vh @ whitening.inverse_root), cand.macs,
                     cumulative_energy(s))  # fmt: skip


def whitenings(
    model: nn.Module, cands: Sequence[Candidate], calibration: Iterable[Any]
) -> dict[str, Whitening]:
    """One :class:`Whitening` per candidate, from ``calibration``."""
    moments = input_moments(model, [c.fqn for c in cands], calibration)
    return {f: Whitening.of(m) for f, m in moments.items()}
