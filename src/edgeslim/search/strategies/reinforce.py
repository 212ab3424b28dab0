"""``reinforce``: a policy-gradient controller over per-layer choices (DNQ-style).

The controller holds one categorical distribution per coordinate (a layer's weight bits,
activation bits, a group's keep ratio), ``softmax(theta_d)``. Each ask samples every
coordinate; each result updates ``theta_d += lr * A * (onehot(a_d) - softmax(theta_d))``
(the REINFORCE gradient of ``log pi(a)``), where the advantage ``A`` is the reward minus a
moving-average baseline (decay ``decay``), divided by a moving average of its own size so
the step does not depend on the metric's scale. The reward is :func:`~.base.reward`: the
metric relative to the uncompressed model, with a penalty for breaking a constraint.

DNQ's controller is recurrent (an LSTM reading the layers in order); independent
per-coordinate logits are the simplest unbiased form of the same estimator and need no
training of a network between evaluations.

With ``warm_start`` (default on) the first asks are the uniform policies that pass the
analytic constraints (:meth:`~.base.GeneStrategy.warm_start`, up to ``warm`` of them), told
like any sample, so the controller learns from them before it samples on its own.
"""

from __future__ import annotations

import math

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register, reward


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    s = sum(e)
    return [v / s for v in e]


@register("reinforce")
class Reinforce(GeneStrategy):
    """REINFORCE with a moving-average baseline (see the module doc)."""

    name = "reinforce"

    def __init__(
        self, ctx: Context, lr: float = 0.5, decay: float = 0.8, warm_start: bool = True,
        warm: int = 4,
    ) -> None:  # fmt: skip
        super().__init__(ctx)
        if lr <= 0 or not 0.0 <= decay < 1.0:
            raise SearchError("reinforce: lr must be > 0 and decay in [0, 1)")
        self.lr = lr
        self.decay = decay
        self.theta = [[0.0] * n for n in self.sizes]
        self.baseline: float | None = None
        self.scale: float | None = None
        self.updates = 0
        self.seeds = self.warm_start(warm) if warm_start else []

    def ask(self) -> Policy | None:
        if self.seeds:
            return self.policy(self.seeds.pop(0))
        genes = [self._sample(softmax(t)) for t in self.theta]
        return self.mark(genes)

    def _sample(self, probs: list[float]) -> int:
        r = self.rng.random()
        acc = 0.0
        for i, p in enumerate(probs):
            acc += p
            if r < acc:
                return i
        return len(probs) - 1

    def tell(self, policy: Policy, result: EvalResult) -> None:
        r = reward(result)
        if self.baseline is None:
            self.baseline = r
            return
        adv = r - self.baseline
        self.baseline = self.decay * self.baseline + (1 - self.decay) * r
        if adv == 0.0:
            return
        size = abs(adv) if self.scale is None else self.scale
        self.scale = self.decay * size + (1 - self.decay) * abs(adv)
        a = adv / max(self.scale, 1e-12)
        for t, gene in zip(self.theta, self.space.encode(policy), strict=True):
            probs = softmax(t)
            for i in range(len(t)):
                t[i] += self.lr * a * ((1.0 if i == gene else 0.0) - probs[i])
        self.updates += 1
        self.notes.update(updates=self.updates, baseline=self.baseline, likeliest=self.likeliest())

    def likeliest(self) -> str:
        """Id of the policy the controller now finds most likely (its argmax per coordinate)."""
        genes = [max(range(len(t)), key=lambda i: t[i]) for t in self.theta]
        return self.policy(genes).id
