"""``edgeslim search``: search a model's per-layer policy, apply it, export it, report it.

The output folder holds ``journal.jsonl`` (written as the search runs: rerunning the same
command after a kill resumes from it), then ``policy.json`` (the chosen policy, when one
meets the constraints), ``model.onnx`` (that policy applied and exported, checked against
torch on several inputs), ``search.json`` (every evaluation, the uniform policies, the
latency table's error on the candidates timed whole, the test metric of the chosen model)
and one Pareto plot per constrained cost. With a latency limit, the policy kept is the best
one whose exported model meets the limit when timed whole (:mod:`edgeslim.search.verify`),
not only by the table; the command exits with status 1 when no policy is feasible (the files
are written all the same).

Decisions: a non-empty ``--out`` with a journal is a run to resume (the journal refuses a
different model, space, strategy or seed); one without is refused unless ``--force``, which
starts over. The uniform policies (same bits and keep ratio everywhere) are measured with
the same evaluator besides the budget, as the baselines the plots and ``search.json`` show.
The test metric (``task.measure``) is taken once, on the chosen model only; the search
itself reads validation data alone. ``finetune_epochs`` (default 0) fine-tunes each measured
policy briefly on the task's training data before scoring it (a small learning rate: BatchNorm
is folded by then); without it, pruned policies are scored as cut.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim.errors import EdgeslimError
from edgeslim.jsonfile import save_text
from edgeslim.search.choices import SpaceChoices
from edgeslim.search.constraints import Constraints

JOURNAL = "journal.jsonl"
DEFAULT_CHOICES = SpaceChoices()
EXECUTORS = ("local", "ray")


@dataclass
class SearchOutcome:
    """What ``edgeslim search`` wrote and measured."""

    summary: str
    feasible: bool
    files: dict[str, Path] = field(default_factory=dict)
    uniform: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, float] | None = None
    test_data: str = "held-out metric"  # or "validation": the samples the search chose on


def _check_out(out: Path, force: bool) -> None:
    from edgeslim.artifacts import check_out_folder, check_writable

    if out.exists() and force:
        if not out.is_dir():
            raise EdgeslimError(f"--out {out} exists and is not a folder; give a folder path")
        shutil.rmtree(out)
    if out.is_dir() and (out / JOURNAL).is_file():
        check_writable(out)  # resume: the journal is checked by the search itself
        return
    check_out_folder(out, force=False)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` items as strategy options. A value is read as JSON when it
    is JSON (``population=12``, ``trim=false``, ``preference=[0.7,0.3]``), as a list of
    JSON values when it holds commas (``preference=0.7,0.3``), from a JSON file when it
    starts with ``@`` (``start=@policy.json``: a saved policy), else as a string
    (``rank=hessian``)."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise EdgeslimError(
                f"--option {item!r}: write KEY=VALUE, e.g. --option population=12 or "
                "--option preference=0.7,0.3"
            )
        if key in options:
            raise EdgeslimError(f"--option {key} is given twice")
        options[key] = _option_value(key, raw.strip())
    return options


def _option_value(key: str, raw: str) -> Any:
    if raw.startswith("@"):
        from edgeslim.jsonfile import load_document

        return load_document(Path(raw[1:]), f"--option {key}: file", EdgeslimError, _json)
    try:
        return json.loads(raw)
    except ValueError:
        pass
    if "," in raw:
        return [_option_value(key, part.strip()) for part in raw.split(",")]
    return raw


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise EdgeslimError(f"not JSON ({exc})") from None


def _executor(name: str, workers: int) -> Any:
    if name not in EXECUTORS:
        raise EdgeslimError(f"--executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
    if name == "local":
        return None
    if workers < 1:
        raise EdgeslimError(f"--workers must be >= 1; got {workers}")
    from edgeslim.search.ray_executor import RayExecutor

    return RayExecutor(workers=workers)


def _uniform_rows(evaluator: Any, space: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    results, rows = [], []
    for policy in space.uniforms():
        r = evaluator.evaluate(policy)
        results.append(r)
        w = sorted(set(policy.weight_bits.values()))
        a = sorted({str(v) for v in policy.act_bits.values()})
        k = sorted(set(policy.keep.values()))
        measured = {key: v for key, v in r.to_dict().items() if key != "policy_id"}
        rows.append({"policy": policy.id, "w_bits": w, "a_bits": a, "keep": k, **measured})
    return results, rows


def finetune_config(task: Any, epochs: int, lr: float = 0.005) -> Any:
    """The short fine-tune of each scored policy (None when ``epochs`` is 0): a small
    learning rate without weight decay, since BatchNorm is folded by then."""
    from edgeslim.train.loop import TrainConfig

    if epochs < 0:
        raise EdgeslimError(f"finetune_epochs must be >= 0; got {epochs}")
    if epochs and task.train is None:
        raise EdgeslimError(
            "fine-tuning policies needs training data; this task has none (give data with "
            "training samples, or leave fine-tuning off)"
        )
    return TrainConfig(epochs=epochs, lr=lr, weight_decay=0.0) if epochs else None


STRUCTURE_SUFFIX = ".structure.json"  # beside a saved policy: what its model's structure is


def structure_path(policy_path: Path) -> Path:
    """Where the structure of the model a saved policy gives is written beside it
    (``policy.json`` -> ``policy.structure.json``)."""
    return policy_path.with_name(policy_path.stem + STRUCTURE_SUFFIX)


def check_structure(policy_path: Path, structure: dict[str, Any]) -> None:
    """Refuse ``structure`` (the policy applied in this space) when the structure saved
    beside the policy by the search that chose it differs: the same policy in a space of
    other choices (keep ratios, ``round_to``, criterion) cuts other channels. Nothing to
    compare with (a policy written by hand): accepted."""
    saved_path = structure_path(policy_path)
    if not saved_path.is_file():
        return
    from edgeslim.jsonfile import load_document

    saved = load_document(saved_path, "policy structure", EdgeslimError, _json)
    structure = json.loads(json.dumps(structure))  # compared as it reads back (lists, not tuples)
    differs = [k for k in ("plan", "removed_branches", "select", "edges")
               if saved.get(k) != structure.get(k)]  # fmt: skip
    if differs:
        raise EdgeslimError(
            f"{policy_path}: applied with these choices it gives another model than the one "
            f"its search chose ({', '.join(differs)} differ from {saved_path.name}); give the "
            "w_bits, a_bits, keep, round_to, criterion, skip, exclude and depth the search "
            "ran with"
        )


def search_task(
    model: Any,
    task: Any,
    constraints: Constraints,
    *,
    strategy: str,
    budget: int,
    seed: int,
    choices: SpaceChoices = DEFAULT_CHOICES,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.005,
    quick: bool = False,
    journal: Path | None = None,
    executor: Any = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """``(space, evaluator, latency predictor or None, SearchResult)``: the search the
    command line and the recipe stage both run (latency table when a constraint needs it,
    its best candidates then timed whole by :func:`~edgeslim.search.verify.verify_latency`;
    optional short fine-tune of each measured policy; ``executor`` is closed before that
    timing when it has a ``close``, so its workers do not share the cores; ``choices``: the space
    (:class:`~edgeslim.search.choices.SpaceChoices`); ``options``: the strategy's, checked by
    name before the space is built)."""
    from edgeslim.search import search
    from edgeslim.search.evaluate import Evaluator
    from edgeslim.search.strategies import check_options

    check_options(strategy, options or {})
    if not constraints.limits and constraints.max_drop is None:
        raise EdgeslimError(
            "give at least one constraint (e.g. size<=0.25x, latency<=0.6x) or a max drop"
        )
    finetune = finetune_config(task, finetune_epochs, finetune_lr)
    space = choices.build(model, task, seed)
    latency = None
    if constraints.needs_latency:
        from edgeslim.search.latency import LutLatency

        latency = LutLatency(space, repeats=20 if quick else 50, seconds=1.0 if quick else 8.0)
    evaluator = Evaluator(space, constraints, latency=latency, finetune=finetune)
    result = search(
        model, task, space, strategy=strategy, budget=budget, seed=seed, journal=journal,
        executor=executor, evaluator=evaluator, options=options,
    )  # fmt: skip
    if latency is not None:  # the table screened; the exported models decide
        from edgeslim.search.verify import verify_latency

        close = getattr(executor, "close", None)
        if callable(close):  # its worker processes would share the cores with the timing
            close()
        result = verify_latency(result, latency)
    return space, evaluator, latency, result


def run_search(
    model_name: str,
    out: Path,
    constraints: Sequence[str],
    *,
    checkpoint: Path | None = None,
    data: str | None = None,
    metric: str | None = None,
    input_shapes: tuple[tuple[int, ...], ...] = (),
    strategy: str = "evolutionary",
    budget: int = 40,
    seed: int = 0,
    max_drop: float | None = None,
    choices: SpaceChoices = DEFAULT_CHOICES,
    executor: str = "local",
    workers: int = 2,
    force: bool = False,
    quick: bool = False,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.005,
    dynamic_dims: tuple[tuple[int, ...], ...] = (),
    options: Mapping[str, Any] | None = None,
) -> SearchOutcome:
    """The command line's ``search`` (see module doc); validates everything first."""
    from edgeslim.compression import resolve_base
    from edgeslim.search.strategies import STRATEGIES, check_options
    from edgeslim.task import resolve_task

    parsed = Constraints.parse(list(constraints), max_drop)
    if not parsed.limits and parsed.max_drop is None:
        raise EdgeslimError(
            "give at least one --constraint (e.g. size<=0.25x, latency<=0.6x) or --max-drop"
        )
    if strategy not in STRATEGIES:
        raise EdgeslimError(
            f"unknown strategy {strategy!r}; available: {', '.join(STRATEGIES.names())}"
        )
    check_options(strategy, options or {})  # a SearchError names the options it takes
    if budget < 1:
        raise EdgeslimError(f"--budget must be >= 1; got {budget}")
    if finetune_epochs < 0:
        raise EdgeslimError(f"--finetune-epochs must be >= 0; got {finetune_epochs}")
    if choices.round_to < 1:
        raise EdgeslimError(f"--round-to must be >= 1; got {choices.round_to}")
    from edgeslim.prune.importance import check_criterion
    from edgeslim.quant.spec import BITS

    bad = [b for b in [*choices.w_bits, *choices.a_bits] if b is not None and b not in BITS]
    if bad:  # before any folder is made or model loaded
        raise EdgeslimError(f"--w-bits/--a-bits choices must be in 1..8; got {bad}")
    check_criterion(choices.criterion)
    out = Path(out)
    _check_out(out, force)
    runner = _executor(executor, workers)
    model = resolve_base(model_name, checkpoint)
    task = resolve_task(model_name, data, metric, input_shapes, quick, dynamic_dims)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        space, evaluator, latency, result = search_task(
            model, task, parsed, strategy=strategy, budget=budget, seed=seed, choices=choices,
            finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, quick=quick,
            journal=out / JOURNAL, executor=runner, options=options,
        )  # fmt: skip
    except BaseException:
        if made and not any(out.iterdir()):  # refused before any measurement: no folder left
            out.rmdir()
        raise
    uniform_results, uniform_rows = _uniform_rows(evaluator, space)
    payload: dict[str, Any] = {"search": result.to_dict(), "uniform": uniform_rows,
                               "command": {"model": model_name, "data": data,
                                           "constraints": parsed.to_list(), "budget": budget,
                                           "strategy": strategy, "seed": seed,
                                           "options": dict(options or {}),
                                           "choices": choices.to_dict(),
                                           "executor": executor}}  # fmt: skip
    outcome = SearchOutcome(result.summary(), result.feasible, uniform=uniform_rows)
    if latency is not None:  # the candidates verify_latency timed carry the table's error
        payload["latency_table"] = {"anchors_ms": latency.anchors,
                                    "anchor_windows": latency.anchor_windows,
                                    "measured": result.notes.get("latency_measured"),
                                    "kernels_cached": len(latency.table)}  # fmt: skip
    if result.policy is not None:
        outcome.files["policy"] = result.policy.save(out / "policy.json")
        outcome.files["structure"] = save_text(
            structure_path(out / "policy.json"),
            json.dumps(space.structure(result.policy), indent=1),
        )
        compressed = evaluator.prepare(result.policy)  # fine-tuned as it was scored
        warned: list[str] = []
        onnx_path, parity = _export(compressed, task, out / "model.onnx", warned)
        outcome.files["onnx"] = onnx_path
        payload["export"] = {"file": onnx_path.name, "parity": parity, "warnings": warned}
        # agreement, or a metric on the validation samples themselves, scores the data the
        # search chose on: the record says so instead of calling it a test figure
        task.bind_reference(model)
        outcome.test_metrics = task.measure(compressed)
        held_out = task.evaluate is not None and not task.evaluate_on_validation
        outcome.test_data = "held-out metric" if held_out else "validation"
        payload["test_metrics"] = outcome.test_metrics
        payload["test_metrics_data"] = outcome.test_data
        payload["test_metrics_uncompressed"] = task.measure(model)
    from edgeslim.search.plots import plot_search

    for path in plot_search(result, uniform_results, out):
        outcome.files[path.stem] = path
    (out / "search.json").write_text(json.dumps(payload, indent=1, default=str))
    outcome.files["search"] = out / "search.json"
    outcome.files["journal"] = out / JOURNAL
    return outcome


SEARCH_REMEDY = (
    "search with 7 in place of 8 among the weight bits (--w-bits 4,6,7; w_bits in a search "
    "stage): 7-bit weights in int8, which cannot overflow"
)


def _export(model: Any, task: Any, path: Path, warned: list[str]) -> tuple[Path, dict[str, Any]]:
    """The chosen model as ONNX (int8 QDQ when quantized), with the task's dynamic axes, checked
    against torch on the example, calibration, validation and perturbed inputs; a file that
    computes differently on this CPU (saturating int8 kernels) is warned about in ``warned``."""
    from edgeslim.compression import _parity_sources, saturation_note
    from edgeslim.export.verify import check_parity, export_module, task_axes
    from edgeslim.runtime.ort import ort_session

    module = task.module(model).eval()
    export_module(module, task.example_inputs, path, task_axes(task, module))
    parity = check_parity(module, ort_session(path), _parity_sources(task))
    saturation_note(module, parity, warned, SEARCH_REMEDY)
    return path, {"inputs_checked": parity.inputs_checked, "max_abs_diff": parity.max_abs_diff,
                  "max_rel_diff": parity.max_rel_diff, "sources": parity.sources}  # fmt: skip
