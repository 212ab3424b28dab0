"""Conformance: Hugging Face ``transformers`` models, the ones users most often bring.

Built from small configs (random weights, no download). Their forwards are what plain
torch.fx cannot read: a decorated forward whose arguments all default to ``None`` with
``**kwargs`` (ViT), a Python check of the input's channel count (ResNet), TF "same" padding
computed with ``int(x.shape[-2])`` (MobileNetV2), a stateless ``nn.ReLU()`` built inside
forward (DistilBERT), ``torch.tensor`` of a size (DeBERTa-v2), ``torch.finfo(x.dtype)``
(SqueezeBERT), ``unfold`` along a negative axis (PatchTST), position buckets with ``-inf``
in them (WavLM), a branch on the batch size and linears stored transposed (GPT-2),
BatchNorm1d over a linear's tokens, hardswish and attention biases cached in eval mode
(LeViT). Each
goes through ``edgeslim.compress`` W8A8, its ONNX file runs in
ONNX Runtime at two batch sizes matching torch, and ``edgeslim.load`` rebuilds it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgeslim
from edgeslim.data import TensorBatches
from edgeslim.task import Task

transformers = pytest.importorskip("transformers")

# 7-bit weights (reduce_range): exact in ONNX Runtime on x86 CPUs without VNNI too
W8A8 = {"name": "w8a8", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8,
                                    "reduce_range": True}]}  # fmt: skip
MIN_COSINE = 0.98  # int8 fake-quant in torch vs the QDQ file in ONNX Runtime


def _kaiming(model: nn.Module) -> nn.Module:
    """Weights that carry a signal through the net (the configs' default init leaves a
    random MobileNetV2's logits near 1e-26, where any comparison is noise)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model.eval()


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return _kaiming(transformers.ViTForImageClassification(cfg))


def _resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    return _kaiming(transformers.ResNetForImageClassification(cfg))


def _mobilenet_v2() -> nn.Module:
    cfg = transformers.MobileNetV2Config(image_size=16, depth_multiplier=0.35, num_labels=5)
    return _kaiming(transformers.MobileNetV2ForImageClassification(cfg))


def _distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return _kaiming(transformers.DistilBertForSequenceClassification(cfg))


def _deberta_v2() -> nn.Module:
    """Its attention scale is ``torch.tensor(q.size(-1))``: fx cannot record the call."""
    cfg = transformers.DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return _kaiming(transformers.DebertaV2ForSequenceClassification(cfg))


def _squeezebert() -> nn.Module:
    """Grouped 1x1 Conv1d layers on ``(B, C, T)``; its mask calls ``torch.finfo(x.dtype)``."""
    cfg = transformers.SqueezeBertConfig(
        vocab_size=50, hidden_size=32, embedding_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
        num_labels=3,
    )  # fmt: skip
    return _kaiming(transformers.SqueezeBertForSequenceClassification(cfg))


def _patchtst() -> nn.Module:
    """A time-series transformer: ``unfold(-2, ...)`` patches (torch's exporter wrote them
    along the wrong axis)."""
    cfg = transformers.PatchTSTConfig(
        num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=16,
        num_attention_heads=2, num_hidden_layers=1, ffn_dim=32, num_targets=4,
    )  # fmt: skip
    return _kaiming(transformers.PatchTSTForClassification(cfg))


def _wavlm() -> nn.Module:
    """Relative-position buckets computed in float from ``arange`` (``log(0) = -inf``)."""
    cfg = transformers.WavLMConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, num_labels=4,
    )  # fmt: skip
    return _kaiming(transformers.WavLMForSequenceClassification(cfg))


def _gpt2() -> nn.Module:
    """Its masks expand position ids only when the batch differs from theirs (a branch on
    the batch size, no-op at batch 1); its layers are ``Conv1D``, linears stored
    transposed."""
    cfg = transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16, num_labels=3,
        pad_token_id=0, use_cache=False,
    )  # fmt: skip
    return _kaiming(transformers.GPT2ForSequenceClassification(cfg))


def _llama() -> nn.Module:
    """A small decoder LM (Llama; Qwen2 and Mistral share its layers): RMSNorm written out,
    rotary position tables from ``arange``, a gated SiLU MLP, grouped key/value heads."""
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        num_labels=3, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    return _kaiming(transformers.LlamaForSequenceClassification(cfg))


def _opt() -> nn.Module:
    """Its position mask is ``torch.ones(inputs_embeds.shape[0], n)``: a traced size."""
    cfg = transformers.OPTConfig(
        vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, word_embed_proj_dim=32, num_labels=3, pad_token_id=0,
        use_cache=False,
    )  # fmt: skip
    return _kaiming(transformers.OPTForSequenceClassification(cfg))


def _levit() -> nn.Module:
    """Weights of variance 1/fan_in: with Kaiming's (twice that) this LeViT is chaotic,
    1e-3 of input noise moved one image's logits by 24% of their scale, so no int8 file can
    agree with it (and torch's own float32 was 0.07% off float64 on one image:
    edgeslim.export.conditioning); a trained LeViT responds smoothly, as this one does."""
    cfg = transformers.LevitConfig(
        image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
        depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10,
    )  # fmt: skip
    model = transformers.LevitForImageClassification(cfg)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
    return model.eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vit": (_vit, (3, 16, 16)),
    "resnet": (_resnet, (3, 16, 16)),
    "mobilenet_v2": (_mobilenet_v2, (3, 16, 16)),
    "distilbert": (_distilbert, (10,)),
    "deberta_v2": (_deberta_v2, (10,)),
    "squeezebert": (_squeezebert, (10,)),
    "patchtst": (_patchtst, (32, 3)),
    "wavlm": (_wavlm, (400,)),
    "gpt2": (_gpt2, (10,)),
    "llama": (_llama, (10,)),
    "opt": (_opt, (10,)),
    "levit": (_levit, (3, 64, 64)),
}
TOKENS = ("distilbert", "deberta_v2", "squeezebert", "gpt2", "llama", "opt")


def _inputs(name: str, shape: tuple[int, ...], n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name in TOKENS:  # (from 1: 0 is GPT-2's padding token)
        return torch.randint(1, 50, (n, *shape), generator=g)
    return torch.randn((n, *shape), generator=g)


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, dict):  # (PatchTST names its output `prediction_logits`)
        return out["logits"] if "logits" in out else next(iter(out.values()))
    return out[0]  # type: ignore[index]


@pytest.mark.parametrize("name", list(MODELS))
def test_a_hugging_face_model_compresses_exports_and_reloads(name: str, tmp_path: Path) -> None:
    build, shape = MODELS[name]
    x = _inputs(name, shape, 48)
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    result = edgeslim.compress(build(), W8A8, task, out=tmp_path / "out", quick=True)

    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    (feed,) = [i.name for i in session.get_inputs()]
    for batch in (1, 7):
        xb = x[:batch]
        with torch.no_grad():
            want = _logits(result.model(xb)).numpy()
        got = session.run(None, {feed: xb.numpy()})[0]
        assert got.shape == want.shape
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= MIN_COSINE, cos

    again = edgeslim.load(tmp_path / "out", model=build())  # checks the recorded outputs
    with torch.no_grad():
        torch.testing.assert_close(_logits(again(x[:5])), _logits(result.model(x[:5])))
