"""Suite ``prune``: structured pruning at MACs targets, every method on the same footing.

Per model (``resnet20``, ``vgg-small``, ``mobilenetv2-small``) and MACs-reduction target
(30%, 50%, 70%), in one process:

- every edgeslim importance criterion, global ranking, kept widths rounded to 8;
- the peer ``torch-pruning:magnitude`` (Torch-Pruning's ``MetaPruner`` with
  ``MagnitudeImportance(p=1)``, global, ``round_to=8``) searched to the same target;
- each pruned model evaluated as pruned (``finetune_epochs: 0``) and after the same short
  fine-tune with distillation from the unpruned model (``finetune_epochs: 1``);
- latency at batch 1 in torch and in ONNX Runtime, every pruned architecture interleaved
  with the fp32 model in one :func:`~edgeslim.cost.compare_latency` call per model;
- ``minilm``: heads and FFN neurons removed at 25% and 50%, cosine to fp32
  (:mod:`edgeslim.bench.prune_text`).

Top-1 is on the Fashion-MNIST test split (all 10k; 2k with ``--quick``); the torch record
of a fine-tuned model carries its torch top-1, the onnxruntime record the top-1 of its
exported ONNX graph. ``extra.macs_reduction`` is the reduction actually reached (counted by
edgeslim's layer table on the pruned model), next to the target in ``config``.

Methods are entries of :data:`METHODS`, ``name -> (model, PruneJob) -> pruned copy``; the
suite adds the fine-tune, evaluation and latency around them. A method that trains
(``edgeslim:gates``, learned gates) gets the suite's fine-tune budget in ``job``
(``job.train_batches()``, ``job.finetune``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.bench.records import Record
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import compare_latency, ort_runner, size_bytes, torch_runner
from edgeslim.data import Split, TensorBatches, load_fashion_mnist
from edgeslim.data.batching import augmented_batches
from edgeslim.export import export_onnx
from edgeslim.graph import layer_table, total_macs
from edgeslim.runtime.ort import ort_session, ort_top1
from edgeslim.train.loop import TrainConfig, evaluate
from edgeslim.zoo import load_zoo_model

DEFAULT_MODELS = ["resnet20", "vgg-small", "mobilenetv2-small", "minilm"]
QUICK_MODELS = ["resnet20", "minilm"]
TARGETS = (0.3, 0.5, 0.7)
QUICK_TARGETS = (0.5,)
ROUND_TO = 8
CRITERIA = ("l1", "l2", "fpgm", "taylor", "nisp", "filtersketch", "epruner", "random")
QUICK_METHODS = (
    "edgeslim:l1", "edgeslim:fpgm", "edgeslim:taylor", "edgeslim:gates", "torch-pruning:magnitude",
)  # fmt: skip
# The shared fine-tune: one epoch over a fixed subset of the train split, KD from fp32.
# 5k images keep the full run (90 pruned models, each fine-tuned) near an hour on 2 cores;
# `edgeslim zoo prune` and the recipes use 10k.
FINETUNE_IMAGES = 5_000
QUICK_FINETUNE_IMAGES = 2_000
KD_ALPHA = 0.9
# Measured on resnet20 at -50% MACs (l1, 10k images): batch 32 / lr 0.005 gave 92.96% top-1,
# batch 64 / lr 0.01 92.61%, and 20k images at batch 32 no better (92.91%).
FINETUNE = TrainConfig(epochs=1, lr=0.005, batch_size=32)


@dataclass(frozen=True)
class PruneJob:
    """What a pruning method is asked for, and the data it may learn from."""

    model_name: str
    macs_reduction: float
    round_to: int
    example: torch.Tensor
    train: TensorBatches  # the fine-tune subset; a method that trains (gates) uses this budget
    finetune: TrainConfig
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # a method's notes, kept in the record

    def train_batches(self) -> TensorBatches:
        """``train`` afresh: its shuffling and augmentation restart from its seed, so every
        training run sees the same batches whichever method trained before it."""
        return self.train.rebatched(self.train.batch_size)


PruneMethod = Callable[[nn.Module, PruneJob], nn.Module]
METHODS: dict[str, PruneMethod] = {}
DATA_USED: dict[str, str] = {}


def register_method(name: str, data_used: str = "none") -> Callable[[PruneMethod], PruneMethod]:
    """Add a method (``"<tool>:<name>"``) that returns a pruned copy of the model it gets."""

    def add(fn: PruneMethod) -> PruneMethod:
        if name in METHODS:
            raise ValueError(f"prune method {name!r} is already registered")
        METHODS[name] = fn
        DATA_USED[name] = data_used
        return fn

    return add


def edgeslim_method(criterion: str) -> PruneMethod:
    """Global ranking with ``criterion`` to the job's MACs target (a pruned copy)."""

    def run(model: nn.Module, job: PruneJob) -> nn.Module:
        from edgeslim.prune.planner import build_importance, prune_

        importance = build_importance(criterion, job.train, job.seed)
        pruned, plan = prune_(
            copy.deepcopy(model).eval(), (job.example,), importance,
            macs_reduction=job.macs_reduction, round_to=job.round_to,
        )  # fmt: skip
        job.info["kept"] = {k: f"{len(v)}/{plan.sizes[k]}" for k, v in plan.keep.items()}
        return pruned

    return run


for _c in CRITERIA:
    register_method(f"edgeslim:{_c}", "train" if _c == "taylor" else "none")(edgeslim_method(_c))


@register_method("torch-pruning:magnitude")
def _torch_pruning(model: nn.Module, job: PruneJob) -> nn.Module:
    from edgeslim.bench.peers import torch_pruning_magnitude

    return torch_pruning_magnitude(
        model, job.example, job.macs_reduction, job.round_to, info=job.info
    )


@register_method("edgeslim:gates", data_used="train")
def _gates(model: nn.Module, job: PruneJob) -> nn.Module:
    """Learned gates trained with the suite's fine-tune budget (the same images, epochs and
    lr, KD from the unpruned model); its "without fine-tune" record is the model straight
    out of gate training, its "with" record that model after the shared fine-tune too.
    Widths are rounded to ``job.round_to`` like every other method's."""
    from edgeslim.prune.gates import train_gates

    result = train_gates(
        copy.deepcopy(model), (job.example,), job.train_batches(), job.finetune,
        macs_reduction=job.macs_reduction, teacher=model, description="gates",
        round_to=job.round_to,
    )  # fmt: skip
    job.info["kept"] = {k: f"{len(v)}/{result.plan.sizes[k]}" for k, v in result.plan.keep.items()}
    return result.model


def selected_methods(quick: bool) -> dict[str, PruneMethod]:
    if quick:
        return {k: v for k, v in METHODS.items() if k in QUICK_METHODS}
    return dict(METHODS)


def finetune_copy(model: nn.Module, teacher: nn.Module, job: PruneJob) -> nn.Module:
    """The suite's shared fine-tune: a copy trained on ``job.train`` with KD from ``teacher``."""
    from edgeslim.prune.finetune import finetune_pruned

    tuned = copy.deepcopy(model)
    finetune_pruned(
        tuned,
        job.train_batches(),
        job.finetune,
        teacher=teacher,
        alpha=KD_ALPHA,
        description="prune ft",
    )
    return tuned.eval()


@contextmanager
def one_thread() -> Iterator[None]:
    """Plan and search on one torch thread: their forwards are batch 1 and gain nothing from
    more, while two OpenMP threads on a busy machine spin-wait for each other (measured:
    resnet20 at batch 1 took 0.43 s per call instead of 2 ms with another job running)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Variant:
    method: str
    target: float
    pruned: nn.Module
    tuned: nn.Module
    top1: float
    tuned_top1: float
    ort_top1: float
    session: Any
    macs: int
    prune_seconds: float
    finetune_seconds: float
    extra: dict[str, Any]


def prune_variants(
    name: str,
    fp32: nn.Module,
    test: Split,
    job_for: Callable[[float], PruneJob],
    methods: dict[str, PruneMethod],
    targets: tuple[float, ...],
    onnx_dir: Path,
) -> list[_Variant]:
    """Prune, evaluate, fine-tune, evaluate and export every (target, method) of one model."""
    x1 = test.images[:1].contiguous()
    base_macs = total_macs(layer_table(fp32, x1))
    test_batches = TensorBatches(test.images, test.labels, 500)
    out: list[_Variant] = []
    for target in targets:
        for method, fn in methods.items():
            job = job_for(target)
            t0 = time.perf_counter()
            with one_thread():
                pruned = fn(fp32, job).eval()
            prune_s = time.perf_counter() - t0
            macs = total_macs(layer_table(pruned, x1))
            top1 = evaluate(pruned, test_batches)
            t0 = time.perf_counter()
            tuned = finetune_copy(pruned, fp32, job)
            ft_s = time.perf_counter() - t0
            tag = f"{name}_{method.replace(':', '_')}_{round(target * 100)}"
            path = export_onnx(tuned, (x1,), onnx_dir / f"{tag}.onnx")
            session = ort_session(path)
            extra = {**job.info, "macs_reduction": round(1.0 - macs / base_macs, 4)}
            ort = ort_top1(session, test.images, test.labels)
            v = _Variant(
                method, target, pruned, tuned, top1, evaluate(tuned, test_batches), ort, session,
                macs, prune_s, ft_s, extra,
            )  # fmt: skip
            out.append(v)
    return out


def prune_model(
    name: str,
    out: Path,
    quick: bool,
    methods: dict[str, PruneMethod] | None = None,
    targets: tuple[float, ...] | None = None,
    finetune_images: int | None = None,
    test_images: int | None = None,
) -> list[Record]:
    """Every record of one model (see the module docstring); arguments override the sizes."""
    methods = methods if methods is not None else selected_methods(quick)
    targets = targets or (QUICK_TARGETS if quick else TARGETS)
    n_ft = finetune_images or (QUICK_FINETUNE_IMAGES if quick else FINETUNE_IMAGES)
    n_test = test_images or (QUICK_TEST_IMAGES if quick else None)
    fp32 = load_zoo_model(name)
    test = load_fashion_mnist("test", limit=n_test)
    train = load_fashion_mnist("train", limit=n_ft)
    x1 = test.images[:1].contiguous()
    onnx_dir = out / "onnx"
    base_macs = total_macs(layer_table(fp32, x1))
    fp32_top1 = evaluate(fp32, TensorBatches(test.images, test.labels, 500))
    fp32_sess = ort_session(export_onnx(fp32, (x1,), onnx_dir / f"{name}_fp32.onnx"))
    fp32_ort_top1 = ort_top1(fp32_sess, test.images, test.labels)

    batches = augmented_batches(train.images, train.labels, FINETUNE.batch_size, FINETUNE.seed)

    def job_for(target: float) -> PruneJob:
        return PruneJob(name, target, ROUND_TO, x1, batches, FINETUNE)

    variants = prune_variants(name, fp32, test, job_for, methods, targets, onnx_dir)

    feeds = {"input": x1.numpy()}
    runners = {"torch_fp32": torch_runner(fp32, x1), "ort_fp32": ort_runner(fp32_sess, feeds)}
    for i, v in enumerate(variants):
        runners[f"torch_{i}"] = torch_runner(v.tuned, x1)
        runners[f"ort_{i}"] = ort_runner(v.session, feeds)
    lat = compare_latency(runners, warmup=5, repeats=20 if quick else 100)
    ms = {k: round(s.median_ms, 4) for k, s in lat.items()}

    def record(
        method: str, runtime: str, value: float, base: float, config: dict[str, Any],
        module: nn.Module, macs: int, key: str, seconds: float, data_used: str,
        extra: dict[str, Any],
    ) -> Record:  # fmt: skip
        fp = "ort_fp32" if runtime == "onnxruntime" else "torch_fp32"
        return Record(
            suite="prune", model=name, method=method, config=config, metric="top1",
            value=round(value, 4), baseline_value=round(base, 4),
            params=sum(p.numel() for p in module.parameters()), macs=macs,
            size_bytes=size_bytes(module), latency_ms=ms[key], baseline_latency_ms=ms[fp],
            runtime=runtime, seconds=round(seconds, 2), data_used=data_used,
            extra={"test_images": len(test), **extra},
        )  # fmt: skip

    records = [
        record("edgeslim:fp32", rt, top1, top1, {"macs_reduction": 0.0}, fp32, base_macs,
               key, 0.0, "none", {})
        for rt, top1, key in (
            ("torch", fp32_top1, "torch_fp32"), ("onnxruntime", fp32_ort_top1, "ort_fp32"),
        )
    ]  # fmt: skip
    epochs = FINETUNE.epochs
    for i, v in enumerate(variants):
        criterion = v.method.split(":", 1)[1]
        cfg: dict[str, Any] = {"macs_reduction": v.target, "criterion": criterion}
        ft_extra = {
            **v.extra, "finetune_images": len(train), "kd_alpha": KD_ALPHA, "lr": FINETUNE.lr,
            "top1_before_finetune": round(v.top1, 4),
        }  # fmt: skip
        data_used = DATA_USED.get(v.method, "none")
        records += [
            record(v.method, "torch", v.top1, fp32_top1, {**cfg, "finetune_epochs": 0},
                   v.pruned, v.macs, f"torch_{i}", v.prune_seconds, data_used, v.extra),
            record(v.method, "torch", v.tuned_top1, fp32_top1, {**cfg, "finetune_epochs": epochs},
                   v.tuned, v.macs, f"torch_{i}", v.prune_seconds + v.finetune_seconds, "train",
                   ft_extra),
            record(v.method, "onnxruntime", v.ort_top1, fp32_ort_top1,
                   {**cfg, "finetune_epochs": epochs}, v.tuned, v.macs, f"ort_{i}",
                   v.prune_seconds + v.finetune_seconds, "train", ft_extra),
        ]  # fmt: skip
    return records


@register_suite("prune")
def prune_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    from edgeslim.bench.prune_text import prune_minilm

    names = models or (QUICK_MODELS if quick else DEFAULT_MODELS)

    def measure(name: str) -> list[Record]:
        return prune_minilm(out, quick) if name == "minilm" else prune_model(name, out, quick)

    # Resumable: the full run takes about an hour; a killed run restarts at the next model.
    progress = out / ("progress-quick.json" if quick else "progress.json")
    return per_model("prune", names, measure, progress=progress)
