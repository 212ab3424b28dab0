"""Reproducible training of the zoo CNNs; writes ``NAME.safetensors`` and its JSON card."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from edgeslim.artifacts import ZOO_OUT, check_named_outputs, temp_file, versions
from edgeslim.checkpoint import save_state, sha256_file
from edgeslim.data import load_fashion_mnist
from edgeslim.data.batching import TensorBatches, augmented_batches
from edgeslim.train.loop import evaluate, train_classifier
from edgeslim.zoo.registry import ZOO

PAD = 2  # crop/flip augmentation: random crops of the image padded by PAD pixels


def train_zoo_model(
    name: str,
    epochs: int | None = None,
    seed: int | None = None,
    out_dir: Path | None = None,
    threads: int | None = None,
    train_limit: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train ``name`` from scratch on the Fashion-MNIST train split and write its card.

    Writes ``NAME.safetensors`` and ``NAME.json`` into ``out_dir`` (default ``./zoo-out``,
    never the installed package: pass the checkpoints folder explicitly to replace a shipped
    model). Existing files of ``name`` are refused unless ``force``, checked before training;
    each file is written under a temporary name and renamed, the card last.

    The training batches are shuffled and crop/flip-augmented with ``PAD``
    (:func:`~edgeslim.data.batching.augmented_batches`), seeded by the config's seed. The
    validation split is monitored; the reported top-1 is on the official test set.
    """
    out = Path(out_dir) if out_dir is not None else ZOO_OUT
    check_named_outputs(out, [f"{name}.safetensors", f"{name}.json"], force)
    entry = ZOO[name]
    config = entry.train
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = entry.factory()
    split = load_fashion_mnist("train", limit=train_limit)
    train = augmented_batches(split.images, split.labels, config.batch_size, config.seed, PAD)
    val, test = (load_fashion_mnist(s) for s in ("val", "test"))
    start = time.time()
    history = train_classifier(
        model, train, config, val=TensorBatches(val.images, val.labels, 500), description=name
    )
    seconds = time.time() - start
    model.eval()
    test_top1 = evaluate(model, TensorBatches(test.images, test.labels, 500))
    weights = out / f"{name}.safetensors"
    tmp_weights = temp_file(weights)
    save_state(model, tmp_weights)
    command = f"edgeslim zoo train {name} --epochs {config.epochs} --seed {config.seed}"
    if train_limit is not None:
        command += f" --train-limit {train_limit}"
    card: dict[str, Any] = {
        "name": name,
        "description": entry.description,
        "command": command,
        "seed": config.seed,
        "epochs": config.epochs,
        # the augmentation is the data source's now, recorded where cards always had it
        "train_config": {**dataclasses.asdict(config), "augment": True, "pad": PAD},
        "data": "Fashion-MNIST train split (55k; 5k held out as val)",
        "test_top1": round(test_top1, 2),
        "val_top1": round(history[-1].get("val_top1", float("nan")), 2),
        "target_top1": entry.target_top1,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # the card is the model's manifest: command, recipe, versions and file hashes
        "versions": versions(),
        "sha256": sha256_file(tmp_weights),
        "history": history,
    }
    card_file = out / f"{name}.json"
    tmp_card = temp_file(card_file)
    tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp_weights, weights)
    os.replace(tmp_card, card_file)
    return card
