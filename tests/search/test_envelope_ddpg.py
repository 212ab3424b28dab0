"""The envelope DDPG strategy: its reward vector, its preference, and that it learns.

The learning tests tell the agent synthetic results (a metric that rewards the least
compressed choices, a size limit that rewards the most compressed): what they check is
the agent's own update, which no real measurement would make faster to test.
"""

from __future__ import annotations

import pytest

from edgeslim.search import Constraints, Context, EvalResult, SearchError, SearchSpace
from edgeslim.search.constraints import Check
from edgeslim.search.space import Costs
from edgeslim.search.strategies.envelope_ddpg import EnvelopeDDPG

LIMIT = "size<=0.2x"


def _ctx(space: SearchSpace, limits: tuple[str, ...] = (LIMIT,), seed: int = 0) -> Context:
    return Context(space, Constraints.parse(list(limits)), seed, lambda p: ())


def _result(
    policy_id: str, metric: float | None, size_excess: float = 0.0, drop_excess: float = 0.0
) -> EvalResult:
    checks = [Check(LIMIT, "size", 0.2 + size_excess, 0.2, size_excess == 0, 0.0, size_excess)]
    if drop_excess:
        checks.append(Check("drop<=1", "drop", 2.0, 1.0, False, 2.0, drop_excess))
    feasible = all(c.ok for c in checks)
    return EvalResult(
        policy_id, metric is not None, metric, 90.0, Costs(1, 1, 1, 1), {}, tuple(checks),
        feasible, sum(c.excess for c in checks),
    )  # fmt: skip


def test_reward_vector_is_metric_then_each_limit(space: SearchSpace) -> None:
    agent = EnvelopeDDPG(_ctx(space))
    r = agent.objectives(_result("a", 81.0, size_excess=0.3, drop_excess=0.05))
    assert r.tolist() == pytest.approx([0.9 - 0.05, -0.3])
    rejected = agent.objectives(_result("b", None, size_excess=2.5))
    assert rejected.tolist() == pytest.approx([0.0, -1.0])  # excess capped at 1


def test_preference_is_validated_with_the_objectives_named(space: SearchSpace) -> None:
    with pytest.raises(SearchError, match=r"2 weights .*metric, then size<=0.2x"):
        EnvelopeDDPG(_ctx(space), preference=[1.0])
    with pytest.raises(SearchError, match="not all 0"):
        EnvelopeDDPG(_ctx(space), preference=[0.0, 0.0])
    agent = EnvelopeDDPG(_ctx(space), preference=[3.0, 1.0])
    assert agent.pref.tolist() == pytest.approx([0.75, 0.25])


def _greedy_mean(agent: EnvelopeDDPG, pref: list[float]) -> float:
    """Mean action of a noise-free rollout under ``pref``."""
    import torch

    ep = agent._rollout(torch.tensor(pref), 0.0, None)
    return float(ep.actions.mean())


def _train(agent: EnvelopeDDPG, space: SearchSpace, asks: int) -> None:
    """Metric = share of coordinates at their top choice; size excess = the same share:
    the two objectives pull the actions apart."""
    top = space.top()
    for _ in range(asks):
        policy = agent.ask()
        assert policy is not None
        genes = space.encode(policy)
        share = sum(g == t for g, t in zip(genes, top, strict=True)) / len(top)
        agent.tell(policy, _result(policy.id, 90.0 * share, size_excess=share))


def test_the_preference_steers_what_the_agent_learned(space: SearchSpace) -> None:
    agent = EnvelopeDDPG(_ctx(space), warm_start=False, updates=40)
    _train(agent, space, 40)
    metric_first = _greedy_mean(agent, [1.0, 0.0])
    size_first = _greedy_mean(agent, [0.0, 1.0])
    assert metric_first > 0.6 > 0.4 > size_first, (metric_first, size_first)


def test_same_seed_same_asks_and_seed_matters(space: SearchSpace) -> None:
    a, b = EnvelopeDDPG(_ctx(space), warm_start=False), EnvelopeDDPG(_ctx(space), warm_start=False)
    _train(a, space, 6)
    _train(b, space, 6)
    pa, pb = a.ask(), b.ask()
    assert pa is not None and pb is not None and pa.id == pb.id
    other = EnvelopeDDPG(_ctx(space, seed=1), warm_start=False)
    firsts = {EnvelopeDDPG(_ctx(space), warm_start=False).ask(), other.ask()}
    assert len(firsts) == 2


def test_a_converged_actor_still_proposes_policies_not_asked_before(space: SearchSpace) -> None:
    """With no exploration noise left, the actor alone would repeat itself; repeats are
    retried with more noise, so asks keep reaching new policies."""
    agent = EnvelopeDDPG(_ctx(space), warm_start=False, noise=0.0)
    ids = []
    for _ in range(6):
        policy = agent.ask()
        assert policy is not None
        ids.append(policy.id)
        agent.tell(policy, _result(policy.id, 80.0))
    assert len(set(ids)) == len(ids)
