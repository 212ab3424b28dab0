"""``envelope_ddpg``: multi-objective reinforcement learning over per-layer choices (MCMC).

After MCMC (multi-constrained model compression, METHODS.md section 3): one DDPG agent
walks the space's coordinates in order (a layer's weight bits, activation bits, a group's
keep ratio), one continuous action in [0, 1] per coordinate (choice ``floor(a * n)`` of its
``n``), and is told a **vector** of rewards per policy: the metric relative to the
uncompressed model (0 for a policy rejected unmeasured, minus the excess over ``max_drop``)
and, per analytic limit (latency, size, MACs, ...), minus its excess over that limit. The
actor and the critic both read a **preference** ``w`` over those objectives; the critic
predicts the reward vector, the actor maximises ``w . Q``, and the critic's bootstrap
target is the envelope of the next step's value over sampled preferences (Yang et al.
2019): ``max_{w'} w . Q'(s', mu'(s', w'), w')``. One agent so serves every trade-off: a
user who weighs latency over size asks with another ``preference`` without retraining.

State per coordinate (AMC-style, what the space knows without measuring): its position,
its kind, its layer's share of the model's MACs and parameters (a group: its share of the
prunable channels), its number of choices, the previous action and the mean action so far
(the budget spent). Rewards arrive once per policy (at its last coordinate).

Decisions:

- The critic's target mixes the envelope bootstrap with the episode's own reward vector,
  half each (a mixed Monte-Carlo return): with a reward only at the end and a few dozen
  policies per search, a pure bootstrap would take thousands of updates to carry the
  reward back over resnet20's ~25 coordinates; the Monte-Carlo half carries it at once.
- Exploration: Gaussian noise on each action, ``noise`` decaying by ``noise_decay`` per
  measured policy (AMC's schedule; rejected ones are too many and too cheap to count);
  the first asks are the uniform policies that pass the analytic constraints
  (:meth:`~.base.GeneStrategy.warm_start`), told as off-policy experience like any other.
- Policies rejected unmeasured (an analytic limit broken) cost no budget and are told at
  once, so the agent learns the constraints' shape mostly for free.
- Seeded: the networks are built under ``ctx.seed`` without touching torch's global
  generator, and every draw goes through the strategy's own generators, so the same seed
  and the same results give the same asks on any executor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgeslim.search.errors import SearchError
from edgeslim.search.evaluate import EvalResult
from edgeslim.search.policy import Policy
from edgeslim.search.strategies.base import Context, GeneStrategy, register, relative_metric

KINDS = ("w_bits", "a_bits", "keep")
FEATURES = 4 + len(KINDS) + 2  # position, kind, MACs/params share, choices, prev, mean
BUFFER = ("s", "a", "w", "s2", "done", "ret")  # state, action, preference, next, last, return
MC_MIX = 0.5  # weight of the episode's own return in the critic's target
RETRIES, MIN_RETRY_NOISE = 10, 0.1  # a repeated policy: asked again with this much more noise


@dataclass
class _Episode:
    """One asked policy as the agent saw it: states, actions and the preference used."""

    states: torch.Tensor  # (D, FEATURES)
    actions: torch.Tensor  # (D, 1)
    pref: torch.Tensor  # (M,)


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, n_out),
    )  # fmt: skip


@register("envelope_ddpg")
class EnvelopeDDPG(GeneStrategy):
    """Envelope multi-objective DDPG over the space's coordinates (see the module doc).

    ``preference``: one weight per objective, the metric first then each analytic limit in
    the order given (default: half on the metric, the rest shared by the limits);
    ``hidden``: width of both networks; ``updates``: gradient steps per told policy;
    ``noise``/``noise_decay``: exploration; ``warm``: uniform policies asked first.
    """

    name = "envelope_ddpg"

    def __init__(
        self, ctx: Context, preference: Sequence[float] | None = None, hidden: int = 64,
        updates: int = 24, batch: int = 64, lr: float = 1e-3, tau: float = 0.05,
        noise: float = 0.4, noise_decay: float = 0.95, prefs_sampled: int = 8,
        warm_start: bool = True, warm: int = 4,
    ) -> None:  # fmt: skip
        super().__init__(ctx)
        self.limits = [str(c) for c in ctx.constraints.limits]
        m = 1 + len(self.limits)
        pref = [0.5] + [0.5 / max(len(self.limits), 1)] * len(self.limits)
        if preference is not None:
            pref = [float(v) for v in preference]
            if len(pref) != m or any(not math.isfinite(v) or v < 0 for v in pref) or not sum(pref):
                raise SearchError(
                    f"envelope_ddpg: preference needs {m} weights >= 0, not all 0 (the metric, "
                    f"then {', '.join(self.limits) or 'no limit'}); got {list(preference)}"
                )
        if hidden < 1 or updates < 0 or batch < 1 or lr <= 0 or not 0 < tau <= 1:
            raise SearchError(
                "envelope_ddpg: needs hidden, batch >= 1, updates >= 0, lr > 0, tau in (0, 1]"
            )
        if noise < 0 or not 0 < noise_decay <= 1 or prefs_sampled < 1:
            raise SearchError(
                "envelope_ddpg: needs noise >= 0, noise_decay in (0, 1], prefs_sampled >= 1"
            )
        total = sum(pref)
        self.pref = torch.tensor([v / total for v in pref])
        self.updates, self.batch, self.tau = updates, batch, tau
        self.noise, self.noise_decay, self.prefs_sampled = noise, noise_decay, prefs_sampled
        self.features = self._static_features()
        self.gen = torch.Generator().manual_seed(ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.actor = _mlp(FEATURES + m, 1, hidden)
            self.critic = _mlp(FEATURES + 1 + m, m, hidden)
            self.actor_t = _mlp(FEATURES + m, 1, hidden)
            self.critic_t = _mlp(FEATURES + 1 + m, m, hidden)
        self.actor_t.load_state_dict(self.actor.state_dict())
        self.critic_t.load_state_dict(self.critic.state_dict())
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.pending: dict[str, _Episode] = {}
        # replay buffer, one row per coordinate of every told policy
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in BUFFER}
        self.told = 0
        self.measured = 0  # told policies that were measured: the noise decays per one
        self.seeds = self.warm_start(warm) if warm_start else []

    # --- states and actions -------------------------------------------------------------

    def _static_features(self) -> torch.Tensor:
        """Per coordinate: position, kind one-hot, MACs and params share, choices."""
        macs = {lc.fqn: lc.macs for lc in self.space.layers}
        params = {lc.fqn: lc.params for lc in self.space.layers}
        sizes = {g.key: g.size for g in self.space.groups}
        tm, tp, ts = (max(sum(v.values()), 1) for v in (macs, params, sizes))
        most = max(self.sizes, default=1)
        rows = []
        dims = self.space.dims
        for i, d in enumerate(dims):
            kind = [1.0 if d.kind == k else 0.0 for k in KINDS]
            if d.kind == "keep":
                share = (sizes.get(d.name, 0) / ts, 0.0)
            else:
                share = (macs.get(d.name, 0) / tm, params.get(d.name, 0) / tp)
            rows.append([i / max(len(dims), 1), *kind, *share, len(d.choices) / most])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(dims), FEATURES - 2)

    def _state(self, i: int, prev: float, mean: float) -> torch.Tensor:
        return torch.cat([self.features[i], torch.tensor([prev, mean])])

    def _genes(self, actions: Sequence[float]) -> list[int]:
        return [min(n - 1, int(a * n)) for a, n in zip(actions, self.sizes, strict=True)]

    def _simplex(self, rows: int) -> torch.Tensor:
        """``rows`` preferences drawn uniformly from the simplex (normalised exponentials)."""
        e = -torch.log(torch.rand(rows, len(self.pref), generator=self.gen).clamp_min(1e-12))
        return e / e.sum(1, keepdim=True)

    def _sample_pref(self) -> torch.Tensor:
        """A training preference: the user's, moved halfway to a uniform random one."""
        return 0.5 * self.pref + 0.5 * self._simplex(1)[0]

    @torch.no_grad()
    def _rollout(self, pref: torch.Tensor, noise: float, fixed: Sequence[int] | None) -> _Episode:
        """Walk the coordinates; ``fixed``: genes to follow instead of the actor (a warm
        start, told as off-policy experience with each choice's mid action)."""
        states, actions = [], []
        prev, total = 0.0, 0.0
        for i, n in enumerate(self.sizes):
            s = self._state(i, prev, total / i if i else 0.0)
            if fixed is not None:
                a = (fixed[i] + 0.5) / n
            else:
                a = float(torch.sigmoid(self.actor(torch.cat([s, pref]))))
                a += noise * float(torch.randn(1, generator=self.gen))
                a = min(max(a, 0.0), 1.0 - 1e-6)
            states.append(s)
            actions.append(a)
            prev, total = a, total + a
        return _Episode(torch.stack(states), torch.tensor(actions).unsqueeze(1), pref)

    # --- ask / tell ---------------------------------------------------------------------

    def ask(self) -> Policy | None:
        if not self.sizes:
            self._finished = True
            return None
        if self.seeds:
            genes = self.seeds.pop(0)
            ep = self._rollout(self.pref, 0.0, genes)
        else:
            ep, genes = self._explore()
        policy = self.mark(genes)
        self.pending[policy.id] = ep
        return policy

    def _explore(self) -> tuple[_Episode, list[int]]:
        """A rollout under a sampled preference with the current noise; when it lands on a
        policy already asked, again with more noise (up to ``RETRIES`` times). Why: once the
        noise has decayed, a converged actor proposes the same policy, which the search
        replays from its cache for free, and the search would stop at its ask limit with
        budget left (``notes["stopped"]``) instead of measuring anything new."""
        sigma = self.noise * self.noise_decay**self.measured
        for attempt in range(RETRIES + 1):
            ep = self._rollout(self._sample_pref(), sigma + MIN_RETRY_NOISE * attempt, None)
            genes = self._genes(ep.actions.squeeze(1).tolist())
            if self.policy(genes).id not in self.seen:
                break
        return ep, genes

    def objectives(self, result: EvalResult) -> torch.Tensor:
        """The reward vector: relative metric (minus the drop's excess), then per limit
        minus its excess (0 when met)."""
        excess = {c.constraint: c.excess for c in result.checks}
        acc = relative_metric(result) - sum(c.excess for c in result.checks if c.cost == "drop")
        return torch.tensor([acc, *(-min(excess.get(k, 0.0), 1.0) for k in self.limits)])

    def tell(self, policy: Policy, result: EvalResult) -> None:
        ep = self.pending.pop(policy.id, None)
        if ep is None:  # a policy this agent did not ask (a replayed journal): its choices
            ep = self._rollout(self.pref, 0.0, self.space.encode(policy))
        r = self.objectives(result)
        n = len(ep.states)
        done = torch.zeros(n, 1)
        done[-1] = 1.0
        nxt = torch.cat([ep.states[1:], ep.states[-1:]])
        for key, value in (("s", ep.states), ("a", ep.actions), ("w", ep.pref.expand(n, -1)),
                           ("s2", nxt), ("done", done), ("ret", r.expand(n, -1))):  # fmt: skip
            self.buf[key].append(value)
        self.told += 1
        self.measured += int(result.evaluated)
        self._train()
        self.notes.update(told=self.told, preference=[round(float(v), 3) for v in self.pref],
                          objectives=["metric", *self.limits])  # fmt: skip

    # --- learning -----------------------------------------------------------------------

    def _envelope_target(self, s2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Q'(s2, mu'(s2, w*), w*)`` where ``w*`` maximises ``w . Q'`` over ``w`` and
        ``prefs_sampled`` random preferences."""
        b = len(w)
        cands = [w] + [self._simplex(b) for _ in range(self.prefs_sampled)]
        qs = []
        for wc in cands:
            a2 = torch.sigmoid(self.actor_t(torch.cat([s2, wc], 1)))
            qs.append(self.critic_t(torch.cat([s2, a2, wc], 1)))
        q = torch.stack(qs, 1)  # (b, K, m)
        best = (q * w.unsqueeze(1)).sum(2).argmax(1)
        return q[torch.arange(b), best]

    def _train(self) -> None:
        s, a, w, s2, done, ret = (torch.cat(self.buf[k]) for k in BUFFER)
        rows = len(s)
        for _ in range(self.updates):
            idx = torch.randint(rows, (min(self.batch, rows),), generator=self.gen)
            bs, ba, bw, bs2, bd, br = s[idx], a[idx], w[idx], s2[idx], done[idx], ret[idx]
            with torch.no_grad():
                boot = self._envelope_target(bs2, bw)
                y = bd * br + (1 - bd) * (MC_MIX * br + (1 - MC_MIX) * boot)
            q = self.critic(torch.cat([bs, ba, bw], 1))
            # the vector fit and its projection on the preference (the envelope paper's two
            # losses, equally weighted)
            loss_c = ((q - y) ** 2).mean() + (((q - y) * bw).sum(1) ** 2).mean()
            self.opt_c.zero_grad()
            loss_c.backward()
            self.opt_c.step()
            act = torch.sigmoid(self.actor(torch.cat([bs, bw], 1)))
            loss_a = -(self.critic(torch.cat([bs, act, bw], 1)) * bw).sum(1).mean()
            self.opt_a.zero_grad()
            loss_a.backward()
            self.opt_a.step()
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters(), strict=True):
                    pt.data.mul_(1 - self.tau).add_(self.tau * p.data)
