"""FilterSketch (Lin et al. 2020) via Frequent Directions (Liberty 2013).

FilterSketch keeps a small sketch ``B`` (``ell`` rows) of a layer's filter matrix ``W``
(``units x d``) that preserves its second-order information: Frequent Directions
guarantees ``||W^T W - B^T B||_2 <= ||W||_F^2 / ell``. The paper uses the sketch itself
as the pruned layer's filters; edgeslim selects whole channels instead, so each unit is
scored by how much the sketched covariance needs it: its *ridge leverage score*
``tau_i = w_i^T (B^T B + lambda I)^{-1} w_i`` with ``lambda = ||W||_F^2 / ell``.

Why leverage: ``sum_i w_i w_i^T = W^T W`` and ``tau_i`` is the share of that covariance
only ``w_i`` supplies (in ``[0, 1)`` when ``B^T B = W^T W``). A filter in a direction no
other filter covers scores near 1; duplicated filters share their direction's leverage; a
small filter scores about ``||w_i||^2 / lambda``. The ridge ``lambda`` equals the sketch's
error bound, so directions the sketch cannot resolve are damped rather than trusted. Only
``ell x ell`` matrices are factorised, so ``d`` may be large (attention heads).
"""

from __future__ import annotations

import math

import torch

from edgeslim.prune.importance.base import MemberImportance, register


def _shrink(b: torch.Tensor, ell: int) -> torch.Tensor:
    """Keep ``ell`` rows: subtract the ``(ell+1)``-th squared singular value from the rest.

    With ``B = U S V^T`` the shrunk sketch is ``sqrt(S^2 - delta) V^T``. ``S^2`` and ``V`` (or
    ``U``) come from the symmetric eigenproblem of whichever Gram matrix is smaller,
    ``B^T B`` or ``B B^T``; in the latter case the rows are ``diag(sqrt(1 - delta/S^2)) U^T B``,
    free of divisions by tiny singular values.
    """
    rows, d = b.shape
    wide = rows < d
    evals, vecs = torch.linalg.eigh(b @ b.T if wide else b.T @ b)
    evals, vecs = evals.flip(0).clamp_min(0), vecs.flip(1)  # descending
    delta = evals[ell] if evals.numel() > ell else evals.new_zeros(())
    keep = min(ell, evals.numel())
    if not wide:
        return (evals[:keep] - delta).clamp_min(0).sqrt()[:, None] * vecs[:, :keep].T
    ratio = torch.where(evals[:keep] > 0, delta / evals[:keep], torch.ones_like(evals[:keep]))
    return ((1 - ratio).clamp_min(0).sqrt()[:, None] * vecs[:, :keep].T) @ b


def frequent_directions(a: torch.Tensor, ell: int) -> torch.Tensor:
    """An ``(ell, d)`` sketch ``B`` of ``A`` (``n x d``): ``||A^TA - B^TB||_2 <= ||A||_F^2/ell``.

    The doubled-buffer variant: append up to ``ell`` rows to a sketch of at most ``ell``
    rows, then shrink back to ``ell`` by the ``(ell+1)``-th squared singular value
    ``delta``. Each shrink adds at most ``delta`` to the spectral error and removes at least
    ``(ell + 1) delta`` of squared Frobenius mass, hence the bound; about ``n / ell`` shrinks.
    """
    if ell < 1:
        raise ValueError(f"the sketch needs ell >= 1 rows; got {ell}")
    n, d = a.shape
    b = a.new_zeros((0, d))
    for start in range(0, n, ell):
        b = torch.cat([b, a[start : start + ell]])
        if b.shape[0] > ell:
            b = _shrink(b, ell)
    if b.shape[0] < ell:
        b = torch.cat([b, a.new_zeros((ell - b.shape[0], d))])
    return b


def ridge_leverage(mat: torch.Tensor, sketch: torch.Tensor, ridge: float) -> torch.Tensor:
    """``w_i^T (B^T B + ridge I)^{-1} w_i`` for every row ``w_i`` of ``mat``.

    For wide filters Woodbury gives ``(ridge I + B^T B)^{-1} = (I - B^T (ridge I + B B^T)^{-1}
    B) / ridge``, so only a system the size of the smaller Gram matrix is ever solved.
    """
    if ridge <= 0:
        return torch.zeros(mat.shape[0], dtype=mat.dtype)
    ell, d = sketch.shape
    if d <= ell:
        gram = sketch.T @ sketch + ridge * torch.eye(d, dtype=sketch.dtype)
        return (mat * torch.linalg.solve(gram, mat.T).T).sum(dim=1)
    proj = mat @ sketch.T  # (n, ell): B w_i
    gram = sketch @ sketch.T + ridge * torch.eye(ell, dtype=sketch.dtype)
    solved = torch.linalg.solve(gram, proj.T).T
    return (mat.pow(2).sum(dim=1) - (proj * solved).sum(dim=1)) / ridge


@register("filtersketch")
class FilterSketch(MemberImportance):
    """Ridge leverage of each unit against a Frequent-Directions sketch (see module doc).

    ``ell`` fixes the sketch size; otherwise it is ``ceil(ratio * units)``.
    """

    def __init__(
        self,
        ell: int | None = None,
        ratio: float = 0.5,
        include_consumers: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__(include_consumers, normalize)
        if ell is not None and ell < 1:
            raise ValueError(f"filtersketch ell must be >= 1; got {ell}")
        if not 0 < ratio <= 1:
            raise ValueError(f"filtersketch ratio must be in (0, 1]; got {ratio}")
        self.ell = ell
        self.ratio = ratio

    def sketch_rows(self, units: int) -> int:
        return self.ell if self.ell is not None else max(1, math.ceil(self.ratio * units))

    def member_scores(self, mat: torch.Tensor) -> torch.Tensor:
        ell = self.sketch_rows(mat.shape[0])
        sketch = frequent_directions(mat, ell)
        return ridge_leverage(mat, sketch, float(mat.pow(2).sum()) / ell)
