"""The layer table: per leaf module (by FQN) its type, shapes, parameters and MACs.

Built with forward hooks during one forward pass, so it works on any model that runs,
traceable or not (e.g. Hugging Face transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from edgeslim.graph.functional_macs import FunctionalMacs


@dataclass(frozen=True)
class LayerInfo:
    """One leaf module as seen in a forward pass (shapes include the batch dimension)."""

    fqn: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int
    calls: int = 1


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    if hasattr(obj, "last_hidden_state"):
        return _first_tensor(obj.last_hidden_state)
    return None


MHA = nn.MultiheadAttention
MHA_ARGS = ("query", "key", "value")  # its forward's first three parameters
RECURRENT_GATES: dict[type[nn.Module], int] = {
    nn.LSTM: 4,
    nn.LSTMCell: 4,
    nn.GRU: 3,
    nn.GRUCell: 3,
    nn.RNN: 1,
    nn.RNNCell: 1,
}
"""Gates per recurrent layer type: its ``weight_ih``/``weight_hh`` stack that many
``hidden_size``-row blocks (LSTM: i, f, g, o; GRU: r, z, n)."""


def recurrent_gates(module: nn.Module) -> int:
    """Gate count of a recurrent layer (0 if ``module`` is not one edgeslim knows)."""
    for cls, gates in RECURRENT_GATES.items():
        if isinstance(module, cls):
            return gates
    return 0


def recurrent_weights(module: nn.Module) -> list[torch.Tensor]:
    """Every matrix a recurrent layer multiplies a vector by once per step and sequence:
    ``weight_ih*``/``weight_hh*`` of every layer and direction (and LSTM projections)."""
    return [
        p
        for name, p in module.named_parameters(recurse=False)
        if name.startswith(("weight_ih", "weight_hh", "weight_hr"))
    ]


def recurrent_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one call of an RNN/LSTM/GRU (layer or cell): per time step and sequence, each
    gate's input and hidden matmul, i.e. ``G*H*(I+H)`` for one layer (biases and the
    element-wise gate arithmetic count 0, as for conv/linear).

    ``out`` is the first output: the output sequence ``(..., D*H_out)`` of a layer (its
    leading dims are batch x time in either order) or the new hidden state of a cell.
    """
    steps = int(out.numel()) // int(out.shape[-1]) if out.dim() else 1
    return steps * sum(int(w.numel()) for w in recurrent_weights(module))


def module_macs(module: nn.Module, out: torch.Tensor | None) -> int:
    """Multiply-accumulates of one call (batch included): conv, linear and recurrent layers.

    Normalisation, activations and pooling are counted as 0, the usual convention
    (Torch-Pruning, fvcore); attention matmuls are added by :func:`attention_macs`.
    """
    if out is None:
        return 0
    if recurrent_gates(module):
        return recurrent_macs(module, out)
    if isinstance(module, nn.modules.conv._ConvNd):
        k = 1
        for s in module.kernel_size:
            k *= int(s)
        return int(out.numel()) * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return int(out.numel()) * module.in_features
    return 0


def _mha_macs(module: MHA, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The q/k/v and output projections and both attention matmuls of one call."""
    qkv = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(MHA_ARGS)]
    if not all(isinstance(t, torch.Tensor) for t in qkv):
        return 0
    q, k, v = cast(list[torch.Tensor], qkv)
    e = int(module.embed_dim)
    tokens_q = int(q.numel()) // int(q.shape[-1])  # batch x target length
    tokens_k = int(k.numel()) // int(k.shape[-1])  # batch x source length
    batch = int(q.shape[0 if module.batch_first else 1]) if q.dim() == 3 else 1
    projections = tokens_q * e * e * 2 + tokens_k * e * (int(k.shape[-1]) + int(v.shape[-1]))
    return projections + 2 * tokens_q * (tokens_k // batch) * e


def attention_macs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """MACs an ``nn.MultiheadAttention`` computes outside any child a hook sees (torch runs
    its projections from the packed weights in one function); other attention modules'
    products (``q @ k^T``, SDPA) are counted as they run, by :mod:`.functional_macs`.

    Decision: no formula for BERT-style modules (``B*T*T*D`` from the input's shape): it
    took SqueezeBERT's channels-first ``(B, C, T)`` input for ``(B, T, C)`` and counted
    65,536 MACs where its products compute 9,216 (the MACs a W8A8 record compared then
    differed by half); counted as they run, BERT, RoBERTa, ALBERT, MobileBERT, wav2vec2
    and the rest gave the same totals as the formula.
    """
    if isinstance(module, MHA):
        return _mha_macs(module, args, kwargs)
    return 0


def layer_table(
    model: nn.Module, *example_args: Any, **example_kwargs: Any
) -> dict[str, LayerInfo]:
    """Run ``model(*example_args, **example_kwargs)`` once and describe every leaf module.

    Attention modules that compute matmuls outside any leaf are included too, and so are
    the products a ``forward`` computes by hand (``q @ k^T``, ``F.scaled_dot_product_attention``,
    ``einsum``; :mod:`.functional_macs`), on the row of the module that ran them, so that the
    MACs total covers them. Modules called several times have their MACs summed.
    """
    rows: dict[str, dict[str, Any]] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            inp = _first_tensor(args) if args else _first_tensor(kwargs)
            o = _first_tensor(out)
            macs = module_macs(mod, o) + attention_macs(mod, args, kwargs)
            if name in rows:
                rows[name]["macs"] += macs
                rows[name]["calls"] += 1
                return
            rows[name] = {
                "type": type(mod).__name__,
                "in_shape": tuple(inp.shape) if inp is not None else (),
                "out_shape": tuple(o.shape) if o is not None else (),
                # an MHA's out_proj is never called as a module: its weights are this row's
                "params": sum(p.numel() for p in mod.parameters(recurse=isinstance(mod, MHA))),
                "macs": macs,
                "calls": 1,
            }

        return fn

    for name, mod in model.named_modules():
        leaf = next(iter(mod.children()), None) is None
        if leaf or counts_own_macs(mod):  # the model itself too: a bare conv has MACs
            handles.append(mod.register_forward_hook(hook(name), with_kwargs=True))
    functional = FunctionalMacs(counts_own_macs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), functional.track(model):
            try:
                model(*example_args, **example_kwargs)
            except TypeError as exc:
                _refuse_packed_inputs(example_args, exc)
                raise
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    _add_functional(model, rows, functional)
    _own_out_proj(model, rows)
    order = [n for n, _ in model.named_modules() if n in rows]
    return {n: LayerInfo(n, **rows[n]) for n in order}


def _refuse_packed_inputs(example_args: tuple[Any, ...], exc: TypeError) -> None:
    """A model that failed on one tuple of tensors was most likely given its inputs packed:
    ``analyze(model, (x,))`` for ``analyze(model, x)`` (or ``*inputs``)."""
    if len(example_args) == 1 and isinstance(example_args[0], (tuple, list)):
        from edgeslim.errors import TraceError

        raise TraceError(
            f"the model raised TypeError on the example inputs ({exc}): they were given as one "
            f"{type(example_args[0]).__name__} of {len(example_args[0])}; pass each input as "
            "its own argument (`analyze(model, x)`, `analyze(model, *inputs)`)"
        ) from exc


def _own_out_proj(model: nn.Module, rows: dict[str, dict[str, Any]]) -> None:
    """An attention whose ``out_proj`` ran as a module (edgeslim's quantized twin calls it;
    torch's own never does) has that projection in the ``out_proj`` row: take its MACs and
    weights out of the attention's row, which counted them (a W8A8 record read 1,245,504
    MACs for an encoder of 1,114,432)."""
    for name, mod in model.named_modules():
        child = f"{name}.out_proj" if name else "out_proj"
        if isinstance(mod, MHA) and name in rows and child in rows:
            rows[name]["macs"] -= rows[child]["macs"]
            rows[name]["params"] -= rows[child]["params"]


def counts_own_macs(module: nn.Module) -> bool:
    """Whether :func:`module_macs`/:func:`attention_macs` count this module's products (so
    a matmul inside it is not counted again): convs, linears, recurrent layers and
    ``nn.MultiheadAttention``."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, MHA)) or bool(
        recurrent_gates(module)
    )


def _add_functional(model: nn.Module, rows: dict[str, dict[str, Any]], f: FunctionalMacs) -> None:
    """Fold the products counted outside counted modules into their modules' rows; a module
    with no row yet (a block whose ``forward`` does ``q @ k^T``; ``""``: the model itself)
    gets one, holding only its own parameters (its children's are in their rows)."""
    for name, macs in f.macs.items():
        if not macs:
            continue
        if name in rows:
            rows[name]["macs"] += macs
            continue
        mod = model.get_submodule(name)
        in_shape, out_shape = f.shapes.get(name, ((), ()))
        rows[name] = {
            "type": type(mod).__name__, "in_shape": in_shape, "out_shape": out_shape,
            "params": sum(p.numel() for p in mod.parameters(recurse=False)),
            "macs": macs, "calls": max(1, f.calls.get(name, 1)),
        }  # fmt: skip


def total_macs(table: dict[str, LayerInfo]) -> int:
    return sum(r.macs for r in table.values())


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
