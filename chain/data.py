"""Site datasets: readers (ImageFolder, CSV manifest, MedMNIST .npz, built-in synthetic), splits,
and the tensor pipeline (normalise, augment).

Images are decoded once into uint8 tensors (N, C, H, W) at the configured size and channel count;
everything after that is tensor work. Only counts ever leave this module's callers.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .artifacts import MEAN, STD
from .errors import SiteDataError
from .synthetic import make_synthetic, make_unlabelled

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the decoders PIL may use: no other plugin sees a site's files
# Decoding limit, checked from the file's header before any pixel is decoded (a 69-byte PNG can declare
# gigapixels): 64 Mi pixels, e.g. 8192 x 8192, well above any radiograph, below PIL's own warning level.
MAX_IMAGE_PIXELS = 1 << 26
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (uint8, N×C×H×W) and labels (int64, −1 when unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | Sequence[int]) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageSet(self.images[idx], self.labels[idx])

    def class_counts(self, n_classes: int) -> list[int]:
        return torch.bincount(self.labels[self.labels >= 0], minlength=n_classes).tolist()


@dataclass(frozen=True)
class ImageSpec:
    """How images are decoded: class names, square size and channel count."""

    classes: tuple[str, ...]
    size: int
    channels: int


@dataclass(frozen=True)
class SiteData:
    """One site's local data: a labelled train split, a validation split, optional unlabelled images."""

    name: str
    train: ImageSet
    val: ImageSet
    unlabelled: ImageSet | None = None


def concat(sets: Sequence[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


# ---------------------------------------------------------------- readers


def read_labelled(source: str, spec: ImageSpec, split: str = "train", synthetic_args: tuple = ()) -> ImageSet:
    """Read a labelled dataset: 'synthetic', an ImageFolder root, a CSV manifest or a .npz file."""
    if source == SYNTHETIC:
        n, noise, seed = synthetic_args
        images, labels = make_synthetic(n, len(spec.classes), spec.size, spec.channels, noise, seed)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))
    path = Path(source)
    if not path.exists():
        raise SiteDataError(f"{path}: data not found; check the data path in the config")
    if path.suffix == ".npz":
        return _read_npz(path, spec, split)
    if path.suffix == ".csv":
        return _read_manifest(path, spec)
    if path.is_dir():
        return _read_image_folder(path, spec)
    raise SiteDataError(f"{path}: unsupported data source; use an ImageFolder root, a .csv manifest or a .npz file")


def read_unlabelled(source: str, spec: ImageSpec, synthetic_args: tuple = ()) -> ImageSet:
    """Read a folder of unlabelled images (searched recursively, sorted) or synthetic proxy images."""
    if source == SYNTHETIC:
        n, noise, seed = synthetic_args
        images = make_unlabelled(n, len(spec.classes), spec.size, spec.channels, noise, seed)
        return ImageSet(torch.from_numpy(images), torch.full((n,), -1, dtype=torch.int64))
    root = Path(source)
    if not root.is_dir():
        raise SiteDataError(f"{root}: unlabelled image folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    decoded = _decode_all(files, spec, root)
    if not decoded:
        raise SiteDataError(f"{root}: no readable images in the unlabelled folder")
    return ImageSet(torch.stack(decoded), torch.full((len(decoded),), -1, dtype=torch.int64))


def _read_image_folder(root: Path, spec: ImageSpec) -> ImageSet:
    files: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in spec.classes:
            raise SiteDataError(
                f"{sub}: class {sub.name!r} is not in the configured classes {list(spec.classes)}; "
                "rename the folder or add the class to data.classes"
            )
        for f in sorted(sub.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(spec.classes.index(sub.name))
    return _labelled_from_files(files, labels, spec, root)


def _read_manifest(path: Path, spec: ImageSpec) -> ImageSet:
    files: list[Path] = []
    labels: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise SiteDataError(f"{path}: a manifest needs the header 'path,label'")
            for line, row in enumerate(reader, start=2):
                label = (row["label"] or "").strip()
                if label not in spec.classes:
                    raise SiteDataError(
                        f"{path}:{line}: class {label!r} is not in the configured classes {list(spec.classes)}"
                    )
                files.append(path.parent / (row["path"] or "").strip())
                labels.append(spec.classes.index(label))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"{path}: cannot read manifest: {err}") from err
    return _labelled_from_files(files, labels, spec, path)


def _labelled_from_files(files: list[Path], labels: list[int], spec: ImageSpec, where: Path) -> ImageSet:
    decoded: list[torch.Tensor] = []
    kept: list[int] = []
    skipped = 0
    for f, y in zip(files, labels):
        img = _decode(f, spec)
        if img is None:
            skipped += 1
            continue
        decoded.append(img)
        kept.append(y)
    if not decoded:
        found = f" ({skipped} unreadable)" if skipped else ""
        raise SiteDataError(f"{where}: no readable labelled images{found}; check the data path and the class folders")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s) of %d", where, skipped, len(files))
    return ImageSet(torch.stack(decoded), torch.tensor(kept, dtype=torch.int64), skipped)


def _decode_all(files: list[Path], spec: ImageSpec, where: Path) -> list[torch.Tensor]:
    decoded = [img for img in (_decode(f, spec) for f in files) if img is not None]
    if decoded and len(decoded) < len(files):
        log.warning("%s: skipped %d unreadable image(s) of %d", where, len(files) - len(decoded), len(files))
    return decoded


def read_image(path: Path, spec: ImageSpec) -> torch.Tensor | None:
    """One image as uint8 (C, S, S), decoded exactly as for training; None when unreadable."""
    return _decode(path, spec)


def _decode(path: Path, spec: ImageSpec) -> torch.Tensor | None:
    """None for anything that is not a readable image of at most MAX_IMAGE_PIXELS (the caller counts it)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                return None
            im = opened.convert("L" if spec.channels == 1 else "RGB")
        if im.size != (spec.size, spec.size):
            im = im.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        arr = np.array(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
        return None  # DecompressionBombError: over PIL's own global limit, which Image.open checks first
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_npz(path: Path, spec: ImageSpec, split: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if f"{split}_images" not in npz.files or f"{split}_labels" not in npz.files:
                raise SiteDataError(
                    f"{path}: no '{split}_images'/'{split}_labels' arrays (has: {', '.join(npz.files)})"
                )
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"]).reshape(-1).astype(np.int64)
    except (OSError, ValueError) as err:
        raise SiteDataError(f"{path}: cannot read .npz: {err}") from err
    if images.shape[0] != labels.shape[0]:
        raise SiteDataError(f"{path}: {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    bad = labels[(labels < 0) | (labels >= len(spec.classes))]
    if bad.size:
        raise SiteDataError(
            f"{path}: {split}: label {int(bad[0])} is outside the {len(spec.classes)} configured classes"
        )
    return ImageSet(_convert_array(images, spec), torch.from_numpy(labels))


def _convert_array(images: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """(N,H,W) or (N,H,W,C) uint8 → (N,C,S,S) uint8 in the configured channels and size."""
    x = torch.from_numpy(images.astype(np.float32))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 3 and spec.channels == 1:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    elif x.shape[1] == 1 and spec.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = torch.nn.functional.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


# ---------------------------------------------------------------- splits


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split indices into (rest, held) with ``fraction`` of each class held."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    rest: list[int] = []
    held: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.extend(idx[:n_held])
        rest.extend(idx[n_held:])
    return np.sort(np.array(rest, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def split_parts(labels: torch.Tensor, k: int, seed: int) -> list[np.ndarray]:
    """Split indices into ``k`` disjoint stratified parts of near-equal size."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    parts: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            parts[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def make_site(
    name: str,
    data: ImageSet,
    val_fraction: float,
    seed: int,
    unlabelled: ImageSet | None = None,
    labelled_fraction: float = 1.0,
) -> SiteData:
    """A site from its labelled data: a deterministic stratified train/validation split.

    With ``labelled_fraction`` below 1, only that fraction of the training split (stratified, at least
    one image a class) keeps its label; the other training images join the site's unlabelled images.
    """
    if len(data) == 0:
        raise SiteDataError(f"site {name}: no labelled images; a site needs local training data")
    train_idx, val_idx = stratified_split(data.labels, val_fraction, seed)
    if len(train_idx) == 0:
        raise SiteDataError(f"site {name}: too few images ({len(data)}) to hold out a validation split")
    train = data.subset(train_idx)
    if labelled_fraction < 1.0:
        train, dropped = _drop_labels(train, labelled_fraction, seed + 11)
        unlabelled = dropped if unlabelled is None else concat([unlabelled, dropped])
    return SiteData(name, train, data.subset(val_idx), unlabelled)


def _drop_labels(train: ImageSet, labelled_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the images that keep their label, the rest without labels)."""
    unlabelled_idx, labelled_idx = stratified_split(train.labels, labelled_fraction, seed)
    rest = train.subset(unlabelled_idx)
    return train.subset(labelled_idx), ImageSet(rest.images, torch.full_like(rest.labels, -1))


# ---------------------------------------------------------------- tensors


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → normalised float tensor on ``device``."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.sub_(MEAN).div_(STD)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation: random horizontal flip and a random shift of up to 1/16 of the size."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    pad = max(1, h // 16)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]
