"""Output folders that are whole, described and reloadable.

Every output folder gets ``manifest.json``: each file with its SHA-256 and size, the
edgeslim/torch/onnxruntime versions, the recipe and the command line, so a folder can be
checked and its origin read long after the run. A ``compress`` folder's manifest also holds
the *rebuild* section: how to rebuild the compressed model without pickle, from

- the base model (a zoo name or ``module:factory`` with its checkpoint; or a fresh module
  the caller passes to :func:`load`),
- the structural steps of the recipe, replayed in order without data: prune plans (JSON)
  applied, quantize stages prepared (BN folded, fake-quant layers, edge quantizers) but not
  calibrated, data-free stages re-run (they read no data, so they repeat exactly),
- ``model.safetensors``: every weight and quantizer buffer (calibrated scales included),
- ``reload_check.safetensors``: the example inputs and the compressed model's outputs on
  them, compared bit for bit after the rebuild.

Folders are written into a temporary sibling (``.NAME.tmp-PID-*``) renamed into place at the
end; siblings left by a killed run (their PID is gone) are removed by the next run.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.errors import CheckpointError, EdgeslimError
from edgeslim.graph.reparam import bake_reparametrizations
from edgeslim.graph.trace import declare_inputs
from edgeslim.runtime.processes import alive

MANIFEST = "manifest.json"
REBUILD_FORMAT = "edgeslim-compressed"
REBUILD_VERSION = 1
CHECK_FILE = "reload_check.safetensors"
WEIGHTS_FILE = "model.safetensors"
NEAR_REL_TOLERANCE = 1e-3
"""A rebuilt model off by no more than this (of the output scale) is accepted with a warning:
another CPU or thread count may round float sums differently; more is a wrong rebuild."""
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-")


# --- versions and manifest -----------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Versions of the packages that shape an artifact (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("edgeslim", "torch", "onnxruntime", "onnx"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["torch"] = torch.__version__
    return out


def sha256_of(path: Path) -> str:
    """The file's sha256 (one implementation: :func:`edgeslim.checkpoint.sha256_file`)."""
    from edgeslim.checkpoint import sha256_file

    return sha256_file(path)


def state_sha256(model: nn.Module) -> str:
    """A digest of a model's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_manifest(
    folder: Path,
    recipe: dict[str, Any] | None = None,
    command: list[str] | None = None,
    **sections: Any,
) -> Path:
    """Write ``folder/manifest.json`` listing every file of ``folder`` with its SHA-256."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    data: dict[str, Any] = {
        "format": "edgeslim-manifest",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "command": command,
        "recipe": recipe,
        "files": files,
        **sections,
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of ``folder``; with ``verify``, every listed file is checked against
    its SHA-256 (a changed or missing file is refused, naming it)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = (
            " It holds results.json: it was written by an edgeslim older than manifests; "
            "re-run compress to get a reloadable folder."
            if (folder / "results.json").is_file()
            else ""
        )
        raise CheckpointError(f"{folder} has no {MANIFEST}; it is not an edgeslim output.{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "edgeslim-manifest":
        raise CheckpointError(f"{path} is not an edgeslim manifest")
    if verify:
        for name, meta in dict(data.get("files") or {}).items():
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"{folder}: {name}, listed in {MANIFEST}, is missing")
            if sha256_of(f) != meta.get("sha256"):
                raise CheckpointError(
                    f"{folder}: {name} does not match the SHA-256 in {MANIFEST}; it was "
                    "changed or is corrupt. Re-run the command that made the folder."
                )
    return data


# --- output folders: validate, write beside, move into place ---------------------------------


def clean_stale_siblings(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``target`` whose process
    is gone (a killed run); returns what was removed. A live run's folder is left alone; an
    ``.old`` folder of a run killed between its two renames is put back as ``target``."""
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for p in sorted(target.parent.iterdir()):
        m = _SIBLING.match(p.name)
        if not (m and m["name"] == target.name and not alive(int(m["pid"]))):
            continue
        if ".old-" in p.name and not target.exists():  # killed between the two renames
            p.rename(target)
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_out_folder(target: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` that is a file, a non-empty folder (unless
    ``force``: it is then replaced whole at the end) or in a place that cannot be written."""
    target = Path(target)
    clean_stale_siblings(target)  # a killed run's leftovers first (may restore target)
    if target.exists() and not target.is_dir():
        raise EdgeslimError(f"--out {target} exists and is not a folder; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not force:
        names = sorted(p.name for p in target.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise EdgeslimError(
            f"--out {target} is not empty ({shown}); pass --force (Python: force=True) to "
            "replace it whole, or choose a new folder"
        )
    check_writable(target)


def check_writable(target: Path) -> None:
    """Refuse a ``--out`` whose nearest existing parent folder is not writable, before work."""
    parent = Path(target).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise EdgeslimError(f"cannot write --out {target}: {parent} is not writable")


def temp_sibling(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` (same file system, so the final rename is
    atomic), named with this process's id so a later run can tell it is stale."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` whole (the old contents are removed only once the new are in)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


PLAN_GLOB = "model.plan*.json"  # the structural plans a compress run's stages write


def free_plan_path(out: Path, stem: str) -> Path:
    """``<stem>.json`` in ``out``, or ``<stem>.<k>.json`` when a stage of the same kind
    earlier in the recipe took it; ``stem`` starts with ``model.plan`` so the run's
    :data:`PLAN_GLOB` finds the file and reload replays it."""
    path, k = Path(out) / f"{stem}.json", 2
    while path.exists():
        path, k = Path(out) / f"{stem}.{k}.json", k + 1
    return path


# --- rebuild ------------------------------------------------------------------------------


@dataclass
class Lineage:
    """How a compressed model is rebuilt: its base model and the structural steps so far."""

    spec: str | None = None
    checkpoint: str | None = None
    base_class: str | None = None
    base_sha256: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None  # where the steps' files are (for a chained --from run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REBUILD_FORMAT,
            "version": REBUILD_VERSION,
            "model": {"spec": self.spec, "checkpoint": self.checkpoint, "class": self.base_class},
            "base_sha256": self.base_sha256,
            "steps": self.steps,
            "weights": WEIGHTS_FILE,
            "check": CHECK_FILE,
        }


@dataclass
class Artifact:
    """A reloaded ``compress`` output: the model, its manifest and the example inputs."""

    model: nn.Module
    folder: Path
    manifest: dict[str, Any]
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def lineage(self) -> Lineage:
        r = self.manifest["rebuild"]
        m = r.get("model") or {}
        return Lineage(
            m.get("spec"), m.get("checkpoint"), m.get("class"), r.get("base_sha256"),
            list(r.get("steps") or []), self.folder,
        )  # fmt: skip


def save_check(
    folder: Path, example: tuple[torch.Tensor, ...], outputs: list[torch.Tensor]
) -> Path:
    """Write the example inputs and the model's outputs on them, for the reload check."""
    from safetensors.torch import save_file

    tensors = {f"input.{i}": t.detach().contiguous().clone() for i, t in enumerate(example)}
    tensors.update({f"output.{i}": t.detach().contiguous().clone() for i, t in enumerate(outputs)})
    path = Path(folder) / CHECK_FILE
    save_file(tensors, str(path))
    return path


def _read_check(folder: Path) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    from safetensors.torch import load_file

    path = folder / CHECK_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} lacks {CHECK_FILE}; it cannot be rebuilt")
    data = load_file(str(path))
    n_in = len([k for k in data if k.startswith("input.")])
    n_out = len([k for k in data if k.startswith("output.")])
    return tuple(data[f"input.{i}"] for i in range(n_in)), [
        data[f"output.{i}"] for i in range(n_out)
    ]


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize quantizer range buffers/parameters to the saved shapes before loading:
    calibration sets one range per channel or group where a fresh quantizer holds one."""
    from edgeslim.quant.base import Quantizer

    own = model.state_dict()
    for key, value in state.items():
        if key not in own or tuple(own[key].shape) == tuple(value.shape):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if not isinstance(owner, Quantizer):
            continue  # only quantizer state is resized; a layer of another width is an error
        current = getattr(owner, attr)
        fresh = torch.zeros_like(value)
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            owner.register_buffer(attr, fresh)


def _rebuild_step(
    model: nn.Module, step: dict[str, Any], example: tuple[torch.Tensor, ...], folder: Path
) -> nn.Module:
    from edgeslim.recipe import STAGES, parse_recipe
    from edgeslim.recipe.schema import _load_builtin_stages

    _load_builtin_stages()  # a reload may be the first thing a process does
    kind = step.get("kind")
    if kind not in STAGES:
        raise CheckpointError(
            f"cannot rebuild stage kind {kind!r}; this edgeslim has no such stage"
        )
    stage = parse_recipe({"stages": [step["stage"]]}).stages[0]
    if kind == "prune":
        from edgeslim.stages.prune import rebuild_prune

        return rebuild_prune(model, folder / step["files"]["plan"], example)
    if kind == "quantize":
        from edgeslim.stages.quantize import rebuild_quantize

        return rebuild_quantize(model, stage)  # type: ignore[arg-type]
    if kind == "datafree":
        from edgeslim.stages.datafree import rebuild_datafree

        return rebuild_datafree(model, stage, example)  # type: ignore[arg-type]
    if kind == "lowrank":
        from edgeslim.stages.lowrank import rebuild_lowrank

        return rebuild_lowrank(model, folder / step["files"]["plan"], example)
    if kind == "finetune":
        return model  # weights only: the saved state carries them
    if kind == "search":
        return _rebuild_search(model, step, example, folder)
    raise CheckpointError(f"reloading a {kind} stage is not supported yet")


def _rebuild_search(
    model: nn.Module, step: dict[str, Any], example: tuple[torch.Tensor, ...], folder: Path
) -> nn.Module:
    """The structure a search stage chose (:mod:`edgeslim.search.rebuild`); a folder
    written before the stage saved it is refused with what to deploy instead."""
    from edgeslim.search.errors import SearchError
    from edgeslim.search.rebuild import rebuild_structure

    name = (step.get("files") or {}).get("plan")
    if not name:
        raise CheckpointError(
            f"{folder}: its search stage saved no structure (written by an edgeslim before "
            "searched models could be reloaded); deploy its model.onnx, or apply its "
            "search.policy.json with edgeslim.search"
        )
    path = folder / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a searched model's structure ({exc})") from None
    try:
        return rebuild_structure(model, data, example)
    except SearchError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def base_model(lineage: Lineage, model: nn.Module | None) -> nn.Module:
    """The uncompressed model to replay the steps on: ``model`` (a fresh copy is taken) or
    the recorded zoo name / factory with its checkpoint."""
    if model is not None:
        return copy.deepcopy(model).eval()
    if lineage.spec is None:
        raise EdgeslimError(
            f"this output was made by edgeslim.compress from a {lineage.base_class or 'Python'} "
            "model built in Python; pass a freshly built one: "
            "edgeslim.load(out_dir, model=build())"
        )
    from edgeslim.zoo import resolve_model

    ckpt = Path(lineage.checkpoint) if lineage.checkpoint else None
    return resolve_model(lineage.spec, ckpt)


def _rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the expected output's largest magnitude."""
    if not expected.numel():
        return 0.0
    scale = float(expected.float().abs().max())
    return float((got.float() - expected.float()).abs().max()) / max(scale, 1e-12)


def load_artifact(out_dir: str | Path, model: nn.Module | None = None) -> Artifact:
    """Rebuild the model a ``compress`` run wrote into ``out_dir`` (see :func:`load`)."""
    from edgeslim.checkpoint import load_checked
    from edgeslim.task.agreement import flat_outputs

    folder = Path(out_dir)
    manifest = read_manifest(folder, verify=True)
    rebuild = manifest.get("rebuild")
    if not isinstance(rebuild, dict) or rebuild.get("format") != REBUILD_FORMAT:
        raise CheckpointError(f"{folder} is not a compress output (no rebuild section)")
    if rebuild.get("version") != REBUILD_VERSION:
        raise CheckpointError(
            f"{folder} was written in rebuild format {rebuild.get('version')!r}; this edgeslim "
            f"reads version {REBUILD_VERSION}"
        )
    example, expected = _read_check(folder)
    artifact = Artifact(nn.Module(), folder, manifest, example)
    lineage = artifact.lineage
    net = base_model(lineage, model)
    needs_same_base = any(s.get("kind") == "datafree" for s in lineage.steps)
    if needs_same_base and lineage.base_sha256 and state_sha256(net) != lineage.base_sha256:
        raise CheckpointError(
            f"{folder} was made from other weights than the base model given (a data-free "
            "stage chose bits from them); pass the model with the weights compress started from"
        )
    bake_reparametrizations(net)  # as compress did on its copy
    dims = rebuild.get("batch_dims")
    if isinstance(dims, list) and len(dims) == len(example):
        declare_inputs(net, len(example), example, [int(d) for d in dims])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run already reported what stays float
        for step in lineage.steps:
            net = _rebuild_step(net, step, example, folder)
    from safetensors.torch import load_file

    state = load_file(str(folder / rebuild.get("weights", WEIGHTS_FILE)))
    fit_state(net, state)
    load_checked(net, state, str(folder / WEIGHTS_FILE))
    net.eval()
    if expected:
        with torch.no_grad():
            got = flat_outputs(net(*example))
        same = len(got) == len(expected) and all(
            g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected, strict=False)
        )
        if not same:
            pairs = [(g, e) for g, e in zip(got, expected, strict=False) if g.shape == e.shape]
            rel = [_rel_diff(g, e) for g, e in pairs]
            diff = max(rel, default=float("nan"))
            if len(pairs) == len(expected) == len(got) and diff <= NEAR_REL_TOLERANCE:
                warnings.warn(
                    f"the model rebuilt from {folder} matches the recorded outputs to "
                    f"{diff:.2g} of their scale but not bit for bit (another CPU or thread "
                    "count rounds differently)",
                    stacklevel=2,
                )
                artifact.model = net
                return artifact
            raise CheckpointError(
                f"the model rebuilt from {folder} does not reproduce the recorded outputs "
                f"(max difference {diff:.3g} of their scale); the folder, the base model or "
                "this edgeslim differs from the one that wrote it"
            )
    artifact.model = net
    return artifact


def load(out_dir: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The compressed model a ``compress`` run wrote into ``out_dir``, rebuilt bit-exactly.

    The base model is the recorded zoo name or ``module:factory`` (with its checkpoint), or
    ``model`` (a freshly built uncompressed module) for outputs of :func:`edgeslim.compress`
    called from Python. Every file is checked against the manifest and the rebuilt model's
    outputs on the recorded example inputs must equal the recorded ones exactly.
    """
    return load_artifact(out_dir, model).model


def compress_output_hint(checkpoint: Path) -> str | None:
    """A hint when ``--checkpoint`` names compress's own ``model.safetensors`` (its shapes
    and quantizer state do not fit a fresh model: the folder must be loaded whole)."""
    folder = Path(checkpoint).parent
    if (folder / MANIFEST).is_file() or (folder / "results.json").is_file():
        return (
            f"{checkpoint} is the output of `edgeslim compress` (a pruned and/or quantized "
            f"model that a fresh model cannot hold); load the folder whole with --from {folder} "
            "(Python: edgeslim.load(folder))"
        )
    return None


# --- files that share a folder (the zoo's NAME.* outputs) -------------------------------------

ZOO_OUT = Path("zoo-out")
"""Default folder of ``zoo train`` / ``zoo prune`` (under the current directory: the shipped
checkpoints inside the installed package are read, never written, by default)."""


def check_named_outputs(out: Path, names: list[str], force: bool) -> None:
    """Before any work: refuse an ``out`` that is a file, files of ``names`` that already
    exist (unless ``force``), or a place that cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgeslimError(f"--out {out} exists and is not a folder; give a folder path")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise EdgeslimError(
            f"--out {out} already holds {', '.join(existing)}; pass --force to replace them, "
            "or choose another folder or name"
        )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise EdgeslimError(f"cannot write into {out}: {parent} is not writable")


def temp_file(path: Path) -> Path:
    """A temporary name beside ``path`` (``.NAME.tmp-PID-file``) to write before
    :func:`os.replace`, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-file")
