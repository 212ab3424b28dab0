"""``Task``: the one object through which a user's data and metric reach every algorithm.

A task carries example inputs (a tuple, several inputs allowed, each with its batch
dimension), calibration batches (any iterable of input tuples: a ``DataLoader`` works),
optional training batches ``(inputs, target)`` with their loss, and an optional metric
``evaluate(model) -> float | dict``. Without a metric, the task measures **agreement**
with the uncompressed model on held validation inputs (:mod:`edgeslim.task.agreement`), so
unlabelled data still gives an honest figure. Augmentation belongs to the task's training
iterable, never to the training loop.

Decision — validation inputs: agreement is measured on ``validation`` when given, else on
the calibration inputs (the figure then says so in its notes: inputs the compression saw).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import (
    Inputs,
    TensorBatches,
    as_inputs,
    batch_size_of,
    is_one_shot,
    split_batch,
    take_samples,
)
from edgeslim.errors import MetricWarning, TaskError, first_line
from edgeslim.graph.trace import declare_inputs
from edgeslim.task.agreement import (
    AgreementReference,
    agreement_metrics,
    channels_first_classes,
    one_class,
    one_sided,
    values_not_classes,
    weight_layer_outputs,
)

Metric = Callable[[nn.Module], "float | Mapping[str, float]"]
Loss = Callable[[Any, Any], torch.Tensor]


@dataclass
class Task:
    """What a model is compressed and measured on. Only ``example_inputs`` is required.

    - ``example_inputs``: one tensor per model input, at batch 1.
    - ``batch_dims``: each input's batch dimension (default 0 for every input; a recurrent
      state may have it on 1). Export's dynamic axes and batching use it.
    - ``calibration``: any iterable of input batches (a tensor or a tuple of tensors each).
    - ``train``: re-iterable ``(inputs, target)`` batches, augmented as the task wants;
      ``target`` may be None when the loss is distillation. ``loss(outputs, target)``
      defaults to cross-entropy of the first output.
    - ``evaluate``: ``model -> float`` (named by ``metric``) or ``dict[str, float]`` (the
      first key is the headline metric). Without it: agreement with the uncompressed model.
    - ``validation``: held input batches for agreement (default: the calibration batches);
      when every batch carries integer labels (``(x, y)`` from a ``DataLoader``), the
      headline is ``val_top1`` on them, agreement measured beside it.
    - ``wrap``: turns the model into one that takes ``example_inputs`` positionally and
      returns tensors (a Hugging Face encoder into its pooled embedding), for export,
      latency and agreement; identity by default.
    - ``latency_inputs``: what latency is measured on (default: ``example_inputs``).
    - ``min_confidence``: agreement counts only rows where the reference's softmax top-1 is
      at least this sure (the rest flip under any noise); ``agreement_all`` keeps them all.
    - ``primary``: which measured metric is the headline (e.g. ``cosine`` for an embedding
      or regression model, where argmax agreement means nothing); default the first.
    - ``input_ranges``: per input, the interval its values cannot leave, known from the
      input's format, not measured (pixels in [0, 1] normalised by a mean and std:
      :func:`normalised_range`); None where unknown. Data-free methods read no sample, so
      this is the only way they learn the first layer's input range; without it they
      assume a standardised input (mean 0, std 1).
    - ``evaluate_on_validation``: ``evaluate`` scores the validation samples themselves
      (an ``.npz`` or an image folder split in two parts, not three), so a figure of a
      model chosen on validation, e.g. by a search, is not a held-out one.
    - ``metric_rows``: how many samples ``evaluate``'s figure counts, when it is a
      percentage of them (the built-in top-1 tasks set it): its resolution, see
      :meth:`metric_step`.
    - ``dynamic_dims``: per input, the dimensions besides the batch whose size may change
      at run time (an image model's height and width: ``((2, 3),)``); the ONNX file keeps
      them free, on the outputs that follow them too, and is checked on inputs doubled
      along them. Default: only the batch dimension is free.
    - ``class_axis``: the axis of the first output that agreement reads as classes. Default
      (None): the last axis, axis 1 of a map of 4 or more dims, and axis 1 of a 3-dim
      output whose axis 1 holds the channels of the conv that ran last (a WaveNet's or a
      CTC model's per-frame ``(N, C, T)`` scores; found when bound to the model and said in
      :attr:`notes`). Classes off the last axis are distilled as values (the KD softmax
      reads the last axis).
    """

    example_inputs: tuple[torch.Tensor, ...]
    batch_dims: tuple[int, ...] | None = None
    calibration: Iterable[Any] | None = None
    train: Iterable[Any] | None = None
    loss: Loss | None = None
    evaluate: Metric | None = None
    metric: str = "metric"
    validation: Iterable[Any] | None = None
    name: str = "task"
    input_names: tuple[str, ...] | None = None
    wrap: Callable[[nn.Module], nn.Module] | None = None
    latency_inputs: tuple[torch.Tensor, ...] | None = None
    min_confidence: float = 0.0
    primary: str | None = None
    description: str = ""
    input_ranges: tuple[tuple[float, float] | None, ...] | None = None
    evaluate_on_validation: bool = False
    metric_rows: int | None = None
    class_axis: int | None = None
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None
    _reference: AgreementReference | None = field(default=None, init=False, repr=False)
    # the labels of the held validation batches, one tensor per batch, when every batch
    # carries integer labels; found when bound to a model
    _labels: list[torch.Tensor] | None = field(default=None, init=False, repr=False)
    # what the task decided by itself when bound to a model (the headline it chose)
    notes: list[str] = field(default_factory=list, init=False, repr=False)
    _chose_primary: bool = field(default=False, init=False, repr=False)
    _class_axis: int | None = field(default=None, init=False, repr=False)  # as bound
    _classes_off_last: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.example_inputs = as_inputs(self.example_inputs)
        n = len(self.example_inputs)
        dims = tuple(self.batch_dims) if self.batch_dims is not None else (0,) * n
        if len(dims) != n:
            raise TaskError(
                f"task {self.name!r}: {n} example input(s) but {len(dims)} batch dimension(s); "
                "give one batch dimension per input"
            )
        for i, (t, d) in enumerate(zip(self.example_inputs, dims, strict=True)):
            if not 0 <= d < max(t.dim(), 1):
                raise TaskError(
                    f"task {self.name!r}: input {i} has shape {list(t.shape)}, so batch "
                    f"dimension {d} does not exist"
                )
        self.batch_dims = dims
        self._check_input_ranges(n)
        self._check_dynamic_dims()
        for what in ("calibration", "validation", "train"):
            data = getattr(self, what)
            if data is not None and is_one_shot(data):
                raise TaskError(
                    f"task {self.name!r}: {what} is a one-shot iterator (a generator); it is "
                    "read more than once (the uncompressed model's figures, calibration, "
                    "every epoch, the final figures), so pass a list, a DataLoader or a "
                    "TensorBatches"
                )

        if isinstance(self.train, TensorBatches) and not self.train.pairs:
            # its batches are input tuples: with two inputs the second read as the target
            raise TaskError(
                f"task {self.name!r}: train is a TensorBatches without targets, so it yields "
                "inputs alone, not (inputs, target) pairs; pass TensorBatches(x, y), or "
                "TensorBatches(x, None, pairs=True) when the loss needs no target "
                "(distillation)"
            )

    def _check_input_ranges(self, n: int) -> None:
        if self.input_ranges is None:
            return
        ranges = tuple(self.input_ranges)
        if len(ranges) != n:
            raise TaskError(
                f"task {self.name!r}: {n} example input(s) but {len(ranges)} input range(s); "
                "give one (lo, hi) or None per input"
            )
        for i, r in enumerate(ranges):
            if r is not None and not (len(r) == 2 and float(r[0]) < float(r[1])):
                raise TaskError(
                    f"task {self.name!r}: input range {i} is {r!r}; give (lo, hi), lo < hi"
                )
        self.input_ranges = tuple(None if r is None else (float(r[0]), float(r[1])) for r in ranges)

    def _check_dynamic_dims(self) -> None:
        if self.dynamic_dims is None:
            return
        given = tuple(tuple(int(d) for d in dims) for dims in self.dynamic_dims)
        if len(given) > len(self.example_inputs):
            raise TaskError(
                f"task {self.name!r}: dynamic dimensions for {len(given)} inputs, but the model "
                f"takes {len(self.example_inputs)}"
            )
        for i, (dims, t, batch) in enumerate(zip(given, self.example_inputs, self.dims,
                                                 strict=False)):  # fmt: skip
            bad = [d for d in dims if not 0 <= d < t.dim() or d == batch]
            if bad:
                raise TaskError(
                    f"task {self.name!r}: input {i} has shape {list(t.shape)} and its batch on "
                    f"dimension {batch}, so dimension {bad[0]} cannot be made dynamic; give "
                    f"dimensions in 0..{t.dim() - 1} other than {batch} (e.g. 2,3 for an "
                    "image's height and width)"
                )
        self.dynamic_dims = given

    def resized(self, inputs: Inputs) -> Inputs | None:
        """``inputs`` doubled along each input's :attr:`dynamic_dims` (each value repeated,
        a nearest-neighbour upsampling of an image), or None without dynamic dimensions."""
        if not self.dynamic_dims or not any(self.dynamic_dims):
            return None
        out = list(inputs)
        for i, dims in enumerate(self.dynamic_dims):
            for d in dims:
                out[i] = out[i].repeat_interleave(2, dim=d)
        return tuple(out)

    def input_range(self, i: int = 0) -> tuple[float, float] | None:
        """The known value range of input ``i`` (None when the task does not know it)."""
        return None if self.input_ranges is None else self.input_ranges[i]

    # ---- inputs -------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[int, ...]:
        assert self.batch_dims is not None  # set in __post_init__
        return self.batch_dims

    @property
    def names(self) -> list[str]:
        """ONNX input names: given, or ``input``, ``input1``, ..."""
        if self.input_names is not None:
            return list(self.input_names)
        return [f"input{i}" if i else "input" for i in range(len(self.example_inputs))]

    def inputs_at(self, batch: int) -> Inputs:
        """The example inputs repeated to ``batch`` samples along each batch dimension."""
        return tuple(
            t.narrow(d, 0, 1).repeat_interleave(batch, dim=d)
            for t, d in zip(self.example_inputs, self.dims, strict=True)
        )

    def latency_feeds(self) -> Inputs:
        return self.latency_inputs if self.latency_inputs is not None else self.example_inputs

    def module(self, model: nn.Module) -> nn.Module:
        """The model as export, latency and agreement see it (``wrap`` applied)."""
        return model if self.wrap is None else self.wrap(model)

    # ---- data for algorithms -----------------------------------------------------------
    def calibration_batches(self, limit: int | None = None) -> list[Inputs]:
        """Input batches holding ``limit`` calibration samples (all when None)."""
        if self.calibration is None:
            raise TaskError(
                f"task {self.name!r} has no calibration data; this step needs input samples "
                "(pass --data, or give the Task a calibration iterable)"
            )
        out = self._samples(self.calibration, limit, "calibration")
        if not out:
            raise TaskError(f"task {self.name!r}: the calibration data is empty")
        self._check_shapes(out, "calibration")
        return out

    def train_batches(
        self, batch_size: int | None = None, limit: int | None = None, seed: int | None = None
    ) -> Iterable[Any]:
        """The training batches; in-memory sources are rebatched to ``batch_size``, cut to
        ``limit`` samples and reseeded; a user's iterable (a DataLoader) keeps its own."""
        if self.train is None:
            raise TaskError(
                f"task {self.name!r} has no training data; fine-tuning, QAT, learned gates "
                "and data-driven importance need (inputs, target) batches (give the Task a "
                "train iterable, or use a method that needs none)"
            )
        if isinstance(self.train, TensorBatches):
            src = self.train.limited(limit)
            return src.rebatched(batch_size or src.batch_size, seed=seed)
        return self.train

    def train_loss(self) -> Loss:
        """``loss(outputs, target)``: the task's, or cross-entropy of the first output."""
        from edgeslim.train.loop import cross_entropy

        return self.loss if self.loss is not None else cross_entropy

    def validation_batches(self) -> list[Inputs]:
        """The held input batches agreement is measured on (validation, else calibration)."""
        return self._held()[0]

    def labelled_validation(self) -> list[tuple[Inputs, torch.Tensor]] | None:
        """The validation batches as ``(inputs, integer target)`` when every one carries
        class labels (a ``DataLoader`` of ``(x, y)``, ``TensorBatches(x, y)``), else None.
        Why: a user who holds labels wants the accuracy on them, which is the search's
        objective then too (``val_top1``); agreement is measured beside it."""
        if self.validation is None:
            return None
        batches, labels = self._held()
        return None if labels is None else list(zip(batches, labels, strict=True))

    def _held(self) -> tuple[list[Inputs], list[torch.Tensor] | None]:
        """One pass over the held data (validation, else calibration): its input batches,
        checked, and, for validation whose every batch carries integer labels, the labels
        (one tensor per batch; the rest read as :func:`split_batch` does)."""
        data = self.validation if self.validation is not None else self.calibration
        if data is None:
            raise TaskError(
                f"task {self.name!r} has neither a metric (evaluate) nor validation or "
                "calibration inputs to measure agreement on; pass --data (or --metric)"
            )
        what = "validation" if self.validation is not None else "calibration"
        try:
            pairs = [split_batch(item, len(self.example_inputs)) for item in data]
        except TypeError as exc:  # a batch of another shape (a dict): the hint says how
            raise TaskError(f"task {self.name!r}: {what}: {exc}") from None
        pairs = [(inputs, t) for inputs, t in pairs if batch_size_of(inputs, self.dims) > 0]
        if not pairs:
            raise TaskError(f"task {self.name!r}: the validation data is empty")
        batches = [inputs for inputs, _ in pairs]
        self._check_shapes(batches, what)
        labels = [t for _, t in pairs]
        labelled = self.validation is not None and all(
            isinstance(t, torch.Tensor) and not t.is_floating_point() for t in labels
        )
        return batches, labels if labelled else None

    def _samples(self, data: Iterable[Any], limit: int | None, what: str) -> list[Inputs]:
        try:
            return take_samples(data, limit, self.dims)
        except TypeError as exc:  # a batch of another shape (a dict): the hint says how
            raise TaskError(f"task {self.name!r}: {what}: {exc}") from None

    def _check_shapes(self, batches: list[Inputs], what: str) -> None:
        """Every batch holds one tensor per example input, of the example's shape but on its
        batch dimension: the exported model fixes every other dimension, so data of another
        shape would fail later, inside ONNX Runtime, with its message instead of this one."""
        want = [list(t.shape) for t in self.example_inputs]
        for b, inputs in enumerate(batches):
            if len(inputs) != len(want):
                raise TaskError(
                    f"task {self.name!r}: {what} batch {b} holds {len(inputs)} input(s), the "
                    f"example {len(want)}; give one tensor per model input"
                )
            for i, (t, shape, d) in enumerate(zip(inputs, want, self.dims, strict=True)):
                got = list(t.shape)
                if not same_but_batch(got, shape, d):
                    raise TaskError(
                        f"task {self.name!r}: {what} batch {b}, input {i} has shape {got} but "
                        f"the example input {shape}: only the batch dimension ({d}) may "
                        "differ, since the exported model fixes the others. Give data of the "
                        "example's shape, or an --input-shape (example) matching the data."
                    )

    # ---- checks and metrics ------------------------------------------------------------
    def check(self, model: nn.Module) -> Any:
        """Run the (wrapped) model on the example inputs; a clear error when they do not fit
        (or when the model is of a kind nothing downstream can take, :func:`_refuse_kind`)."""
        _refuse_kind(model)
        if self.wrap is None:  # every later trace keeps exactly these inputs
            declare_inputs(model, len(self.example_inputs), self.example_inputs, self.dims)
        module = self.module(model)
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                return module(*self.example_inputs)
        except Exception as exc:  # the user's model: any error means the inputs do not fit
            shapes = ", ".join(
                str(list(t.shape)) + ("" if t.dtype == torch.float32 else f" {t.dtype}")
                for t in self.example_inputs
            )
            raise TaskError(
                f"the model does not run on the task's example inputs ({shapes}): "
                f"{first_line(exc)}. "
                "Give the shapes the model expects (--input-shape, repeated for several "
                "inputs) or data that matches it (--data; an .npz array's dtype is kept: "
                "float for values, integer for indices such as token ids)."
            ) from None
        finally:
            module.train(was)

    def bind_reference(self, model: nn.Module) -> None:
        """Record the uncompressed model's outputs for agreement (with a metric function,
        only which axis holds the classes, :meth:`choose_headline`).

        Without a chosen headline (``primary``), outputs shaped as values rather than class
        scores (:func:`~edgeslim.task.agreement.values_not_classes`) make ``cosine`` the
        headline, said in :attr:`notes`."""
        self.choose_headline(model)
        if self.evaluate is None:
            batches, labels = self._held()
            top1 = None if labels is None else _Top1(labels, self.name)
            try:
                self._reference = AgreementReference.of(
                    self.module(model), batches, self._class_axis, top1
                )
            except TaskError:  # labels that do not fit the outputs: said as such
                raise
            except Exception as exc:  # it ran on the example: the batch is what differs
                n = int(batches[0][0].shape[self.dims[0] if self.dims else 0])
                raise TaskError(
                    f"the model runs on the example inputs but not on a batch of {n} held "
                    f"samples: {first_line(exc)}. "
                    f"Each input's batch dimension is taken as {list(self.dims)}: an input "
                    "whose batch is on another dimension (a recurrent state: dim 1) needs it "
                    "said (Task(batch_dims=...); an .npz: a `batch_dims` array)"
                ) from None
            self._labels = labels
            if top1 is not None:
                self.notes.append(f"metric: top-1 on {top1.total} labelled validation samples, "
                                  "agreement with the uncompressed model beside it")  # fmt: skip
            elif self.headline.startswith("agreement"):
                self._warn_uninformative(self._reference)

    def _warn_uninformative(self, ref: AgreementReference) -> None:
        """A note and a warning when agreement cannot tell models apart on the held rows."""
        why = one_sided(ref)
        if why is not None:
            note = (f"metric: agreement means nothing here: {why}. Pass a metric function "
                    "(`--metric module:function`; Task(evaluate=...)) that measures the "
                    "value, e.g. its error against the uncompressed model's")  # fmt: skip
        elif (why := one_class(ref)) is not None:
            note = (f"metric: agreement says little here: {why}. Hold samples the model "
                    "tells apart (--data; Task(validation=...)), or pass a metric function "
                    "(`--metric module:function`; Task(evaluate=...))")  # fmt: skip
        else:
            return
        warnings.warn(note, MetricWarning, stacklevel=3)
        self.notes.append(f"WARNING: {note}")  # a report lists it under its warnings

    def choose_headline(self, model: nn.Module) -> None:
        """Read ``model``'s outputs on the example: without ``evaluate`` or a chosen
        ``primary``, ``cosine`` when they are values
        (:func:`~edgeslim.task.agreement.values_not_classes`), with a warning and a line in
        :attr:`notes`; otherwise, without a chosen ``class_axis``, axis 1 of a conv's
        ``(N, C, T)`` scores (:func:`~edgeslim.task.agreement.channels_first_classes`),
        said in :attr:`notes`. A choice made for an earlier model is undone first."""
        self.notes, self._labels = [], None
        if self._chose_primary:
            self.primary, self._chose_primary = None, False
        self._class_axis, self._classes_off_last = self.class_axis, False
        module = self.module(model)
        was = module.training
        module.eval()
        try:
            outs, ran = weight_layer_outputs(module, self.example_inputs)
        finally:
            module.train(was)
        dims = outs[0].dim() if outs else 0
        if self.class_axis is not None and outs and not -dims <= self.class_axis < max(dims, 1):
            raise TaskError(
                f"task {self.name!r}: class_axis {self.class_axis} does not exist in the "
                f"first output, shape {list(outs[0].shape)}; give an axis in "
                f"{-dims}..{dims - 1} (-1: the last)"
            )
        why = None if self.evaluate is not None else values_not_classes(
            [x for x, d in zip(self.example_inputs, self.dims, strict=True) if d == 0], outs
        )  # fmt: skip
        if why is None or self.primary is not None:
            axis_why = channels_first_classes(outs, ran) if self.class_axis is None else None
            if axis_why is not None:
                self._class_axis = 1
                self.notes = [f"metric: classes read on axis 1: {axis_why} (Task(class_axis=-1) "
                              "reads the last axis instead); fine-tuning matches the outputs "
                              "as values"]  # fmt: skip
            if self._class_axis is not None and dims > 1:
                self._classes_off_last = self._class_axis % dims != dims - 1
            return
        self.primary, self._chose_primary = "cosine", True
        self.notes = [
            f"metric: cosine to the uncompressed model's outputs, not argmax agreement: {why}; "
            "fine-tuning matches them as values. If the channels are classes (a segmentation "
            "map), choose agreement (`--metric agreement`; Task(primary='agreement')); for "
            "your own figure pass a metric function (`--metric module:function`)"
        ]
        warnings.warn(self.notes[0], stacklevel=3)

    def metric_step(self, metrics: Mapping[str, float]) -> float | None:
        """The smallest change of the headline metric in ``metrics`` (from :meth:`measure`):
        one row of the held inputs, in points, when it is the task's own agreement or a
        top-1 over ``metric_rows`` samples; None for a metric function whose resolution the
        task cannot know. Why: on 60 held samples one argmax flipped at a near-tie moves
        the figure by 1.7 points, which a check comparing two runtimes must tell from a
        file that computes something else."""
        if self.evaluate is not None:
            return None if not self.metric_rows else 100.0 / self.metric_rows
        if self._reference is None or self.headline == "cosine":
            return None  # cosine is continuous: no row flips it by a step
        if self.headline == "val_top1" and self._labels is not None:
            return 100.0 / max(sum(int(t.numel()) for t in self._labels), 1)
        rows = metrics.get("confident_rows", self._reference.outputs[0][..., 0].numel())
        return 100.0 / max(float(rows), 1.0)

    def measure(self, model: nn.Module, wrapped: bool = False) -> dict[str, float]:
        """The task's metrics of ``model`` (``wrapped``: already through :meth:`module`,
        e.g. an ONNX Runtime session). The first key is the headline metric."""
        if self.evaluate is not None:
            try:
                value = self.evaluate(model)
            except Exception as exc:
                where = _failing_layer(model, exc)
                if where is not None:  # the model failed, not the metric around it
                    raise TaskError(
                        f"the model raised {type(exc).__name__} in {where} while the task "
                        f"measured it: {exc}. The metric function is not the cause; keep that "
                        "layer out of the compression (`skip` / a `select` entry set to null) "
                        "or report this with the model."
                    ) from exc
                on = (
                    " on the ONNX Runtime file (a callable taking and returning what the torch "
                    "model does, with no parameters or modules: docs/task.md)"
                    if wrapped
                    else ""
                )
                raise TaskError(
                    f"the task's metric function raised {type(exc).__name__}{on}: {exc}. If "
                    "it is yours, fix it (it is called with the model and must return a float "
                    "or a dict of floats); for a built-in task, the message says what the "
                    "data needs."
                ) from None
            return self._ordered(_as_metrics(value, self.metric))
        if self._reference is None:
            raise TaskError(
                f"task {self.name!r} measures agreement with the uncompressed model: call "
                "bind_reference(uncompressed_model) first"
            )
        module = model if wrapped else self.module(model)
        top1 = None if self._labels is None else _Top1(self._labels, self.name)
        outs = self._reference.outputs_of(module, top1)  # one pass for both
        metrics = agreement_metrics(self._reference, outs, self.min_confidence)
        if top1 is not None:
            metrics = {"val_top1": top1.value, **metrics}
        return self._ordered(metrics)

    def _ordered(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.primary is None:
            return metrics
        if self.primary not in metrics:
            raise TaskError(
                f"task {self.name!r}: metric {self.primary!r} was not measured; measured: "
                f"{', '.join(metrics)}"
            )
        return {self.primary: metrics[self.primary], **metrics}

    @property
    def headline(self) -> str:
        """The name of the headline metric (before any measurement)."""
        if self.primary is not None:
            return self.primary
        if self.evaluate is not None:
            return self.metric
        return "val_top1" if self._labels is not None else "agreement"

    @property
    def value_outputs(self) -> bool:
        """Whether the outputs are values (an embedding, an image), not class scores: the
        headline is ``cosine``; or class scores whose classes are not on the last axis
        (:attr:`class_axis`), which the KD softmax reads. Distillation then matches them
        instead of a softmax."""
        return self.headline == "cosine" or self._classes_off_last

    @property
    def chosen_class_axis(self) -> int | None:
        """The first output's class axis agreement reads: :attr:`class_axis`, or the one
        found when bound to the model (:meth:`choose_headline`); None: the default rule."""
        return self._class_axis


class _Top1:
    """Top-1 hits of a model's raw outputs against the held labels, counted batch by batch
    while agreement reads the same outputs (:meth:`AgreementReference.outputs_of`)."""

    def __init__(self, labels: Sequence[torch.Tensor], task: str) -> None:
        self.labels, self.task, self.hits = labels, task, 0
        self.total = sum(int(t.numel()) for t in labels)

    def __call__(self, index: int, outputs: Any) -> None:
        from edgeslim.train.loop import top1_hits

        try:
            self.hits += top1_hits(outputs, self.labels[index])
        except ValueError as exc:  # labels that do not fit the first output
            raise TaskError(f"task {self.task!r}: validation labels: {exc}") from None

    @property
    def value(self) -> float:
        return 100.0 * self.hits / max(self.total, 1)


def _failing_layer(model: nn.Module, exc: BaseException) -> str | None:
    """``"`fqn` (Type)"`` of the innermost layer of ``model`` whose code raised ``exc``, or
    None when it was raised outside the model (in the metric function itself)."""
    names = {id(m): fqn for fqn, m in model.named_modules()}
    found: str | None = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            fqn = names[id(owner)] or "(the model's own forward)"
            found = f"`{fqn}` ({type(owner).__name__})"
        tb = tb.tb_next
    return found


def _refuse_kind(model: nn.Module) -> None:
    """Weights other than float32 and a BatchNorm without running statistics: refused
    naming the first such parameter or layer, before any stage reads the model."""
    odd = next(
        ((n, p.dtype) for n, p in model.named_parameters()
         if p.is_floating_point() and p.dtype != torch.float32),
        None,
    )  # fmt: skip
    if odd is not None:
        raise TaskError(
            f"the model's weights are {odd[1]} (first: {odd[0]}); edgeslim compresses "
            "float32 models (quantization, calibration and the ONNX export start from "
            "float32): pass model.float()"
        )
    batch_stats = next(
        (n for n, m in model.named_modules()
         if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None),
        None,
    )  # fmt: skip
    if batch_stats is not None:
        raise TaskError(
            f"BatchNorm `{batch_stats}` keeps no running statistics "
            "(track_running_stats=False): it normalises every batch by that batch's own "
            "statistics, at inference too, so its output depends on the batch and no fixed "
            "form of it can be quantized or exported. Give it running statistics (create "
            "it with track_running_stats=True and run training data through in train "
            "mode), or replace it (GroupNorm, InstanceNorm)."
        )


def same_but_batch(a: Sequence[int], b: Sequence[int], batch_dim: int) -> bool:
    """Whether shapes ``a`` and ``b`` agree on every dimension but ``batch_dim``."""
    a, b = tuple(a), tuple(b)
    return a[:batch_dim] + a[batch_dim + 1 :] == b[:batch_dim] + b[batch_dim + 1 :]


def _as_metrics(value: Any, name: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        if not value:
            raise TaskError("the task's metric function returned an empty dict")
        try:
            out = {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise TaskError("the task's metric function must return float values") from None
    else:
        try:
            out = {name: float(value)}
        except (TypeError, ValueError):
            raise TaskError(
                f"the task's metric function returned {type(value).__name__}; it must return "
                "a float or a dict of floats"
            ) from None
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:  # a NaN compares false with every limit: it would pass for a result
        raise TaskError(
            f"the task's metric function returned {', '.join(f'{k}={out[k]}' for k in bad)}; "
            "a metric must be a finite number (check the model's outputs and the function)"
        )
    return out


def normalised_range(
    mean: Sequence[float] | float, std: Sequence[float] | float, lo: float = 0.0, hi: float = 1.0
) -> tuple[float, float]:
    """The interval of ``(x - mean) / std`` for ``x`` in ``[lo, hi]``, over the channels:
    what a task whose inputs are normalised pixels puts in ``input_ranges``."""
    means = [mean] if isinstance(mean, (int, float)) else list(mean)
    stds = [std] if isinstance(std, (int, float)) else list(std)
    if len(means) != len(stds) or any(s <= 0 for s in stds):
        raise TaskError(f"normalisation: mean {means} and std {stds} must pair up, std > 0")
    ends = [(v - m) / s for m, s in zip(means, stds, strict=True) for v in (lo, hi)]
    return min(ends), max(ends)
