"""Files a run leaves behind: the model (safetensors + JSON model card), results and the
effective config, written into a staging folder and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import __version__
from .data import MEAN, STD, ImageSpec
from .errors import PayloadError

MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_FORMAT = "weckd-model/1"


@dataclass(frozen=True)
class ModelCard:
    """What a hospital needs to run the model: architecture, classes, input, normalisation, provenance."""

    arch: str
    classes: list[str]
    image_size: int
    channels: int
    provenance: dict[str, Any]

    def to_json(self, weights_sha256: str) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "weckd_version": __version__,
            "arch": self.arch,
            "classes": self.classes,
            "input": {"size": self.image_size, "channels": self.channels, "layout": "NCHW", "dtype": "float32"},
            "normalisation": {"scale": 1 / 255.0, "mean": MEAN, "std": STD},
            "weights": {"file": MODEL_FILE, "sha256": weights_sha256},
            "provenance": self.provenance,
        }


def save_model(folder: Path, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Write model.safetensors and model_card.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / MODEL_FILE
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"arch": card.arch})
    write_json(folder / CARD_FILE, card.to_json(sha256_file(weights)))


def load_model_files(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model card and its weights, checking the format and the weights' hash."""
    card_path = folder / CARD_FILE
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PayloadError(f"{card_path}: cannot read model card: {err}") from err
    if card.get("format") != CARD_FORMAT:
        raise PayloadError(f"{card_path}: format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    weights = folder / card["weights"]["file"]
    if sha256_file(weights) != card["weights"]["sha256"]:
        raise PayloadError(f"{weights}: sha256 does not match the model card; the file is damaged or altered")
    return card, load_file(str(weights))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it replaces ``target`` whole.

    On any failure the staging folder is removed and ``target`` is left as it was.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)


def image_spec_of_card(card: dict[str, Any]) -> ImageSpec:
    return ImageSpec(tuple(card["classes"]), int(card["input"]["size"]), int(card["input"]["channels"]))
