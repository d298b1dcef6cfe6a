"""Files a run leaves behind: the model (safetensors + JSON model card), results and the
effective config, written into a staging folder and moved into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping, cast

import numpy as np
import yaml
from safetensors import SafetensorError

from . import __version__
from .errors import PayloadError, shown
from .files import atomic_write, atomic_write_by, atomic_write_text, inside, private_dir, staged_dir

if TYPE_CHECKING:  # torch loads with the weights: the coordinator writes a delivered model without it
    import torch

    from .data import ImageSpec

__all__ = ["ModelCard", "save_model", "load_model_files", "read_card", "load_weights", "sha256_file", "write_json",
           "write_yaml", "staged_dir", "image_spec_of_card"]

MEAN = 0.5  # every model's input normalisation: pixels / 255, then (x - MEAN) / STD (chain.data)
STD = 0.5
MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_FORMAT = "weckd-model/1"
MAX_CARD_BYTES = 1 << 20  # 1 MiB: a card is ~1 KB
MAX_WEIGHTS_BYTES = 1 << 31  # 2 GiB: float32 weights of a model at the 1 GiB float16 payload limit


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


def save_model(folder: Path, state: Mapping[str, torch.Tensor | np.ndarray], card: ModelCard) -> None:
    """Write model.safetensors and model_card.json into ``folder`` (created 0700; files 0600, atomic).

    ``state`` holds torch tensors (a site, ``weckd chain``) or numpy arrays (the coordinator); the file
    is the same either way."""
    private_dir(folder)
    if all(isinstance(v, np.ndarray) for v in state.values()):
        from safetensors.numpy import save_file

        # np.ascontiguousarray makes a 0-d array 1-d: keep every shape (num_batches_tracked is 0-d); written
        # straight to disk, the file is never held in memory beside the arrays (the coordinator's largest peak)
        arrays = {k: np.ascontiguousarray(v).reshape(v.shape) for k, v in state.items()}
        atomic_write_by(folder / MODEL_FILE, lambda tmp: save_file(arrays, str(tmp), metadata={"arch": card.arch}))
        digest = sha256_file(folder / MODEL_FILE)
    else:
        from safetensors.torch import save

        tensors = cast("Mapping[str, torch.Tensor]", state)  # not all numpy: torch tensors (a mix fails here)
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"arch": card.arch})
        atomic_write(folder / MODEL_FILE, data)
        digest = hashlib.sha256(data).hexdigest()
    write_json(folder / CARD_FILE, card.to_json(digest))


def load_model_files(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model card and its weights (:func:`read_card`, then :func:`load_weights`)."""
    card = read_card(folder)
    return card, load_weights(folder, card)


def read_card(folder: Path) -> dict[str, Any]:
    """The model card of ``folder``: a regular file of at most MAX_CARD_BYTES holding a JSON object of
    this card format. Its other fields are checked by whoever uses them (``predict.check_card``)."""
    card_path = folder / CARD_FILE
    with _open_regular(card_path, MAX_CARD_BYTES, "model card") as fh:
        raw = fh.read(MAX_CARD_BYTES + 1)
    try:
        card = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested past the parser's depth
        raise PayloadError(f"{card_path}: model card is not readable JSON ({shown(str(err), 120)}); "
                           "re-export the model") from None
    if type(card) is not dict:
        raise PayloadError(f"{card_path}: model card is a JSON {type(card).__name__}, not an object; "
                           "re-export the model")
    if card.get("format") != CARD_FORMAT:
        raise PayloadError(f"{card_path}: format {shown(card.get('format'))}, expected {CARD_FORMAT!r}")
    return card


def load_weights(folder: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The card's weights: a regular file inside ``folder`` of at most MAX_WEIGHTS_BYTES, matching the
    card's sha256, readable as safetensors, every floating value finite."""
    entry = card.get("weights")
    name = entry.get("file") if type(entry) is dict else None
    digest = entry.get("sha256") if type(entry) is dict else None
    if type(name) is not str or type(digest) is not str or not _plain_name(name):
        raise PayloadError(f"{folder / CARD_FILE}: weights entry {shown(entry)} is not {{file: a plain file name, "
                           "sha256}}; re-export the model")
    weights = inside(folder, name)
    hasher = hashlib.sha256()
    with _open_regular(weights, MAX_WEIGHTS_BYTES, "weights file") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    if hasher.hexdigest() != digest:
        raise PayloadError(f"{weights}: sha256 does not match the model card; the file is damaged or altered")
    try:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise PayloadError(f"{weights}: not a readable safetensors file ({shown(str(err), 120)}); "
                           "re-export the model") from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise PayloadError(f"{weights}: tensor {shown(key, 80)} holds {bad} NaN/Inf value(s); the model "
                               "diverged or the file is damaged; refused")
    return state


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\0" not in name and Path(name).name == name


def _open_regular(path: Path, limit: int, what: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file of at most ``limit`` bytes (never a device,
    a FIFO or a folder: O_NONBLOCK keeps a FIFO from blocking the open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise PayloadError(f"{path}: cannot read the {what} ({err.strerror}); copy the model folder again"
                           ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        found = f"{info.st_size} bytes" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise PayloadError(f"{path}: the {what} is {found}; expected a regular file of at most {limit} bytes; "
                           "copy the model folder again")
    return os.fdopen(fd, "rb")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def image_spec_of_card(card: dict[str, Any]) -> ImageSpec:
    from .data import ImageSpec

    return ImageSpec(tuple(card["classes"]), int(card["input"]["size"]), int(card["input"]["channels"]))
