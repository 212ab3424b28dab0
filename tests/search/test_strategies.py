"""Every strategy returns a feasible policy on the digits CNN; seeded strategies repeat
themselves exactly; accuracy-aware mode gives layers back until ``max_drop`` holds."""

from __future__ import annotations

import statistics

import pytest
from torch import nn

from edgeslim.search import (
    STRATEGIES,
    Constraints,
    Context,
    EvalResult,
    Evaluator,
    Policy,
    SearchError,
    SearchResult,
    SearchSpace,
    make_strategy,
    search,
)
from edgeslim.search.constraints import Check
from edgeslim.search.strategies import check_options, strategy_options
from edgeslim.search.strategies.accuracy_aware import AccuracyAware
from edgeslim.task import Task

CONSTRAINTS = ["size<=0.2x"]
MAX_DROP = 2.0
STOCHASTIC = ["random", "evolutionary", "abc", "reinforce", "envelope_ddpg"]


@pytest.fixture(scope="module")
def space46(digits_model: nn.Module, digits_task: Task) -> SearchSpace:
    """Weight bits 4/6/8 and keep 0.75/1 per group: 1,944 policies, about a quarter of the
    size-feasible ones within 2 points (pruning conv1's or conv2's group costs more)."""
    return SearchSpace.build(
        digits_model, digits_task, w_bits=(4, 6, 8), keep=(0.75, 1.0), calibration=128
    )


_runs: dict[str, SearchResult] = {}


def _run(space: SearchSpace, name: str) -> SearchResult:
    if name not in _runs:
        _runs[name] = search(
            space.model, space.task, space, CONSTRAINTS, name, budget=20, seed=0,
            max_drop=MAX_DROP, batch=1, progress=False,
        )  # fmt: skip
    return _runs[name]


def test_every_builtin_strategy_is_registered() -> None:
    import edgeslim.search.strategies  # noqa: F401

    peers = {"optuna-tpe", "optuna-nsga2"}  # registered when optuna is installed
    assert set(STRATEGIES) - peers == {*STOCHASTIC, "greedy", "dp", "accuracy_aware"}


@pytest.mark.parametrize("name", [*STOCHASTIC, "greedy", "dp"])
def test_strategy_returns_a_feasible_policy(
    space46: SearchSpace, digits_task: Task, name: str
) -> None:
    calls = digits_task.evaluate.calls  # type: ignore[union-attr]
    result = _run(space46, name)
    assert result.feasible, result.summary()
    assert result.best is not None and not result.best.probe and result.best.counted
    assert result.measured <= 20 and result.first_feasible is not None
    # re-checked from scratch: the constraints really hold for the returned policy
    fresh = Evaluator(space46, CONSTRAINTS, max_drop=MAX_DROP)
    assert all(c.ok for c in fresh.checks(result.best.policy))
    size = space46.costs(result.best.policy).size / space46.baseline_costs().size
    assert size <= 0.2
    drop = result.best.result.drop
    assert drop is not None and drop <= MAX_DROP
    assert digits_task.evaluate.calls == calls  # type: ignore[union-attr]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_asks_the_same_sequence(space46: SearchSpace, name: str) -> None:
    """A fresh strategy with the same seed, told the recorded results, asks exactly the
    recorded policies (batch 1: ask, tell, ask ...)."""
    result = _run(space46, name)
    ev = Evaluator(space46, CONSTRAINTS, max_drop=MAX_DROP)
    strat = make_strategy(name, Context(space46, ev.constraints, 0, ev.checks))
    for e in result.evaluations:
        policy = strat.ask()
        assert policy is not None and policy.id == e.policy.id
        strat.tell(policy, e.result)
    # the seed matters (the warm start, when on, asks the same uniform policies first)
    cold = {} if name == "random" else {"warm_start": False}
    other = make_strategy(name, Context(space46, ev.constraints, 1, ev.checks), **cold)
    first = make_strategy(name, Context(space46, ev.constraints, 0, ev.checks), **cold).ask()
    assert first is not None and other.ask() != first


def test_random_levels_spread_the_compression_that_uniform_draws_concentrate(
    space46: SearchSpace,
) -> None:
    """Drawn coordinate by coordinate, the share of compressed coordinates stays near its
    mean (the more coordinates, the nearer); drawn level first, it spans none to all, and
    every coordinate is still compressed about equally often."""
    ev = Evaluator(space46, CONSTRAINTS, max_drop=MAX_DROP)
    top = space46.top()

    def shares(sampler: str) -> tuple[list[float], list[int]]:
        strat = make_strategy("random", Context(space46, ev.constraints, 0, ev.checks),
                              sampler=sampler)  # fmt: skip
        out, per_dim = [], [0] * len(top)
        for _ in range(200):
            policy = strat.ask()
            assert policy is not None
            genes = space46.encode(policy)
            moved = [g < t for g, t in zip(genes, top, strict=True)]
            out.append(sum(moved) / len(top))
            per_dim = [c + m for c, m in zip(per_dim, moved, strict=True)]
        return out, per_dim

    uniform, _ = shares("uniform")
    levels, per_dim = shares("levels")
    assert statistics.pstdev(levels) > 1.3 * statistics.pstdev(uniform)
    assert min(levels) == 0.0 and max(levels) == 1.0
    assert min(per_dim) > 0.6 * max(per_dim)  # no coordinate favoured


@pytest.mark.parametrize("name", ["evolutionary", "abc", "reinforce", "envelope_ddpg"])
def test_a_warm_start_asks_the_analytically_feasible_uniform_policies_first(
    space46: SearchSpace, name: str
) -> None:
    ev = Evaluator(space46, CONSTRAINTS, max_drop=MAX_DROP)
    strat = make_strategy(name, Context(space46, ev.constraints, 0, ev.checks))
    ok = [p for p in space46.uniforms() if all(c.ok for c in ev.checks(p))]
    assert ok and len(ok) < len(space46.uniforms())  # the constraints rule some out
    seeds = len(strat.notes["warm_start"])
    assert seeds == min(len(ok), 4 if name != "evolutionary" else 8)
    asked = [strat.ask() for _ in range(seeds)]
    assert all(p is not None for p in asked)
    assert {p.id for p in asked if p is not None} <= {p.id for p in ok}
    bops = [space46.costs(p).bops for p in asked if p is not None]
    assert bops == sorted(bops)  # most compressed first
    every = sorted(space46.costs(p).bops for p in ok)
    # the most and the least compressed of them are always among the seeds
    assert bops[0] == every[0] and bops[-1] == every[-1]


def test_a_warm_start_spreads_its_seeds_over_the_compression_range(
    space46: SearchSpace,
) -> None:
    """Two seeds out of more feasible uniforms: the most and the least compressed; one
    seed: the least compressed (the likeliest to hold an accuracy limit)."""
    ev = Evaluator(space46, ["size<=0.5x"], max_drop=MAX_DROP)
    ctx = Context(space46, ev.constraints, 0, ev.checks)
    ok = sorted(
        (p for p in space46.uniforms() if all(c.ok for c in ev.checks(p))),
        key=lambda p: (space46.costs(p).bops, space46.costs(p).size),
    )
    assert len(ok) > 2
    two = make_strategy("abc", ctx, sources=2)
    assert [two.ask(), two.ask()] == [ok[0], ok[-1]]
    one = make_strategy("reinforce", ctx, warm=1)
    assert one.ask() == ok[-1]


def test_sensitivity_strategies_measure_then_decide(space46: SearchSpace) -> None:
    """Hessian mode (greedy's default) probes only the keep coordinates; probe mode (dp
    here) one probe per coordinate; both decide after the probes."""
    greedy = _run(space46, "greedy")
    dp = search(
        space46.model, space46.task, space46, CONSTRAINTS, "dp", budget=20, seed=0,
        max_drop=MAX_DROP, batch=1, progress=False, options={"sensitivity": "probe"},
    )  # fmt: skip
    dims = len(space46.dims)
    keeps = sum(d.kind == "keep" for d in space46.dims)
    assert 0 < keeps < dims
    for result, probed in ((greedy, keeps), (dp, dims)):
        assert result.feasible, result.summary()
        probes = [e for e in result.evaluations if e.probe]
        assert len(probes) == probed + 1  # the least compressed policy and one per probe
        assert len(result.notes["sensitivity"]) == dims
        # then the decided policy, then next-best allocations while the budget lasts
        after = result.evaluations[len(probes) :]
        assert after[0].policy.id == result.notes["chosen"] and not any(e.probe for e in after)
        assert len(after) == min(1 + result.notes["neighbours"], 20 - len(probes))
        feasible = [e.result.metric for e in after if e.result.feasible]
        assert result.best is not None and result.best.result.metric == max(feasible)  # type: ignore[type-var]
    # pruning conv1's group alone costs more than pruning conv4's (measured, not assumed)
    s = greedy.notes["sensitivity"]
    assert s["keep[conv1]"] > s["keep[conv4]"]
    assert dp.notes["dp_constraint"] == "size<=0.2x"
    assert set(greedy.notes["hessian_trace_per_weight"]) == {
        d.name for d in space46.dims if d.kind == "w_bits"
    }


@pytest.mark.parametrize("name", ["greedy", "dp"])
def test_refine_asks_the_chosen_policys_neighbours_within_the_limits_in_predicted_order(
    space46: SearchSpace, name: str
) -> None:
    """After the decided policy, its neighbours (one coordinate given a choice back, the
    limits restored by compressing others): every one within the analytic limits, none
    asked twice, in the order of predicted total sensitivity; refine=False stops at the
    decided policy."""
    ev = Evaluator(space46, CONSTRAINTS, max_drop=MAX_DROP)
    strat = make_strategy(name, Context(space46, ev.constraints, 0, ev.checks, 40))
    asked: list[Policy] = []
    while (policy := strat.ask()) is not None:
        asked.append(policy)  # probes are measured whatever the limits (as the loop does)
        strat.tell(policy, ev.measure(policy) if strat.is_probe(policy) else ev.evaluate(policy))
    assert strat.finished
    chosen = next(i for i, p in enumerate(asked) if p.id == strat.notes["chosen"])
    alternatives = asked[chosen + 1 :]
    assert alternatives and len(alternatives) == strat.notes["neighbours"]
    assert len({p.id for p in asked}) == len(asked)
    assert all(all(c.ok for c in ev.checks(p)) for p in alternatives)
    sens = [strat.predicted(space46.encode(p)) for p in alternatives]  # type: ignore[attr-defined]
    assert sens == sorted(sens)
    plain = make_strategy(name, Context(space46, ev.constraints, 0, ev.checks, 40), refine=False)
    while (policy := plain.ask()) is not None:
        plain.tell(policy, ev.measure(policy) if plain.is_probe(policy) else ev.evaluate(policy))
    assert plain.finished and plain.notes["chosen"] == strat.notes["chosen"]
    # the neighbours' repairs leave the decided policy's notes as they were
    assert "unmet" not in strat.notes and strat.notes["greedy_steps"] == plain.notes["greedy_steps"]
    assert "neighbours" not in plain.notes
    with pytest.raises(SearchError, match="refine must be true or false"):
        make_strategy(name, Context(space46, ev.constraints, 0, ev.checks), refine="yes")


def test_accuracy_aware_gives_layers_back_until_max_drop_holds(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """From 2-bit weights everywhere (the network collapses), 8-bit is given back to the
    most sensitive layers one at a time (NNCF's steps, no trim); it stops at the first
    policy within 3 points."""
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    result = search(
        digits_model, digits_task, sp, None, "accuracy_aware", budget=20, max_drop=3.0,
        progress=False, options={"steps": "linear", "trim": False, "rank": "alone"},
    )  # fmt: skip
    notes = result.notes
    assert result.feasible and notes["max_drop_met"], result.summary()
    assert notes["start_drop"] > 50
    back = notes["given_back"]
    assert 0 < notes["given_back_count"] == len(back) < len(sp.layers)
    order = sorted(notes["sensitivity"], key=lambda u: -notes["sensitivity"][u])
    assert back == order[: len(back)]  # most sensitive first
    steps = [e for e in result.evaluations if not e.probe]
    assert len(steps) == 1 + len(back)  # the start, then one measurement per layer back
    assert [e.result.feasible for e in steps] == [False] * len(back) + [True]
    best = result.best
    assert best is not None and best.policy == steps[-1].policy
    assert best.result.drop is not None and best.result.drop <= 3.0
    restored = {f"layer:{k}" for k, b in best.policy.weight_bits.items() if b == 8}
    assert restored == set(back)


def test_accuracy_aware_gallops_then_trims_to_fewer_layers_within_max_drop(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """The default procedure (1, 2, 4, ... layers back, bisect, then compress again every
    layer not needed) ends within max_drop with no more layers back than NNCF's steps,
    and reports that last policy, not the most accurate one it met on the way."""
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(2, 8), keep=(1.0,), calibration=128)
    runs = {
        name: search(
            digits_model, digits_task, sp, None, "accuracy_aware", budget=30, max_drop=3.0,
            progress=False, options=opts,
        )
        for name, opts in (("nncf", {"steps": "linear", "trim": False}), ("default", {}))
    }  # fmt: skip
    nncf, ours = runs["nncf"], runs["default"]
    assert ours.feasible and ours.notes["max_drop_met"], ours.summary()
    # auto: weights-only compression is ranked by the Hessian estimate, with no probe
    assert ours.notes["rank"] == "hessian"
    assert not any(e.probe for e in ours.evaluations)
    back = ours.notes["given_back"]
    assert len(back) <= nncf.notes["given_back_count"]
    best = ours.best
    assert best is not None and best.result.drop is not None and best.result.drop <= 3.0
    restored = {f"layer:{k}" for k, b in best.policy.weight_bits.items() if b == 8}
    assert restored == set(back)
    for unit in ours.notes["trimmed"]:  # compressed again, so not in the answer
        assert unit not in back
    feasible = [e for e in ours.evaluations if not e.probe and e.result.feasible]
    assert best.policy == feasible[-1].policy  # the last within max_drop: fewest back


def _scripted(space: SearchSpace, opts: dict[str, object]) -> tuple[AccuracyAware, list[str]]:
    """Drive accuracy_aware by hand on a scripted drop: conv1 and conv2 cost 4 points only
    when both are compressed, conv3 costs 1 alone; max_drop 1.5. Each layer alone looks
    harmless except conv3, so ``alone`` ranks conv3 first: its give-back is wasted."""
    cons = Constraints.parse(None, 1.5)
    strat = AccuracyAware(Context(space, cons, 0, lambda p: ()), **opts)  # type: ignore[arg-type]
    asked = []
    while (policy := strat.ask()) is not None:
        low = {k for k, b in policy.weight_bits.items() if b == 2}
        drop = 4.0 * ({"conv1", "conv2"} <= low) + 1.0 * ("conv3" in low)
        result = EvalResult(
            policy.id, True, 100.0 - drop, 100.0, space.baseline_costs(), {}, (),
            drop <= 1.5, max(0.0, drop - 1.5),
        )  # fmt: skip
        asked.append(policy.id)
        strat.tell(policy, result)
    assert strat.finished
    return strat, asked


def test_accuracy_aware_trim_compresses_again_a_layer_given_back_in_vain(
    digits_model: nn.Module, digits_task: Task
) -> None:
    sp = SearchSpace.build(
        digits_model, digits_task, w_bits=(2, 8), a_bits=(4, 8), keep=(1.0,), calibration=64
    )
    nncf, _ = _scripted(sp, {"rank": "alone", "steps": "linear", "trim": False})
    ours, _ = _scripted(sp, {"rank": "alone"})
    assert nncf.notes["given_back"][0] == "layer:conv3"
    assert len(nncf.notes["given_back"]) == 2 and nncf.notes["max_drop_met"]
    assert ours.notes["trimmed"] == ["layer:conv3"]
    assert len(ours.notes["given_back"]) == 1 and ours.notes["max_drop_met"]
    assert ours.answer is not None and ours.answer.weight_bits["conv3"] == 2
    # auto: activation bits are compressed too (no Hessian price for them) and the start
    # keeps 95 of 100, so restore
    restore, _ = _scripted(sp, {})
    assert restore.notes["rank"] == "restore" and restore.notes["given_back_count"] == 1


def test_accuracy_aware_starts_from_a_uniform_policy_when_the_most_compressed_breaks_a_limit(
    space46: SearchSpace,
) -> None:
    """A limit that pruning breaks (as latency can on a small model): the start moves to
    the most compressed uniform policy within it, instead of stopping with nothing."""

    def no_pruning(policy: Policy) -> tuple[Check, ...]:
        ok = all(k == 1.0 for k in policy.keep.values())
        return (Check("latency<=0.6x", "latency", 0.5 if ok else 0.7, 0.6, ok, 0.0),)

    cons = Constraints.parse(None, MAX_DROP)
    strat = AccuracyAware(Context(space46, cons, 0, no_pruning))
    first = strat.ask()
    assert first is not None and all(k == 1.0 for k in first.keep.values())
    assert set(first.weight_bits.values()) == {4}  # still the fewest bits
    assert "started from" in strat.notes["start_moved"]


def test_unknown_strategy_and_options_fail_clearly(space46: SearchSpace) -> None:
    ev = Evaluator(space46, CONSTRAINTS)
    ctx = Context(space46, ev.constraints, 0, ev.checks)
    with pytest.raises(SearchError, match="unknown search strategy 'nsga'; registered: abc"):
        make_strategy("nsga", ctx)
    with pytest.raises(SearchError, match=r"strategy 'evolutionary'.*population_size") as info:
        make_strategy("evolutionary", ctx, population_size=4)
    assert "population (default 8)" in str(info.value)  # the options it does take
    with pytest.raises(SearchError, match="its options: sampler"):
        make_strategy("random", ctx, population=4)
    with pytest.raises(SearchError, match="sampler 'sobol' is not one of levels, uniform"):
        make_strategy("random", ctx, sampler="sobol")
    with pytest.raises(SearchError, match="needs an accuracy limit"):
        make_strategy("accuracy_aware", ctx)


def test_accuracy_aware_gives_back_one_choice_at_a_time_when_a_limit_binds(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """A limit that holds conv1 at 8 bits or three layers at 4: the full plan moves conv1
    to 8 bits and can move nothing else; the step plan moves the three most sensitive
    layers 2 -> 4 bits."""
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(2, 4, 8), keep=(1.0,), calibration=64)

    def budget(policy: Policy) -> tuple[Check, ...]:
        extra = sum({2: 0, 4: 1, 8: 3}[b] for b in policy.weight_bits.values())
        return (Check("size<=x", "size", float(extra), 2.0, extra <= 3, 0.0),)

    cons = Constraints.parse(None, 1.0)
    order = ["layer:conv1", "layer:conv2", "layer:conv3"]
    for give, want in (("full", "full"), ("auto", "step"), ("step", "step")):
        strat = AccuracyAware(Context(sp, cons, 0, budget), rank="restore", give=give)
        assert set(order) <= set(strat.units)
        strat.order = [*order, *(u for u in strat.units if u not in order)]
        strat._plan()
        assert strat.notes["give"] == want
        last = strat.policy(strat.prefixes[-1]).weight_bits
        if want == "full":
            assert strat.moved == ["layer:conv1"] and last["conv1"] == 8
            assert "layer:conv2" in strat.skipped
        else:
            assert strat.moved == order
            assert last["conv1"] == last["conv2"] == last["conv3"] == 4
    with pytest.raises(SearchError, match="give must be one of"):
        AccuracyAware(Context(sp, cons, 0, budget), give="half")


def test_accuracy_aware_step_plan_retries_a_unit_a_limit_blocked_earlier(
    digits_model: nn.Module, digits_task: Task
) -> None:
    """Latency is not monotonic in what is given back (restoring one pruned group while
    the others stay pruned can be slower than restoring them all): a unit blocked on one
    pass is tried again on the next."""
    sp = SearchSpace.build(digits_model, digits_task, w_bits=(2, 4, 8), keep=(1.0,), calibration=64)

    def coupled(policy: Policy) -> tuple[Check, ...]:
        bits = policy.weight_bits
        ok = not (bits["conv2"] > 2 and bits["conv1"] == 2)  # conv2 waits for conv1
        return (Check("latency<=x", "latency", 0.0 if ok else 1.0, 0.5, ok, 0.0),)

    strat = AccuracyAware(Context(sp, Constraints.parse(None, 1.0), 0, coupled), give="step")
    strat.order = ["layer:conv2", "layer:conv1", *(u for u in strat.units if u not in
                   ("layer:conv1", "layer:conv2"))]  # fmt: skip
    strat._plan()
    assert "layer:conv2" in strat.moved and "layer:conv2" not in strat.skipped
    assert strat.moved.index("layer:conv1") < strat.moved.index("layer:conv2")
    assert strat.policy(strat.prefixes[-1]).weight_bits["conv2"] == 8


@pytest.mark.parametrize("name", [*STOCHASTIC, "greedy", "dp", "accuracy_aware"])
def test_strategy_options_are_the_constructor_keywords_after_the_context(name: str) -> None:
    import inspect

    options = strategy_options(name)
    params = inspect.signature(STRATEGIES.get(name)).parameters
    assert "ctx" not in options and list(options) == list(params)[1:]
    assert all(options[k] == params[k].default for k in options)
    check_options(name, dict.fromkeys(options))  # every listed name is accepted
    with pytest.raises(SearchError, match="has no option 'nope'"):
        check_options(name, {"nope": 1})


def test_accuracy_aware_prices_keep_ratios_when_their_probes_would_not_fit_the_budget(
    space46: SearchSpace,
) -> None:
    """The start, the top policy, one probe per group and a gallop over every unit (log2
    of them, plus one) fit the budget: the groups are probed; one measurement fewer: they
    are priced from the Hessian estimate, with no probe at all."""
    import math

    def run(budget: int) -> SearchResult:
        return search(
            space46.model, space46.task, space46, CONSTRAINTS, "accuracy_aware",
            budget=budget, seed=0, max_drop=MAX_DROP, batch=1, progress=False,
        )  # fmt: skip

    groups = sum(d.kind == "keep" for d in space46.dims)
    roomy = run(40)
    units = roomy.notes["units"]
    assert units > groups > 0
    need = 2 + groups + math.ceil(math.log2(units + 1)) + 1
    enough, short = run(need), run(need - 1)
    for probed in (roomy, enough):
        assert "keep_priced" not in probed.notes
        assert sum(e.probe for e in probed.evaluations) == groups + 1  # and the top policy
    assert f"budget of {need - 1}" in short.notes["keep_priced"]
    assert short.notes["rank"] == "hessian"
    assert not any(e.probe for e in short.evaluations)
    assert short.feasible, short.summary()
