"""``weckd predict``: run a saved model (model card + safetensors) on image files or folders.

Images are decoded exactly as for training and evaluation (``data.read_image`` then
``link.predict_logits``), so a folder's predictions match ``link.evaluate`` on the same files.
The card is checked before any image is read: a model whose input or normalisation differs from
this version's pipeline would give wrong answers silently, so it is refused instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .artifacts import CARD_FILE, image_spec_of_card, load_weights, read_card
from .cli import run_command, setup_logging
from .data import IMAGE_SUFFIXES, MEAN, STD, ImageSpec, read_image
from .errors import ConfigError, PayloadError, SiteDataError, shown
from .files import atomic_write_text
from .link import model_from_state, predict_logits
from .models import is_arch, pick_device

log = logging.getLogger(__name__)

MAX_IMAGE_SIZE = 4096  # the largest data.image_size a config accepts


@dataclass(frozen=True)
class Prediction:
    """One image's result; ``predicted`` and ``probs`` are None when the file could not be read."""

    path: Path
    predicted: str | None
    probs: list[float] | None


@dataclass(frozen=True)
class Predictor:
    spec: ImageSpec
    model: torch.nn.Module
    device: torch.device


def check_card(card: dict[str, Any], where: Path) -> ImageSpec:
    """The image spec of a model card, after checking every field this pipeline depends on."""

    def bad(field: str, found: Any, fix: str) -> PayloadError:
        return PayloadError(f"{where}: {field} is {shown(found)}; {fix}")

    version = card.get("weckd_version")
    if not isinstance(version, str) or not version:
        raise bad("weckd_version", version, "the card was not written by weckd; re-export the model")
    if version != __version__:
        log.warning("%s: written by weckd %s, running %s", where, version, __version__)
    arch = card.get("arch")
    if not isinstance(arch, str) or not is_arch(arch):
        raise bad("arch", arch, "not a timm architecture known to this install; upgrade timm")
    classes = card.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise bad("classes", classes, "expected a list of at least two class names")
    if len(set(classes)) != len(classes):
        raise bad("classes", classes, "class names must be unique")
    _check_input(card.get("input"), bad)
    _check_normalisation(card.get("normalisation"), bad)
    return image_spec_of_card(card)


def _check_input(shape: Any, bad: Any) -> None:
    if not isinstance(shape, dict):
        raise bad("input", shape, "expected {size, channels, layout, dtype}")
    size, channels = shape.get("size"), shape.get("channels")
    if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE:
        raise bad("input.size", size, f"expected an integer from 1 to {MAX_IMAGE_SIZE}")
    if type(channels) is not int or channels not in (1, 3):
        raise bad("input.channels", channels, "expected 1 or 3")
    for field, expected in (("layout", "NCHW"), ("dtype", "float32")):
        if shape.get(field) != expected:
            raise bad(f"input.{field}", shape.get(field), f"this weckd feeds {expected}")


def _check_normalisation(norm: Any, bad: Any) -> None:
    if not isinstance(norm, dict):
        raise bad("normalisation", norm, "expected {scale, mean, std}")
    for field, expected in (("scale", 1 / 255.0), ("mean", MEAN), ("std", STD)):
        value = norm.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                not math.isclose(value, expected, rel_tol=1e-9):
            raise bad(f"normalisation.{field}", value, f"this weckd normalises with {field}={expected}")


def load_predictor(model_dir: Path, device: torch.device) -> Predictor:
    """Load and check a model folder written by 'weckd chain' (model_card.json + model.safetensors)."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: model folder not found; pass RUN_DIR/model of a 'weckd chain' run")
    card = read_card(model_dir)
    spec = check_card(card, model_dir / CARD_FILE)  # before the weights are read: a bad card reads nothing
    state = load_weights(model_dir, card)
    model = model_from_state(card["arch"], state, spec, device)
    return Predictor(spec, model, device)


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, plus image files under each folder (recursive, sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise ConfigError(f"{item}: no such image or folder; check the path")
    return files


def predict_files(predictor: Predictor, files: Sequence[Path]) -> list[Prediction]:
    """Class and per-class probabilities for each file; unreadable files get None."""
    decoded = [read_image(f, predictor.spec) for f in files]
    readable = [img for img in decoded if img is not None]
    if not readable:
        raise SiteDataError(
            f"no readable image among {len(files)} file(s); pass PNG/JPEG/BMP/TIFF images or folders of them"
        )
    skipped = len(files) - len(readable)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", skipped, len(files))
    logits = predict_logits(predictor.model, torch.stack(readable), predictor.device)
    probs = torch.softmax(logits.double(), dim=1).tolist()
    labels = logits.argmax(1).tolist()
    classes = predictor.spec.classes
    out: list[Prediction] = []
    it = iter(zip(labels, probs))
    for f, img in zip(files, decoded):
        if img is None:
            out.append(Prediction(f, None, None))
        else:
            label, p = next(it)
            out.append(Prediction(f, classes[label], p))
    return out


def write_csv(path: Path, predictions: Sequence[Prediction], classes: Sequence[str]) -> None:
    """``path,predicted,p(class)…``, written atomically (0600: predictions are patient-level)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "predicted", *(f"p({c})" for c in classes)])
    for p in predictions:
        probs = [repr(x) for x in p.probs] if p.probs is not None else [""] * len(classes)
        writer.writerow([str(p.path), p.predicted or "", *probs])
    atomic_write_text(path, text.getvalue())


def format_line(p: Prediction, classes: Sequence[str]) -> str:
    if p.probs is None:
        return f"{p.path}\tunreadable"
    probs = "\t".join(f"p({c})={x:.4f}" for c, x in zip(classes, p.probs))
    return f"{p.path}\t{p.predicted}\t{probs}"


def predict_command(argv: Sequence[str]) -> int:
    """Predict the class of images with a model saved by 'weckd chain'."""
    parser = argparse.ArgumentParser(prog="weckd predict", description=predict_command.__doc__)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (RUN_DIR/model)")
    parser.add_argument("inputs", metavar="IMAGE_OR_FOLDER", nargs="+", help="image files or folders (recursive)")
    parser.add_argument("--csv", metavar="FILE", help="also write path,predicted,p(class)… to FILE")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
    csv_path = Path(args.csv) if args.csv else None
    if csv_path is not None and not csv_path.parent.is_dir():
        raise ConfigError(f"--csv {csv_path}: folder {csv_path.parent} does not exist; create it first")
    files = collect_images([Path(p) for p in args.inputs])
    predictor = load_predictor(Path(args.model_dir), pick_device(args.device))
    predictions = predict_files(predictor, files)
    classes = predictor.spec.classes
    for p in predictions:
        print(format_line(p, classes))
    if csv_path is not None:
        write_csv(csv_path, predictions, classes)
    return 0
