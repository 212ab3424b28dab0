"""The data shapes algorithms take: crop/flip augmentation and seeded augmented batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslim.data.batching import TensorBatches, augmented_batches, crop_flip, take_samples


def test_crop_flip_is_a_shift_or_flip_of_the_input() -> None:
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)  # min 0 = pad value
    (out,) = crop_flip(1)((x,), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):
        nonzero = set(out[i][out[i] > 0].tolist())
        assert nonzero <= set(x[i].flatten().tolist())
        assert len(nonzero) >= 24  # at most one row and one column dropped


def test_augmented_batches_are_seeded_pairs() -> None:
    x, y = torch.randn(10, 1, 6, 6), torch.arange(10)
    a, b = (list(augmented_batches(x, y, 4, seed=3)) for _ in range(2))
    assert [len(t) for (_,), t in a] == [4, 4, 2]
    for ((xa,), ya), ((xb,), yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(torch.cat([t for _, t in a]).tolist()) == list(range(10))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 50),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
    limit=st.none() | st.integers(0, 45),
)
def test_tensor_batches_with_batch_dims_serve_every_sample_once(
    n: int, batch_size: int, shuffle: bool, seed: int, limit: int | None
) -> None:
    """An input (batch first) and a state with its batch on dimension 1, tagged with each
    sample's index: every epoch serves each sample exactly once, the two inputs aligned."""
    ids = torch.arange(n, dtype=torch.float32)
    x = ids[:, None].repeat(1, 3)  # (n, 3)
    h = ids[None, :, None].repeat(2, 1, 4)  # (2, n, 4)
    data = TensorBatches((x, h), ids.long(), batch_size, shuffle, seed, batch_dims=(0, 1))
    assert len(data) == -(-n // batch_size)
    for _ in range(2):  # a second epoch (reshuffled) too
        seen: list[int] = []
        for (bx, bh), target in data:
            assert bx.shape[1:] == (3,) and bh.shape[0] == 2 and bh.shape[2] == 4
            assert 1 <= bx.shape[0] <= batch_size and bh.shape[1] == bx.shape[0]
            assert torch.equal(bh, bx[None, :, :1].expand(2, -1, 4))
            assert torch.equal(target, bx[:, 0].long())
            seen += bx[:, 0].long().tolist()
        assert sorted(seen) == list(range(n))
    taken = take_samples(data, limit, (0, 1))
    got = [int(i) for bx, bh in taken for i in bx[:, 0]]
    assert len(got) == (n if limit is None else min(limit, n))
    assert all(bh.shape[1] == bx.shape[0] for bx, bh in taken)
    limited = data.limited(limit)
    assert limited.num_samples == (n if limit is None else min(limit, n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), every=st.integers(2, 6), shuffle=st.booleans())
def test_split_holds_every_nth_sample_out_and_keeps_the_rest_as_it_was(
    n: int, every: int, shuffle: bool
) -> None:
    """The two parts cover every sample once, aligned across inputs with a batch on
    dimension 1; the held part is in order and untransformed, the kept one keeps its
    shuffling and transform."""
    ids = torch.arange(n, dtype=torch.float32)
    x, h = ids[:, None].repeat(1, 3), ids[None, :, None].repeat(2, 1, 4)

    def plus_one(
        inputs: tuple[torch.Tensor, ...], _gen: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        return (inputs[0] + 1000, *inputs[1:])

    data = TensorBatches((x, h), ids.long(), 5, shuffle, 1, plus_one, batch_dims=(0, 1))
    if n < every:
        with pytest.raises(ValueError, match="hold none out"):
            data.split(every)
        return
    kept, held = data.split(every)
    held_ids = [int(t) for (bx, bh), y in held for t in y]
    assert held_ids == list(range(every - 1, n, every))
    for (bx, bh), y in held:
        assert torch.equal(bx[:, 0].long(), y) and torch.equal(bh[0, :, 0].long(), y)
    kept_ids = []
    for (bx, bh), y in kept:
        assert torch.equal(bx[:, 0].long() - 1000, y) and torch.equal(bh[0, :, 0].long(), y)
        kept_ids += y.tolist()
    assert sorted(kept_ids + held_ids) == list(range(n)) and kept.shuffle == shuffle


def test_split_refuses_holding_out_everything() -> None:
    with pytest.raises(ValueError, match="every must be >= 2"):
        TensorBatches(torch.zeros(4, 2)).split(1)


def test_output_labels_name_dict_outputs_by_their_keys() -> None:
    from edgeslim.data.batching import flat_outputs, output_labels

    t = torch.zeros(1)
    assert output_labels(t) == ["output"]
    assert output_labels((t, t)) == ["output", "output1"]
    nested = {"logits": t, "boxes": t, "aux": [t, {"mask": t}]}
    assert output_labels(nested) == ["logits", "boxes", "aux.0", "aux.1.mask"]
    assert len(output_labels(nested)) == len(flat_outputs(nested))
    assert output_labels((t, {"a": t})) == ["output", "a"]
    assert output_labels({"output1": t, "x": t, "y": (t, t)}) == ["output1", "x", "y.0", "y.1"]


def test_an_exported_dict_output_keeps_its_keys(tmp_path: Path) -> None:
    """A detection head's ``{"logits", "boxes"}`` was written as ``output`` and
    ``output1``; the file's outputs are named by the keys, each with a batch axis."""
    import onnxruntime as ort
    from torch import nn

    from edgeslim import Task
    from edgeslim.export.onnx import export_onnx
    from edgeslim.export.verify import task_axes

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.cls, self.box = nn.Conv2d(3, 8, 3), nn.Linear(8, 5), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.conv(x)).mean((2, 3))
            return {"logits": self.cls(h), "boxes": self.box(h)}

    model, x = Detector().eval(), torch.randn(1, 3, 12, 12)
    path = export_onnx(model, (x,), tmp_path / "m.onnx", **task_axes(Task((x,)), model))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "boxes"]
    logits, boxes = session.run(
        None, {session.get_inputs()[0].name: torch.randn(3, 3, 12, 12).numpy()}
    )
    assert logits.shape == (3, 5) and boxes.shape == (3, 4)
