"""Tracing models whose forward fx cannot read as it is: shape conditions, decorated
forwards, modules built inside forward."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.errors import TraceError
from edgeslim.graph.trace import declare_inputs, trace


def _x(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 9, 11, generator=torch.Generator().manual_seed(seed))


class ChecksChannels(nn.Module):
    """Hugging Face's ResNet embeddings: a Python check of the input's channel count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.conv.in_channels:
            raise ValueError("wrong channel count")
        return self.conv(x).flatten(1)


class SamePadding(nn.Module):
    """TF "same" padding computed in Python from the input's height and width."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = max(3 - 2 - (h - 1) % 2, 0), max(3 - 2 - (w - 1) % 2, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        y = F.dropout(self.bn(self.conv(x)), 0.5, self.training)
        return y.mean((2, 3))


class BatchDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x.squeeze(0)
        return x


class ValueDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3 and x.mean() > 0:
            return x
        return -x


def returns_dict(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator in the style of Hugging Face's ``@can_return_tuple``."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        as_tuple = kwargs.pop("return_dict", True) is False
        out = forward(self, *args, **kwargs)
        return tuple(out.values()) if as_tuple else out

    return wrapper


class Decorated(nn.Module):
    """A decorated forward whose every argument has a default, with ``**kwargs``, and a
    stateless module built inside forward (DistilBERT's head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    @returns_dict
    def forward(
        self, features: torch.Tensor | None = None, labels: torch.Tensor | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        if features is None:
            raise ValueError("features are required")
        logits = nn.ReLU()(self.fc(features))
        return {"logits": logits} if labels is None else {"loss": logits.sum()}


class MaskedByDtype(nn.Module):
    """Hugging Face's masks: ``torch.finfo(x.dtype).min`` needs a real dtype."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        low = torch.finfo(y.dtype).min
        return torch.where(y > 0, y, torch.full_like(y, low)).amax((2, 3))


class ScaledBySize(nn.Module):
    """DeBERTa's attention scale, ``torch.tensor(q.size(-1), dtype=torch.float)``, in two
    layers (the second read the first one's tensor constant)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
            x = x / torch.sqrt(torch.tensor(x.size(-1), dtype=torch.float) * 2)
        return x.flatten(1)


def _declared(model: nn.Module, x: torch.Tensor) -> nn.Module:
    declare_inputs(model, 1, (x,), (0,))
    return model


@pytest.mark.parametrize("cls", [ChecksChannels, SamePadding, MaskedByDtype, ScaledBySize])
def test_a_shape_condition_resolves_once_the_example_is_declared(cls: type[nn.Module]) -> None:
    model = cls().eval()
    with pytest.raises(TraceError):  # fx alone stops at the condition
        trace(model)
    gm = trace(_declared(model, _x()))
    for batch in (1, 2, 5):  # the graph computes the model at every batch size
        x = _x(batch, seed=batch)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # nothing is left of the resolved condition: no unused shape reads
    assert all(n.users or n.op == "output" for n in gm.graph.nodes)
    assert not hasattr(torch.tensor, "__wrapped__")  # torch.tensor is torch's again


def test_resolving_leaves_the_model_state_and_the_random_stream_as_they_were() -> None:
    model = SamePadding().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    gm = trace(_declared(model, _x()))
    assert torch.equal(torch.rand(3), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the training-mode branch (dropout) is the one traced
    assert any(n.target is F.dropout for n in gm.graph.nodes)


def test_a_condition_on_the_batch_size_that_changes_the_output_stops_the_trace() -> None:
    with pytest.raises(TraceError, match=r"depends on the batch size.*at batch 1 its outputs"):
        trace(_declared(BatchDependent(), _x()))


class ExpandsWhenBatched(nn.Module):
    """GPT-2's masks: ``if batch != ids.shape[0]: ids = ids.expand(batch, -1)``, a no-op at
    batch 1, so the branch taken at batch 2 computes the model at every batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.arange(1.0, 5.0)[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if x.shape[0] != scale.shape[0]:
            scale = scale.expand(x.shape[0], -1)
        return self.conv(x).mean((2, 3)) * scale


def test_a_batch_condition_whose_general_branch_holds_at_batch_1_traces_and_exports(
    tmp_path: Any,
) -> None:
    from edgeslim.export import export_onnx
    from edgeslim.runtime.ort import ort_predict, ort_session

    model = ExpandsWhenBatched().eval()
    gm = trace(_declared(model, _x()))
    for batch in (1, 4):
        torch.testing.assert_close(gm(_x(batch)), model(_x(batch)))
    # exported at batch 2 (the general branch), it runs at every batch
    path = export_onnx(model, (_x(),), tmp_path / "m.onnx")
    x = _x(5, seed=3)
    torch.testing.assert_close(ort_predict(ort_session(path), x), model(x), rtol=1e-4, atol=1e-5)


def test_a_condition_on_tensor_values_still_stops_the_trace() -> None:
    with pytest.raises(TraceError, match="reads tensor values"):
        trace(_declared(ValueDependent(), _x()))


def test_a_decorated_forward_with_kwargs_traces_with_its_declared_inputs() -> None:
    model = Decorated().eval()
    x = torch.randn(1, 6)
    gm = trace(_declared(model, x))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    for batch in (1, 3):
        xb = torch.randn(batch, 6)
        torch.testing.assert_close(gm(xb)["logits"], model(xb)["logits"], rtol=0, atol=0)
    assert not any(n.op == "call_module" and "ReLU" in str(n.target) for n in gm.graph.nodes)
    assert type(model).__name__ == "Decorated" and type(model) is Decorated  # class restored


def test_a_decorated_forward_traces_without_a_declaration_too() -> None:
    gm = trace(Decorated().eval())  # one input: a forward whose arguments all have defaults
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 1


class CachesInEval(nn.Module):
    """Hugging Face's LeViT: in eval mode the attention biases are computed once and kept
    in a dict on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "b" not in self.cache:
            self.cache["b"] = self.bias * 2
        return self.fc(x) + self.cache["b"]


def test_a_trace_leaves_no_proxy_in_the_modules_state() -> None:
    model = CachesInEval().eval()
    first, second = trace(model), trace(model)  # the second read the first's proxy
    assert model.cache == {}
    x = torch.randn(3, 4)
    torch.testing.assert_close(second(x), model(x))
    torch.testing.assert_close(first(x), model(x))


class OneByOneInTraining(nn.Module):
    """A BatchNorm on a 1x1 map, then a shape condition (MobileNetV1's TF padding): in
    training mode at batch 1 the BatchNorm refuses to run (one value per channel)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.shape[-1] % 2 == 1:
            y = F.pad(y, (0, 1, 0, 1))
        return self.fc(y.mean((2, 3)))


def test_a_shape_after_a_training_batchnorm_on_one_value_resolves() -> None:
    model = OneByOneInTraining().train()
    x = torch.randn(1, 3, 3, 3)
    gm = trace(_declared(model, x))
    assert any(n.target is F.pad for n in gm.graph.nodes)
    assert model.training and model.bn.training  # modes as they were


class CachesOnFirstCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "memo"):
            self.memo = {"w": self.fc.weight * 2}
        return F.linear(x, self.memo["w"])


def test_a_cache_made_during_a_trace_is_not_left_behind() -> None:
    model = CachesOnFirstCall().eval()
    trace(model)
    assert not hasattr(model, "memo")
    x = torch.randn(2, 4)
    torch.testing.assert_close(trace(model)(x), model(x))


def test_a_model_traces_the_same_whether_its_cache_was_filled_or_not() -> None:
    """LeViT's cache, filled by an earlier eval call, made the biases a constant in the
    graph, while a fresh model (``edgeslim.load``) computed them: the reloaded quantizers
    did not match the saved ones. The cache is emptied while tracing, and given back."""
    fresh = CachesInEval().eval()
    used = copy.deepcopy(fresh)
    x = torch.randn(3, 4)
    used(x)
    cached = used.cache["b"]
    ops = [[(n.op, str(n.target)) for n in trace(m).graph.nodes] for m in (fresh, used)]
    assert ops[0] == ops[1] and ("get_attr", "bias") in ops[0]
    assert used.cache == {"b": cached} and fresh.cache == {}


class MaskFromSizes(nn.Module):
    """OPT's position mask: ``torch.ones(x.shape[0], n)`` (torch's parser takes no proxy as
    a size: "ones() takes 1 positional argument but 2 were given")."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[0], x.shape[1], device=x.device)
        positions = torch.arange(x.shape[1]).float()
        return self.fc(x) * mask[..., None] + positions[None, :, None]


def test_tensor_factories_given_traced_sizes_are_recorded_with_free_sizes() -> None:
    model = MaskFromSizes().eval()
    gm = trace(model)  # the plain trace: no example needed
    for batch, length in ((1, 4), (3, 7)):
        x = torch.randn(batch, length, 6)
        torch.testing.assert_close(gm(x), model(x))
    assert torch.ones.__module__ == "torch" and not hasattr(torch.ones, "__wrapped__")
