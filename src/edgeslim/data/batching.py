"""The shapes data takes on its way to an algorithm: input tuples and ``(inputs, target)``.

Every algorithm that reads data (PTQ calibration, bias correction, fine-tuning, QAT,
learned gates, data-driven importance, distillation) takes plain iterables of these, so a
``torch.utils.data.DataLoader``, a list of tuples or a :class:`TensorBatches` all work:

- an **input batch** is a tuple of tensors, one per model input (a bare tensor is read as
  a one-input tuple);
- a **training batch** is ``(inputs, target)``; ``target`` may be ``None`` when the loss
  needs no labels (distillation from a teacher).

Iterables used for training are iterated once per epoch, so they must be re-iterable (a
list, a DataLoader, a :class:`TensorBatches`), never a one-shot generator. Batches of
another shape (a ``dict`` per batch) go through :class:`MappedBatches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from edgeslim.errors import BatchError

Inputs = tuple[torch.Tensor, ...]
Batch = tuple[Inputs, Any]
Transform = Callable[[Inputs, torch.Generator], Inputs]


def _what(item: Any) -> str:
    """A batch's type, with a mapping's keys (a Hugging Face style ``dict`` batch)."""
    if isinstance(item, Mapping):
        return f"{type(item).__name__} with keys {list(item)[:8]}"
    return type(item).__name__


def as_inputs(item: Any) -> Inputs:
    """One input batch as a tuple of tensors (a bare tensor is one input)."""
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item)
    hint = ""
    if isinstance(item, Mapping):
        keys = list(item)
        label = next((k for k in keys if "label" in str(k).lower() or k in ("y", "target")), None)
        key = next((k for k in keys if k != label), "x")
        hint = (
            f"; map each batch to the model's inputs with edgeslim.data.MappedBatches("
            f"loader, lambda b: b[{key!r}])"
        )
        if label is not None and label != key:  # validation keeps labels for top-1
            hint += f" (validation and training: lambda b: (b[{key!r}], b[{label!r}]))"
    raise BatchError(
        "an input batch must be a tensor or a tuple of tensors (one per model input); "
        f"got {_what(item)}{hint}"
    )


def as_batch(item: Any) -> Batch:
    """One training batch as ``(inputs, target)``: a pair, or a flat tuple of three or
    more tensors read as ``(*inputs, target)`` (a ``DataLoader`` over
    ``TensorDataset(x0, x1, y)`` for a two-input model)."""
    if _flat_tensors(item, min_len=3):
        return split_batch(item, len(item) - 1)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        hint = ""
        if isinstance(item, Mapping):
            hint = (
                "; map each batch to a pair with edgeslim.data.MappedBatches(loader, "
                "lambda b: (b['<input key>'], b['<label key>']))"
            )
        raise BatchError(
            "a training batch must be a pair (inputs, target), inputs a tensor or a tuple of "
            f"tensors; got {_what(item)}{hint}"
        )
    return as_inputs(item[0]), item[1]


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (tensor, tuple/list, dict, nested), in order: what
    agreement compares and whose first is the logits training reads."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def output_labels(out: Any) -> list[str]:
    """A name for each tensor of :func:`flat_outputs` (same order): the dict keys when the
    output holds a dict (``logits``, ``boxes``; nested ones joined with ``.``, a list's
    items numbered), else ``output``, ``output1``, ... as before. Why: a detection model's
    ``{"logits", "boxes"}`` exported as ``output`` and ``output1``, and a user reading the
    file had to guess which was which."""

    def walk(o: Any, path: str) -> list[str]:
        if isinstance(o, torch.Tensor):
            return [path]
        if isinstance(o, Mapping):
            return [n for k, v in o.items() for n in walk(v, f"{path}.{k}" if path else str(k))]
        if isinstance(o, (tuple, list)):
            return [n for i, v in enumerate(o) for n in walk(v, f"{path}.{i}" if path else "")]
        return []

    plain = [f"output{i}" if i else "output" for i in range(len(flat_outputs(out)))]
    if not _holds_mapping(out):
        return plain
    named = [n if n else plain[i] for i, n in enumerate(walk(out, ""))]
    return named if len(set(named)) == len(named) else plain


def _holds_mapping(out: Any) -> bool:
    if isinstance(out, Mapping):
        return True
    return isinstance(out, (tuple, list)) and any(_holds_mapping(v) for v in out)


class MappedBatches:
    """``fn`` applied to every batch of ``data``, re-iterable as ``data`` is.

    For loaders whose batches are not what edgeslim reads (a tensor or tuple of input
    tensors, or ``(inputs, target)`` for training): a Hugging Face style ``dict`` batch,
    extra fields, inputs to move or cast. NNCF's ``transform_fn`` plays this part::

        Task(example_inputs=(x,), calibration=MappedBatches(loader, lambda b: b["pixel_values"]),
             train=MappedBatches(loader, lambda b: (b["pixel_values"], b["labels"])))

    Decision: a wrapper, not a ``Task`` field, so every place that takes batches (the
    Python API's ``ptq``, ``train_gates``, ...) takes it too.
    """

    def __init__(self, data: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self.data = data
        self.fn = fn

    def __iter__(self) -> Iterator[Any]:
        for item in self.data:
            yield self.fn(item)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    @property
    def one_shot(self) -> bool:
        """Whether the wrapped data is a one-shot iterator (then so is this)."""
        return is_one_shot(self.data)


def split_batch(item: Any, n_inputs: int | None = None) -> tuple[Inputs, Any]:
    """``(inputs, target)`` of one batch, ``target`` None when the batch holds inputs only.

    A pair whose first element is itself a tuple/list of tensors, or whose second element is
    not a tensor, is ``(inputs, target)``. With the model's number of inputs known, a flat
    tuple of ``n_inputs + 1`` tensors is ``(*inputs, target)``: a ``DataLoader`` over a
    ``TensorDataset(x, y)`` yields ``[x, y]`` for a one-input model, which read as two
    inputs. Anything else is input tensors.
    """
    if (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and (isinstance(item[0], (tuple, list)) or not isinstance(item[1], torch.Tensor))
    ):
        return as_inputs(item[0]), item[1]
    if n_inputs is not None and _flat_tensors(item) and len(item) == n_inputs + 1:
        return tuple(item[:n_inputs]), item[n_inputs]
    return as_inputs(item), None


def _flat_tensors(item: Any, min_len: int = 1) -> bool:
    """A tuple or list of at least ``min_len`` tensors, none nested."""
    return (
        isinstance(item, (tuple, list))
        and len(item) >= min_len
        and all(isinstance(t, torch.Tensor) for t in item)
    )


def input_batches(data: Iterable[Any], n_inputs: int | None = None) -> Iterator[Inputs]:
    """Input tuples from an iterable of input batches or of ``(inputs, target)`` pairs, the
    target dropped (:func:`split_batch`, which ``n_inputs`` helps tell them apart)."""
    for item in data:
        yield split_batch(item, n_inputs)[0]


def batch_size_of(inputs: Inputs, batch_dims: Sequence[int] | None = None) -> int:
    """How many samples an input batch holds (along each input's batch dimension)."""
    dim = batch_dims[0] if batch_dims else 0
    return int(inputs[0].shape[dim])


def take_samples(
    data: Iterable[Any], limit: int | None, batch_dims: Sequence[int] | None = None
) -> list[Inputs]:
    """The first input batches of ``data`` holding at least ``limit`` samples (all: None).

    ``batch_dims`` gives one batch dimension per model input, so its length also tells a
    batch ``(x, y)`` of a one-input model from two inputs (:func:`split_batch`). The last
    batch is cut so exactly ``limit`` samples are taken when ``data`` has them.
    """
    out: list[Inputs] = []
    seen = 0
    dims = list(batch_dims) if batch_dims else None
    for inputs in input_batches(data, len(dims) if dims else None):
        n = batch_size_of(inputs, dims)
        if limit is not None and seen + n > limit:
            keep = limit - seen
            inputs = tuple(t.narrow(dims[i] if dims else 0, 0, keep) for i, t in enumerate(inputs))
            n = keep
        if n > 0:
            out.append(inputs)
        seen += n
        if limit is not None and seen >= limit:
            break
    return out


def is_one_shot(data: Iterable[Any]) -> bool:
    """True for an iterator (a generator): it would be empty from the second epoch on."""
    if isinstance(data, MappedBatches):
        return data.one_shot
    return iter(data) is data


class TensorBatches:
    """In-memory tensors served as batches, re-iterable, seeded and optionally augmented.

    ``inputs`` share their batch dimension (``batch_dims``, default 0 for each: a recurrent
    state may carry its batch on dimension 1); ``target`` (optional) has it first. Iterating
    yields ``(inputs, target)`` when ``target`` is given (or ``pairs=True``), else input
    tuples. ``shuffle`` draws a new order each epoch from a generator seeded once, so two
    runs with the same seed see the same batches. ``transform(inputs, generator)`` is the
    task's augmentation, applied per batch while iterating.
    """

    def __init__(
        self,
        inputs: Inputs | torch.Tensor,
        target: torch.Tensor | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        transform: Transform | None = None,
        pairs: bool | None = None,
        batch_dims: tuple[int, ...] | None = None,
    ) -> None:
        raw = as_inputs(inputs)
        self.batch_dims = tuple(batch_dims) if batch_dims is not None else (0,) * len(raw)
        if len(self.batch_dims) != len(raw):
            raise ValueError(f"{len(raw)} inputs but {len(self.batch_dims)} batch dimensions")
        # stored batch-first; moved back to each input's batch dimension when served
        self.inputs = tuple(t.movedim(d, 0) for t, d in zip(raw, self.batch_dims, strict=True))
        n = int(self.inputs[0].shape[0])
        if any(int(t.shape[0]) != n for t in self.inputs) or (
            target is not None and len(target) != n
        ):
            raise ValueError("every input (and the target) needs the same number of samples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.target = target
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        self.pairs = target is not None if pairs is None else pairs
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def __len__(self) -> int:
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def _served(self, inputs: Inputs) -> Inputs:
        return tuple(
            t.movedim(0, d).contiguous() for t, d in zip(inputs, self.batch_dims, strict=True)
        )

    def rebatched(
        self, batch_size: int, shuffle: bool | None = None, seed: int | None = None
    ) -> TensorBatches:
        """The same data with another batch size (shuffling, seed), freshly seeded."""
        return TensorBatches(
            self._served(self.inputs), self.target, batch_size,
            self.shuffle if shuffle is None else shuffle, self.seed if seed is None else seed,
            self.transform, self.pairs, self.batch_dims,
        )  # fmt: skip

    def limited(self, limit: int | None) -> TensorBatches:
        """The first ``limit`` samples only (all when None)."""
        if limit is None or limit >= self.num_samples:
            return self
        target = None if self.target is None else self.target[:limit]
        inputs = self._served(tuple(t[:limit] for t in self.inputs))
        return TensorBatches(
            inputs,
            target,
            self.batch_size,
            self.shuffle,
            self.seed,
            self.transform,
            self.pairs,
            self.batch_dims,
        )

    def split(self, every: int) -> tuple[TensorBatches, TensorBatches]:
        """``(kept, held)``: every ``every``-th sample (from the last of the first ``every``)
        held out, unshuffled and unaugmented, e.g. to choose a fine-tune's epoch on inputs it
        never trains on; ``kept`` keeps this source's batching, shuffling and transform."""
        if every < 2:
            raise ValueError(f"every must be >= 2 (1 would hold out everything); got {every}")
        n = self.num_samples
        held = torch.zeros(n, dtype=torch.bool)
        held[every - 1 :: every] = True
        if not held.any():
            raise ValueError(f"{n} samples hold none out at every={every}")

        def part(mask: torch.Tensor, **kw: Any) -> TensorBatches:
            target = None if self.target is None else self.target[mask]
            inputs = self._served(tuple(t[mask] for t in self.inputs))
            return TensorBatches(inputs, target, self.batch_size, pairs=self.pairs,
                                 batch_dims=self.batch_dims, **kw)  # fmt: skip

        kept = part(~held, shuffle=self.shuffle, seed=self.seed, transform=self.transform)
        return kept, part(held)

    def __iter__(self) -> Iterator[Any]:
        n = self.num_samples
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = self._served(tuple(t[idx] for t in self.inputs))
            if self.transform is not None:
                inputs = self.transform(inputs, self._gen)
            if self.pairs:
                yield inputs, None if self.target is None else self.target[idx]
            else:
                yield inputs


def crop_flip(pad: int = 2) -> Transform:
    """Augmentation for image inputs (N, C, H, W): random crop after padding by ``pad``
    pixels with the image minimum, and a random horizontal flip (the zoo CNNs' recipe)."""

    def apply(inputs: Inputs, gen: torch.Generator) -> Inputs:
        x = inputs[0]
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
        out = out.permute(0, 3, 1, 2).contiguous()
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(3)
        return (out, *inputs[1:])

    return apply


def augmented_batches(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    seed: int = 0,
    pad: int = 2,
) -> TensorBatches:
    """Shuffled, seeded ``(images, labels)`` batches augmented by :func:`crop_flip`: how the
    zoo CNNs train, and how their fine-tunes (pruning, QAT, recipes) train too."""
    return TensorBatches(
        images, labels, batch_size, shuffle=True, seed=seed, transform=crop_flip(pad), pairs=True
    )


def run_batches(model: Any, data: Iterable[Any], handles: Iterable[Any] = ()) -> None:
    """Feed every input batch of ``data`` to ``model`` in eval mode, for what hooks collect;
    then remove ``handles`` (hook handles) and restore the model's mode, even on error."""
    was_training = model.training
    model.eval()
    try:
        for inputs in input_batches(data):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
