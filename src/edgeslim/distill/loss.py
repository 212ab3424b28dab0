"""One distillation loss from several configs, with the teacher run once per batch.

``DistillLoss(teacher, student, [KDConfig(), FeatureConfig(taps=("layer2",))], example)``
is a ``loss(outputs, target, inputs)`` for :func:`~edgeslim.train.loop.train_classifier`
and every trainer built on it (QAT, pruning fine-tune, learned gates, recipe stages):

- the teacher is a frozen copy (eval mode, no gradients) run **once** per batch, that one
  forward giving its logits and every tapped feature together (with DCCD, on both views
  stacked along the batch);
- the student's features come from hooks on the student, filled by the forward the
  training loop just ran;
- the hard loss (cross-entropy by default) is added when the batch has labels, weighted
  ``1 - alpha`` of the KD config when there is one, else 1 (``hard_weight`` overrides).

Learned parts (feature adapters, DCCD projections) are this module's parameters. The
training loop builds its optimizer from ``model.parameters()``, so train
:meth:`DistillLoss.trainable_student` (the student with the adapters registered beside
it, same outputs) or add ``loss.parameters()`` to your own optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar, cast

import torch
from torch import nn

from edgeslim.data.batching import Inputs, as_inputs, flat_outputs
from edgeslim.distill.config import DistillConfig, DistillConfigError, KDConfig
from edgeslim.distill.taps import Taps
from edgeslim.train.loop import cross_entropy, first_output

ViewFn = Callable[[Inputs], Inputs]


@dataclass
class DistillBatch:
    """What a loss term sees for one batch. ``teacher_out`` is the teacher's first output,
    ``teacher_rest`` its other output tensors in order (a second head, a recurrent state);
    the ``*_view`` outputs exist when a term asked for a second view (DCCD)."""

    student_out: Any
    teacher_out: torch.Tensor
    target: Any
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    student_out_view: torch.Tensor | None = None
    teacher_out_view: torch.Tensor | None = None
    teacher_rest: tuple[torch.Tensor, ...] = ()

    @property
    def labelled(self) -> bool:
        return self.target is not None


class DistillTerm(nn.Module):
    """One loss term (the plug point): what it taps, and its weighted parts per batch.

    ``setup`` runs once on features of the example inputs when ``needs_shapes`` (to size
    adapters); ``view`` makes the second view when ``needs_view``.
    """

    name: str = "term"
    needs_shapes: bool = False
    needs_view: bool = False

    def __init__(self, pairs: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.pairs = tuple(pairs)

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.pairs)

    def setup(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> None:
        """Build learned parts from example features (default: nothing)."""

    def view(self, inputs: Inputs) -> Inputs:
        raise NotImplementedError

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


C = TypeVar("C")
TermBuilder = Callable[[Any], DistillTerm]
TERMS: dict[type[Any], TermBuilder] = {}
"""Term builders by config type: third parties register their own configs here."""


def register_term(
    config_type: type[C],
) -> Callable[[Callable[[C], DistillTerm]], Callable[[C], DistillTerm]]:
    """Decorator: ``builder(config) -> DistillTerm`` handles configs of ``config_type``."""

    def add(builder: Callable[[C], DistillTerm]) -> Callable[[C], DistillTerm]:
        if config_type in TERMS:
            raise ValueError(
                f"a distillation term for {config_type.__name__} is already registered"
            )
        TERMS[config_type] = builder
        return builder

    return add


def build_term(config: Any) -> DistillTerm:
    import edgeslim.distill.builtin  # noqa: F401  (registers the built-in terms)

    builder = TERMS.get(type(config))
    if builder is None:
        known = ", ".join(t.__name__ for t in TERMS)
        raise DistillConfigError(
            f"no distillation term for {type(config).__name__}; registered: {known}"
        )
    return builder(config)


class FrozenTeacher:
    """A frozen copy of the teacher (eval mode, no gradients) with its taps: one call, one
    forward, giving ``(outputs, features)``. A copy, so the caller's model keeps its mode and
    later hooks on it (learned gates, quantizers) never reach the teacher."""

    def __init__(self, teacher: nn.Module, taps: Iterable[str] = ()) -> None:
        self.module = copy.deepcopy(teacher).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        taps = tuple(taps)
        self.taps = Taps(self.module, taps, "teacher") if taps else None

    @torch.no_grad()
    def __call__(self, inputs: Inputs) -> tuple[Any, dict[str, torch.Tensor]]:
        # contiguous: the student's inputs may be channels_last
        out = self.module(*(x.contiguous() for x in inputs))
        return out, self.taps.take() if self.taps is not None else {}

    def remove(self) -> None:
        if self.taps is not None:
            self.taps.remove()


def _split(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return t[:n], t[n:]


class DistillLoss(nn.Module):
    """``loss(outputs, target, inputs)`` combining distillation terms (see the module doc).

    ``student`` is the model being trained (hooks are put on it for feature taps; it may be
    None for KD alone). ``example_inputs`` size the learned adapters and projections
    (needed by feature and DCCD terms). ``hard_loss(outputs, target)`` defaults to
    cross-entropy of the first output. ``last`` holds the weighted parts of the latest batch
    (for logs). Call :meth:`close` (or use ``with``) to remove the student's hooks.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module | None,
        configs: Sequence[DistillConfig],
        example_inputs: Sequence[torch.Tensor] | None = None,
        hard_loss: Callable[[Any, Any], torch.Tensor] | None = None,
        hard_weight: float | None = None,
    ) -> None:
        super().__init__()
        configs = tuple(configs)
        if not configs:
            raise DistillConfigError("DistillLoss needs at least one distillation config")
        for kind in {type(c) for c in configs}:
            if sum(type(c) is kind for c in configs) > 1:
                raise DistillConfigError(
                    f"two {kind.__name__}s: give one config per kind (list all taps in it)"
                )
        self.configs = configs
        terms = [build_term(c) for c in configs]
        self.terms = nn.ModuleList(terms)
        student_taps = [t for term in terms for t in term.student_taps]
        teacher_taps = [t for term in terms for t in term.teacher_taps]
        viewers = [term for term in terms if term.needs_view]
        if (student_taps or viewers) and student is None:
            raise DistillConfigError(
                f"{', '.join(type(c).__name__ for c in configs)} read the student's features "
                "or run it on a second view: pass the student model"
            )
        kd = next((c for c in configs if isinstance(c, KDConfig)), None)
        self.hard_weight = hard_weight if hard_weight is not None else (
            1.0 - kd.alpha if kd is not None else 1.0
        )  # fmt: skip
        self.hard_loss = hard_loss if hard_loss is not None else cross_entropy
        self.last: dict[str, float] = {}
        # not registered as submodules: neither the teacher nor the student is ours to train
        self.__dict__["_student"] = student
        self.__dict__["_viewer"] = viewers[0] if viewers else None  # already in self.terms
        self.__dict__["_student_taps"] = None
        self.__dict__["_teacher"] = None
        try:  # the student's taps first: its names are the ones a user gets wrong
            if student_taps:
                assert student is not None
                self.__dict__["_student_taps"] = Taps(student, student_taps, "student")
            self.__dict__["_teacher"] = FrozenTeacher(teacher, teacher_taps)
            if any(term.needs_shapes for term in terms):
                self._setup(example_inputs, configs)
        except BaseException:
            self.close()  # leave no hook behind on a refused construction
            raise

    @property
    def term_list(self) -> list[DistillTerm]:
        return cast(list[DistillTerm], list(self.terms))

    @property
    def student(self) -> nn.Module | None:
        student: nn.Module | None = self.__dict__["_student"]
        return student

    @property
    def teacher(self) -> nn.Module:
        """The frozen copy the loss runs (not the model passed in)."""
        teacher: FrozenTeacher = self.__dict__["_teacher"]
        return teacher.module

    def _setup(self, example_inputs: Sequence[torch.Tensor] | None, configs: Sequence[Any]) -> None:
        """Run student and teacher once on the example inputs to size the learned parts."""
        if example_inputs is None:
            needing = [
                type(c).__name__ for c, t in zip(configs, self.terms, strict=True) if t.needs_shapes
            ]
            raise DistillConfigError(
                f"{', '.join(needing)} size learned adapters/projections from the tapped "
                "features' shapes: pass example_inputs (the task's example inputs)"
            )
        inputs = as_inputs(tuple(example_inputs))
        student, taps = self.student, self.__dict__["_student_taps"]
        assert student is not None and taps is not None
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                student(*inputs)
        finally:
            student.train(was_training)
        s_feats = taps.take()
        _, t_feats = self.__dict__["_teacher"](inputs)
        for term in self.term_list:
            if term.needs_shapes:
                term.setup(s_feats, t_feats)

    def forward(self, outputs: Any, target: Any, inputs: Inputs) -> torch.Tensor:
        inputs = as_inputs(inputs)
        taps: Taps | None = self.__dict__["_student_taps"]
        s_feats = taps.take() if taps is not None else {}
        viewer: DistillTerm | None = self.__dict__["_viewer"]
        view = viewer.view(inputs) if viewer is not None else None
        t_inputs = inputs
        if view is not None:  # both views through the teacher in one forward
            t_inputs = tuple(
                torch.cat([a.contiguous(), b.contiguous()])
                for a, b in zip(inputs, view, strict=True)
            )
        t_out, t_feats = self.__dict__["_teacher"](t_inputs)
        t_first, *t_rest = flat_outputs(t_out) or [first_output(t_out)]
        batch = DistillBatch(outputs, t_first, target, s_feats, t_feats)
        batch.teacher_rest = tuple(t_rest)
        if view is not None:
            n = int(inputs[0].shape[0])
            batch.teacher_out, batch.teacher_out_view = _split(t_first, n)
            batch.teacher_rest = tuple(_split(t, n)[0] for t in t_rest)
            batch.teacher_features = {k: v[:n] for k, v in t_feats.items()}
            student = self.student
            assert student is not None
            batch.student_out_view = first_output(student(*view))
            if taps is not None:
                taps.take()  # the second view's student features are not used
        parts: dict[str, torch.Tensor] = {}
        if target is not None and self.hard_weight > 0:
            parts["hard"] = self.hard_weight * self.hard_loss(outputs, target)
        for term in self.term_list:
            parts.update(term(batch))
        if not parts:
            raise DistillConfigError(
                "nothing to train on: every distillation term has weight 0 and the batch has "
                "no labels"
            )
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return torch.stack(list(parts.values())).sum()

    def trainable_student(self) -> StudentWithAdapters:
        """The student with this loss's adapters registered beside it: train it instead of
        the student so an optimizer built from ``model.parameters()`` (as
        ``train_classifier`` builds it) learns the adapters too. Same outputs as the
        student, which is trained in place."""
        if self.student is None:
            raise DistillConfigError("this loss was built without a student")
        return StudentWithAdapters(self.student, self)

    def close(self) -> None:
        """Remove the hooks on the student and on the teacher copy."""
        taps = self.__dict__["_student_taps"]
        if taps is not None:
            taps.remove()
        if self.__dict__["_teacher"] is not None:
            self.__dict__["_teacher"].remove()

    def __enter__(self) -> DistillLoss:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class StudentWithAdapters(nn.Module):
    """``student`` and a :class:`DistillLoss`'s learned parts in one module whose forward is
    the student's: its ``parameters()`` are the student's plus the adapters'."""

    def __init__(self, student: nn.Module, loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.distill = loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)
