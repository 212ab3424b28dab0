"""Agreement with the uncompressed model: an honest metric that needs no labels.

- ``agreement``: top-1 agreement (%) of the first output's argmax over its classes (its
  last dimension; axis 1 of a ``(N, C, H, W)`` map, and of a ``(N, C, T)`` one a conv
  wrote, :func:`channels_first_classes`), counted on rows where the reference
  is at least ``min_confidence`` sure of its top-1 (softmax); ``agreement_all`` counts
  every row when a threshold is set.
- ``top5_agreement``: the reference's top-1 is among the compressed model's top 5 (outputs
  with at least 10 classes only).
- ``cosine``: mean per-row cosine similarity of every output, averaged over the outputs
  (for an output whose rows hold one value, the correlation of those values, :func:`_cosine`).

A row is one vector along an output's last dimension (so a state shaped
``(layers, batch, hidden)`` contributes ``layers * batch`` rows), or, for an output of 4 or
more dims ``(N, C, H, W)``, along axis 1: one row per pixel (a segmentation map; see
:func:`~edgeslim.train.loop.classes_last`); a 1-D output holds one score per sample (a
binary classifier's squeezed logit), a 0-d one is one row per batch.

Decision: a first output with one score per row (``(N, 1)`` or ``(N,)``) is a binary
decision, ``score > t``, and agreement counts equal decisions. ``t`` is 0.5 when every
reference score lies in [0, 1] (probabilities), else 0 (logits); confidence is the
reference's probability of its decision (the sigmoid of a logit). An argmax over one value
is always 0, so the multi-class rule read 100% for any model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.data.batching import Inputs, flat_outputs
from edgeslim.train.loop import classes_last, decision_threshold

__all__ = ["flat_outputs"]  # read from here by distillation; defined with the batch shapes


def _rows(t: torch.Tensor, class_axis: int | None = None) -> torch.Tensor:
    t = classes_last(t.detach().float(), class_axis)
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, 1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def _decisions(
    ref: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hit, ref decision, ref confidence)`` per row: the argmax for several classes, the
    side of the threshold for one score (module doc)."""
    if ref.shape[-1] > 1:
        top = ref.argmax(-1)
        return (out.argmax(-1) == top).float(), top, ref.softmax(-1).amax(-1)
    t = decision_threshold(ref)
    side = ref[:, 0] > t
    p = ref[:, 0] if t == 0.5 else ref[:, 0].sigmoid()
    return ((out[:, 0] > t) == side).float(), side.long(), torch.maximum(p, 1 - p)


OnOutput = Callable[[int, Any], None]


@torch.no_grad()
def model_outputs(
    module: nn.Module | Any,
    batches: Sequence[Inputs],
    class_axis: int | None = None,
    on_output: OnOutput | None = None,
) -> list[torch.Tensor]:
    """Every output of ``module`` over ``batches``, as rows concatenated over the batches;
    the first output's rows run along ``class_axis`` when given (:func:`classes_last`).
    ``on_output(i, raw)`` sees batch ``i``'s raw output too (top-1 on labels, same pass)."""
    if isinstance(module, nn.Module):
        was = module.training
        module.eval()
    per: list[list[torch.Tensor]] = []
    try:
        for i, inputs in enumerate(batches):
            raw = module(*inputs)
            if on_output is not None:
                on_output(i, raw)
            outs = flat_outputs(raw)
            if not outs:
                raise TypeError("the model returned no tensor")
            if not per:
                per = [[] for _ in outs]
            for i, (acc, t) in enumerate(zip(per, outs, strict=False)):
                acc.append(_rows(t, class_axis if i == 0 else None))
    finally:
        if isinstance(module, nn.Module):
            module.train(was)
    return [torch.cat(acc) for acc in per]


@dataclass(frozen=True)
class AgreementReference:
    """The uncompressed model's outputs on the held inputs (the first output's classes on
    ``class_axis``, None for the default rule of :func:`classes_last`)."""

    batches: list[Inputs]
    outputs: list[torch.Tensor]
    class_axis: int | None = None

    @classmethod
    def of(
        cls, module: nn.Module, batches: list[Inputs], class_axis: int | None = None,
        on_output: OnOutput | None = None,
    ) -> AgreementReference:  # fmt: skip
        return cls(batches, model_outputs(module, batches, class_axis, on_output), class_axis)

    def outputs_of(
        self, module: nn.Module | Any, on_output: OnOutput | None = None
    ) -> list[torch.Tensor]:
        """``module``'s outputs on the same inputs, as rows read the same way."""
        return model_outputs(module, self.batches, self.class_axis, on_output)


def agreement_metrics(
    ref: AgreementReference, outputs: list[torch.Tensor], min_confidence: float = 0.0
) -> dict[str, float]:
    """Agreement (%), top-5 agreement (%) and cosine of ``outputs`` against the reference."""
    if len(outputs) != len(ref.outputs) or any(
        a.shape != b.shape for a, b in zip(outputs, ref.outputs, strict=False)
    ):
        got = [list(o.shape) for o in outputs]
        want = [list(o.shape) for o in ref.outputs]
        raise ValueError(f"outputs {got} do not match the reference's {want}")
    r, o = ref.outputs[0], outputs[0]
    hit, ref_top, confidence = _decisions(r, o)
    metrics: dict[str, float] = {}
    if min_confidence > 0:
        sure = confidence >= min_confidence
        metrics["agreement"] = 100.0 * float(hit[sure].mean()) if bool(sure.any()) else 0.0
        metrics["agreement_all"] = 100.0 * float(hit.mean())
        metrics["confident_rows"] = float(sure.sum())
    else:
        metrics["agreement"] = 100.0 * float(hit.mean())
    if r.shape[-1] >= 10:
        top5 = o.topk(5, dim=-1).indices
        metrics["top5_agreement"] = 100.0 * float((top5 == ref_top[:, None]).any(-1).float().mean())
    cos = [_cosine(a, b) for a, b in zip(outputs, ref.outputs, strict=True)]
    metrics["cosine"] = sum(cos) / len(cos)
    return metrics


def _cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-row cosine of ``out`` to ``ref``; for rows of one value, the cosine of the
    centred columns (the correlation of the values over every held row).

    Why: the cosine of two single numbers is their sign alone, 1.0 for any two positive
    ones: a depth or mask map ``(N, 1, H, W)`` (one row per pixel) and a score per sample
    read 1.0 after any compression (a data-free file whose pixels agreed 70% on a 0.5
    threshold read cosine 1.0000).
    """
    if ref.shape[-1] == 1:
        a, b = out[:, 0] - out[:, 0].mean(), ref[:, 0] - ref[:, 0].mean()
        if float(b.norm()) == 0.0:  # a constant reference: equal or not, nothing to correlate
            return 1.0 if torch.equal(out, ref) else 0.0
        return float(nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
    cos = nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12)
    # a row of zeros has no direction: equal rows agree (a ReLU'd depth map's empty rows
    # read cosine 0 against themselves), unequal ones do not
    both_zero = (ref.abs().amax(-1) == 0) & (out.abs().amax(-1) == 0)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).mean())


def _ratio_whole(a: int, b: int) -> bool:
    lo, hi = min(a, b), max(a, b)
    return lo > 0 and hi % lo == 0


def _like_input(out: torch.Tensor, x: torch.Tensor) -> bool:
    """``out`` has ``x``'s channels (axis 1) and, for 4 or more dims, its other axes scaled
    by whole factors; a 3-dim output must equal the input's shape (``(N, T, F)`` sequences
    put time on axis 1, so scaled shapes there are a tagger's as often as a signal's)."""
    if out.dim() < 3 or x.dim() != out.dim():
        return False
    if out.dim() == 3:
        return out.shape[1:] == x.shape[1:]
    pairs = zip(out.shape[2:], x.shape[2:], strict=True)
    return out.shape[1] == x.shape[1] and all(_ratio_whole(int(a), int(b)) for a, b in pairs)


def _pixel_map(out: torch.Tensor, x: torch.Tensor) -> bool:
    """``out`` is ``(N, H', W')`` for an image ``x`` of ``(N, C, H, W)``, both axes scaled by
    one whole factor (DPT's depth at twice its input's size, a saliency map at a quarter).
    Decision: one factor for both axes, so a sequence ``(N, T, classes)`` read off an image
    (a CRNN's) is not taken for a map unless its classes happen to scale ``W`` as ``T``
    scales ``H``."""
    if out.dim() != 3 or x.dim() != 4 or not x.is_floating_point():
        return False
    h, w = int(x.shape[2]), int(x.shape[3])
    a, b = int(out.shape[1]), int(out.shape[2])
    return _ratio_whole(a, h) and _ratio_whole(b, w) and a * w == b * h


def values_not_classes(
    inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> str | None:
    """Why the outputs (raw, at batch 1) are values, not class scores, or None.

    Three shapes say so: a first output shaped like an input (:func:`_like_input`: a
    super-resolved, denoised or reconstructed image, ``(1, 3, 64, 64) -> (1, 3, 128,
    128)``), one value per pixel of an image input (:func:`_pixel_map`: a depth map
    ``(1, 64, 64)``, where an argmax over each row of pixels read 82% "agreement"), and
    several maps of 4 or more dims at different resolutions (a detector's
    heads, whose channels mix boxes, objectness and classes). Decision: the task's headline
    is then ``cosine``; an argmax over an RGB pixel's channels reads 98% for noise. A
    3-class segmentation map of an RGB input looks like an image too: the note says how to
    choose agreement.
    """
    if not outputs:
        return None
    first = outputs[0]
    for x in inputs:
        if _like_input(first, x):
            return (f"its first output {list(first.shape)} is shaped like its input "
                    f"{list(x.shape)} (an image or a signal, not class scores)")  # fmt: skip
        if _pixel_map(first, x):
            return (f"its first output {list(first.shape)} is one value per pixel of its "
                    f"input {list(x.shape)} (a depth or mask map, not class scores)")  # fmt: skip
    maps = [list(o.shape[2:]) for o in outputs if o.dim() >= 4]
    if len({tuple(m) for m in maps}) > 1:
        return (f"it returns maps at several resolutions ({', '.join(map(str, maps))}: a "
                "detector's heads, whose channels are not one set of classes)")  # fmt: skip
    return None


WeightOutput = tuple[str, nn.Module, torch.Tensor]


def weight_layer_outputs(
    module: nn.Module, inputs: Inputs
) -> tuple[list[torch.Tensor], list[WeightOutput]]:
    """``module``'s outputs on ``inputs`` (no gradients) and, in the order they ran, each
    conv or linear layer that returned a 3-dim tensor, with that tensor: where per-frame
    scores' channels come from."""
    ran: list[WeightOutput] = []

    def hook(layer: nn.Module, args: Any, out: Any) -> None:
        # only 3-dim outputs can be (N, C, T) scores: the rest need not be held
        if isinstance(out, torch.Tensor) and out.dim() == 3:
            ran.append((names[id(layer)], layer, out))

    names = {id(m): n for n, m in module.named_modules()}
    weighted = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, weighted)]
    try:
        with torch.no_grad():
            outs = flat_outputs(module(*inputs))
    finally:
        for h in handles:
            h.remove()
    return outs, ran


def channels_first_classes(
    outputs: Sequence[torch.Tensor], ran: Sequence[WeightOutput]
) -> str | None:
    """Why the first output's classes sit on axis 1, not last, or None: a 3-dim output
    ``(N, C, T)`` written by a conv (a WaveNet's, a CTC speech model's per-frame scores; a
    log-softmax over axis 1 after it included). The writer is the last conv or linear whose
    output is 3-dim with as many values (a head computed after it, of another size, does not
    count); a linear's ``(N, T, C)`` keeps the last axis, and so does a view that moved the
    conv's channels last (``.transpose(1, 2)``, told apart from ``(N, C, T)`` by its
    strides even when ``C == T``)."""
    if not outputs or outputs[0].dim() != 3:
        return None
    first = outputs[0]
    for fqn, layer, out in reversed(ran):
        if out.numel() != first.numel():
            continue
        if not isinstance(layer, nn.modules.conv._ConvNd):
            return None  # a linear wrote it: features last
        if out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
            # a view of the conv's output: where did its channel axis go?
            channel = (out.stride(1), out.shape[1])
            moved = [d for d in range(3) if (first.stride(d), first.shape[d]) == channel]
            if 1 not in moved or 2 in moved:
                return None
        elif first.shape != out.shape:
            return None
        return (f"its first output {list(first.shape)} holds the {out.shape[1]} channels of "
                f"conv `{fqn}` on axis 1")  # fmt: skip
    return None


def one_sided(ref: AgreementReference) -> str | None:
    """Why agreement cannot fall below 100, or None: a first output of one score per row
    whose every held reference score is decided the same way (a distance, a count, a
    regression value is never below 0), so any model that keeps the sign agrees."""
    r = ref.outputs[0]
    if r.shape[-1] != 1 or r.numel() < 2:
        return None
    t = decision_threshold(r)
    above = int((r[:, 0] > t).sum())
    if 0 < above < r.shape[0]:
        return None
    side = "above" if above else "at or below"
    return (f"every held reference score of the first output is {side} {t:g}, so agreement "
            "(the same side of it) reads 100 for any model that keeps that side")  # fmt: skip


def one_class(ref: AgreementReference) -> str | None:
    """Why agreement says little, or None: every held row's reference top-1 is one class
    (an untrained head, held samples all of one kind, a constant input), so agreement only
    tells whether that class stays on top: a model that always answers it reads 100."""
    r = ref.outputs[0]
    if r.shape[-1] < 2 or r.shape[0] < 2:
        return None
    top = r.argmax(-1)
    if bool((top != top[0]).any()):
        return None
    return (f"the uncompressed model puts class {int(top[0])} on top for every one of the "
            f"{r.shape[0]} held rows, so agreement only tells whether that class stays on top "
            "(a model that always answers it reads 100)")  # fmt: skip


def prediction_divergence(ref: AgreementReference, outputs: list[torch.Tensor]) -> float | None:
    """Mean ``KL(p_ref || p)`` of the first output's softmax over its classes, per row (nats);
    None when that output has one column (a score, not a distribution). The search's loss
    on unlabelled data: the same quantity its Hessian-trace prices are in
    (:mod:`edgeslim.search.hessian`), so measured and predicted sensitivities can be added."""
    r, o = ref.outputs[0].float(), outputs[0].float()
    if r.shape[-1] < 2 or r.shape != o.shape:
        return None
    p_ref = r.softmax(-1)
    kl = (p_ref * (r.log_softmax(-1) - o.log_softmax(-1))).sum(-1)
    return float(kl.mean())
