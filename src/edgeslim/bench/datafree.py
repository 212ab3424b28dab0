"""Suite ``datafree``: compression that never reads data, every method on the same model.

Per model (``resnet20``, ``vgg-small``, ``mobilenetv2-small``), in one process, each
method of :mod:`edgeslim.datafree` applied to the same fp32 model with no calibration,
training or validation image (the only input it sees is a random example tensor, for
shapes):

- fp32;
- quantization only: ``rtn``, ``dfq`` and ``dfmpc`` at mixed 2/6 bits (``low_bits`` 2,
  ``high_bits`` 6; DF-MPC alternates them along conv -> BN -> ReLU -> conv pairs), mixed 3/8
  and uniform 4-bit weights;
- prune + quantize: ``naive``, ``merge`` (neuron merging) and ``udfc`` at 30% and 50% of the
  channels removed in every safely prunable group, x 6- and 4-bit weights;
- DF-MPC's steps one at a time at 2/6 (``edgeslim:dfmpc[variant]``, see
  :func:`ablation`), so the report shows what each adds;

first conv and last linear at 8 bits (``edge_bits``), every weight per-channel symmetric
uniform, activations at 8 bits with dynamic per-tensor ranges
(:func:`edgeslim.datafree.quantized_model`), scored as fake-quant in torch. Top-1 is on the
Fashion-MNIST test split (all 10k; 2k with ``--quick``); ``size_bytes`` counts each weight
at its own bit-width; ``seconds`` is the method's own wall time; no latency is measured (a
torch fake-quant model says nothing about deployed speed).

Targets (the data-free issue):

- DF-MPC >= RTN + 5 points of top-1 at 2/6 on each model;
- UDFC >= naive + 5 points at 30% pruned + 6-bit weights;
- every method under 10 s per model on 2 cores (``seconds``).

``--quick``: ``resnet20`` on 2k test images, the two settings the targets name (2/6 for the
quantization methods, 30% + 6-bit for the pruning ones).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeslim.bench.records import Record, save_records
from edgeslim.bench.suites import per_model, register_suite
from edgeslim.bench.tasks import QUICK_TEST_IMAGES
from edgeslim.cost import size_bytes
from edgeslim.data import TensorBatches, load_fashion_mnist
from edgeslim.graph import example_input, layer_table, total_macs
from edgeslim.train.loop import evaluate
from edgeslim.zoo import load_zoo_model

if TYPE_CHECKING:
    from edgeslim.datafree import Chain, DataFreeSpec
    from edgeslim.datafree.methods import Method, MethodArgs

DEFAULT_MODELS = ["resnet20", "vgg-small", "mobilenetv2-small"]
QUICK_MODELS = ["resnet20"]
ACT_BITS = 8
QUANT_METHODS = ("rtn", "dfq", "dfmpc")
PRUNE_METHODS = ("naive", "merge", "udfc")
QUANT_SETTINGS = ((2, 6), (3, 8), (4, 4))  # (low_bits, high_bits)
PRUNE_SETTINGS = ((0.3, 6), (0.3, 4), (0.5, 6), (0.5, 4))  # (prune_ratio, weight bits)
QUICK_QUANT_SETTINGS = ((2, 6),)
QUICK_PRUNE_SETTINGS = ((0.3, 6),)
# `make demo`: fp32, then (method, low_bits, high_bits) on resnet20 (see datafree_demo):
# RTN vs DF-MPC at mixed 2/6, where compensation matters, and RTN vs DFQ at uniform 4 bits
DEMO_MODEL = "resnet20"
DEMO_ROWS = (("rtn", 2, 6), ("dfmpc", 2, 6), ("rtn", 4, 4), ("dfq", 4, 4))


@dataclass(frozen=True)
class Config:
    """One row of the suite: a method of :data:`edgeslim.datafree.METHODS` and its spec;
    ``variant``: one of :func:`ablation` instead of the method itself."""

    method: str
    spec: DataFreeSpec
    variant: str = ""

    @property
    def label(self) -> str:
        return f"edgeslim:{self.method}" + (f"[{self.variant}]" if self.variant else "")


ABLATION_SETTING = (2, 6)  # (low_bits, high_bits) of the DF-MPC ablation rows


def ablation() -> dict[str, Method]:
    """DF-MPC's steps, each row adding one (the full method is the ``dfmpc`` row):

    - ``bias``: bias correction alone (no clamp), what DFQ does besides equalization;
    - ``clamp``: the low-bit layers clamped to their MSE-optimal range, nothing else;
    - ``clamp+correct-clamped``: the clamp, then bias correction and the consumers' mean
      compensation measured against the clamped weights (DF-MPC before 2026-11-28);
    - ``clamp+correct-original``: the same measured against the original weights;
    - ``clamp+match+correct``: the last with the variance match of the clamped rows (DF-MPC
      before 2026-11-30).

    ``dfmpc`` rounds the clamped rows against their modelled input covariance before the
    variance match.
    """
    from edgeslim.datafree.compensate import compensate_all
    from edgeslim.datafree.methods import bias_correct_all, clip_low_bits

    def bias(chain: Chain, args: MethodArgs) -> None:
        bias_correct_all(chain, args.bits)

    def clamp(chain: Chain, args: MethodArgs) -> None:
        clip_low_bits(chain, args.bits, min(args.bits.values()), match=False)

    def clamp_correct_clamped(chain: Chain, args: MethodArgs) -> None:
        clamp(chain, args)
        compensate_all(chain, args.bits)

    def clamp_correct_original(chain: Chain, args: MethodArgs) -> None:
        original = clip_low_bits(chain, args.bits, min(args.bits.values()), match=False)
        compensate_all(chain, args.bits, reference=original)

    def clamp_match_correct(chain: Chain, args: MethodArgs) -> None:
        original = clip_low_bits(chain, args.bits, min(args.bits.values()))
        compensate_all(chain, args.bits, reference=original, bn_only=True)

    return {
        "bias": bias,
        "clamp": clamp,
        "clamp+correct-clamped": clamp_correct_clamped,
        "clamp+correct-original": clamp_correct_original,
        "clamp+match+correct": clamp_match_correct,
    }


def configs(quick: bool) -> list[Config]:
    """Every (method, spec) the suite measures on one model, in report order."""
    from edgeslim.datafree import DataFreeSpec

    quant = QUICK_QUANT_SETTINGS if quick else QUANT_SETTINGS
    prune = QUICK_PRUNE_SETTINGS if quick else PRUNE_SETTINGS
    out = [
        Config(m, DataFreeSpec(low_bits=low, high_bits=high))
        for low, high in quant
        for m in QUANT_METHODS
    ]
    out += [
        Config(m, DataFreeSpec(low_bits=bits, high_bits=bits, prune_ratio=ratio))
        for ratio, bits in prune
        for m in PRUNE_METHODS
    ]
    if not quick:
        low, high = ABLATION_SETTING
        spec = DataFreeSpec(low_bits=low, high_bits=high)
        out += [Config("dfmpc", spec, variant) for variant in ablation()]
    return out


def _bits_histogram(weight_bits: dict[str, int]) -> dict[str, int]:
    """``{"2": 9, "6": 10, "8": 2}``: how many layers got each bit-width."""
    return {str(b): n for b, n in sorted(Counter(weight_bits.values()).items())}


def datafree_model(
    name: str,
    quick: bool,
    rows: list[Config] | None = None,
    test_images: int | None = None,
) -> list[Record]:
    """The fp32 record and one record per config of one model (see the module docstring);
    ``rows`` and ``test_images`` override the suite's configs and test-set size."""
    from edgeslim.datafree import compress_datafree, quantized_model

    rows = rows if rows is not None else configs(quick)
    n_test = test_images or (QUICK_TEST_IMAGES if quick else None)
    fp32 = load_zoo_model(name).eval()
    test = load_fashion_mnist("test", limit=n_test)
    x1 = example_input((1, 1, 28, 28))  # shapes only: no image reaches the methods
    base_macs = total_macs(layer_table(fp32, x1))
    test_batches = TensorBatches(test.images, test.labels, 500)
    fp32_top1 = evaluate(fp32, test_batches)

    def record(
        method: str, config: dict[str, Any], value: float, module: nn.Module, macs: int,
        weight_bits: dict[str, int] | None, seconds: float, extra: dict[str, Any],
    ) -> Record:  # fmt: skip
        return Record(
            suite="datafree", model=name, method=method, config=config, metric="top1",
            value=round(value, 4), baseline_value=round(fp32_top1, 4),
            params=sum(p.numel() for p in module.parameters()), macs=macs,
            size_bytes=size_bytes(module, weight_bits), latency_ms=None,
            baseline_latency_ms=None, runtime="torch", seconds=round(seconds, 2),
            data_used="none", extra={**extra, "test_images": len(test)},
        )  # fmt: skip

    fp32_config = {"w_bits": 32, "a_bits": 32}
    records = [record("edgeslim:fp32", fp32_config, fp32_top1, fp32, base_macs, None, 0.0, {})]
    for row in rows:
        method = ablation()[row.variant] if row.variant else row.method
        result = compress_datafree(fp32, method, row.spec, x1)
        top1 = evaluate(quantized_model(result, act_bits=ACT_BITS), test_batches)
        macs = total_macs(layer_table(result.model, x1))
        extra = {
            "notes": list(result.notes),
            "layer_bits": _bits_histogram(result.weight_bits),
            "macs_reduction": round(1.0 - macs / base_macs, 4),
        }
        extra["report"] = result.report.to_dict()  # what it changed, per layer, or why not
        config = {"method": row.method, **row.spec.to_dict(), "a_bits": ACT_BITS}
        if row.variant:
            config["variant"] = row.variant
        bits = result.weight_bits
        records.append(
            record(row.label, config, top1, result.model, macs, bits, result.seconds, extra)
        )
    return records


@register_suite("datafree")
def datafree_suite(out: Path, quick: bool, models: list[str] | None) -> list[Record]:
    names = models or (QUICK_MODELS if quick else DEFAULT_MODELS)
    # Resumable like `prune`: a killed run restarts at the next model.
    progress = out / ("progress-quick.json" if quick else "progress.json")
    return per_model("datafree", names, lambda n: datafree_model(n, quick), progress=progress)


def datafree_demo(out: Path) -> list[Record]:
    """What ``make demo`` shows last: fp32 and :data:`DEMO_ROWS` on ``resnet20`` (first 2,000
    test images), written to ``out`` as ``results.json`` and ``report.md``."""
    from edgeslim.datafree import DataFreeSpec
    from edgeslim.report import write_report

    rows = [Config(m, DataFreeSpec(low_bits=lo, high_bits=hi)) for m, lo, hi in DEMO_ROWS]
    records = datafree_model(DEMO_MODEL, quick=True, rows=rows)
    out = Path(out)
    save_records(records, out / "results.json")
    write_report(records, out, title="edgeslim demo: data-free compression")
    return records
