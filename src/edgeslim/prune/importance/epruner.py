"""EPruner (Lin et al. 2021): affinity propagation over filters; exemplars are kept.

Each unit is described by its weights in every scored member, each member's block scaled
to mean squared row norm 1 and the blocks concatenated (so a residual group clusters on
all its producers at once). Similarity is the negative squared Euclidean distance;
``sklearn.cluster.AffinityPropagation`` (seeded) picks exemplars, and their number is the
width EPruner keeps (:func:`epruner_width`). ``preference`` (the self-similarity, default
the median similarity) sets how many exemplars emerge: higher keeps more.

Scores rank every exemplar above every other unit: an exemplar scores
``1 + cluster_size / units`` (in ``(1, 2]``, large clusters first); a non-exemplar scores
``0.99 * d_i / max d`` (in ``[0, 1)``), where ``d_i`` is its distance to its exemplar, so
the units best represented by their exemplar go first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.graph.coupling import CouplingGroup
from edgeslim.prune.importance.base import Importance, finish, register, unit_matrices


def unit_features(
    model: nn.Module, group: CouplingGroup, include_consumers: bool = False
) -> torch.Tensor:
    """``(units, d)`` float64 features: each member block scaled to mean squared row norm 1."""
    blocks = []
    for mat in unit_matrices(model, group, include_consumers):
        scale = mat.pow(2).sum(dim=1).mean().sqrt()
        blocks.append(mat / scale if scale > 0 else mat)
    return torch.cat(blocks, dim=1)


def _affinity(similarity: np.ndarray[Any, Any], **kwargs: Any) -> tuple[np.ndarray[Any, Any], Any]:
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ap = AffinityPropagation(affinity="precomputed", **kwargs).fit(similarity)
    return np.asarray(ap.cluster_centers_indices_, dtype=np.int64), ap.labels_


@register("epruner")
class EPruner(Importance):
    """Exemplars of affinity propagation first (see module doc)."""

    def __init__(
        self,
        preference: float | None = None,
        damping: float = 0.5,
        max_iter: int = 200,
        seed: int = 0,
        include_consumers: bool = False,
    ) -> None:
        self.preference = preference
        self.damping = damping
        self.max_iter = max_iter
        self.seed = seed
        self.include_consumers = include_consumers

    def clusters(self, model: nn.Module, group: CouplingGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exemplar indices, label of every unit)``; labels index into the exemplars.

        If affinity propagation does not converge even with heavy damping, every unit is
        its own exemplar (nothing is pruned) and a warning says so.
        """
        return self._clusters(unit_features(model, group, self.include_consumers), group.id)

    def _clusters(self, feats: torch.Tensor, group_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = feats.shape[0]
        if n == 1:
            return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        sim = -torch.cdist(feats, feats).pow(2).numpy()
        args: dict[str, Any] = {"preference": self.preference, "random_state": self.seed}
        centers, labels = _affinity(sim, damping=self.damping, max_iter=self.max_iter, **args)
        if centers.size == 0:
            centers, labels = _affinity(sim, damping=0.9, max_iter=max(1000, self.max_iter), **args)
        if centers.size == 0:
            warnings.warn(
                f"affinity propagation did not converge on group {group_id}; "
                "treating every unit as an exemplar",
                stacklevel=2,
            )
            idx = torch.arange(n)
            return idx, idx.clone()
        return torch.from_numpy(centers), torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def group_scores(self, model: nn.Module, group: CouplingGroup) -> torch.Tensor:
        feats = unit_features(model, group, self.include_consumers)
        centers, labels = self._clusters(feats, group.id)
        n = group.size
        dist = (feats - feats[centers[labels]]).norm(dim=1)
        scores = 0.99 * dist / dist.max() if dist.max() > 0 else torch.zeros(n, dtype=torch.float64)
        sizes = torch.bincount(labels, minlength=centers.numel()).double()
        scores[centers] = 1.0 + sizes / n
        return scores

    def scores(self, model: nn.Module, groups: Sequence[CouplingGroup]) -> dict[int, torch.Tensor]:
        return {g.id: finish(self.group_scores(model, g)) for g in groups if g.prunable}


def epruner_width(model: nn.Module, group: CouplingGroup, **kwargs: Any) -> int:
    """How many units EPruner keeps in ``group``: its number of exemplars."""
    centers, _ = EPruner(**kwargs).clusters(model, group)
    return int(centers.numel())
