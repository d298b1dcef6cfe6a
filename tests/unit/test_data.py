"""Site data: readers, splits, conversions and bad-input handling."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from weckd.chain.data import (
    ImageSpec,
    augment,
    make_site,
    read_labelled,
    read_unlabelled,
    split_parts,
    stratified_split,
)
from weckd.chain.errors import SiteDataError
from weckd.chain.synthetic import make_synthetic

from .helpers import make_image_folder

SPEC = ImageSpec(("benign", "malignant"), 16, 1)


def test_image_folder_reads_classes_resized(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"benign": 3, "malignant": 2}, size=20)
    data = read_labelled(str(tmp_path), SPEC)
    assert data.images.shape == (5, 1, 16, 16) and data.images.dtype == torch.uint8
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1]


def test_grayscale_expands_to_three_channels(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"benign": 1, "malignant": 1})
    data = read_labelled(str(tmp_path), ImageSpec(SPEC.classes, 16, 3))
    assert data.images.shape == (2, 3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])


def test_unknown_class_folder_names_class_and_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"benign": 1, "tumour": 1})
    with pytest.raises(SiteDataError, match=r"tumour: class 'tumour' is not in the configured classes"):
        read_labelled(str(tmp_path), SPEC)


def test_corrupt_image_is_skipped_counted_and_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image_folder(tmp_path, {"benign": 3, "malignant": 2})
    (tmp_path / "benign" / "broken.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING):
        data = read_labelled(str(tmp_path), SPEC)
    assert len(data) == 5 and data.skipped == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 unreadable image(s) of 6" in warnings[0].getMessage()


def test_csv_manifest_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", {"benign": 2, "malignant": 1})
    rows = [
        "path,label",
        "imgs/benign/img000.png,benign",
        "imgs/benign/img001.png,benign",
        "imgs/malignant/img000.png,malignant",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = read_labelled(str(tmp_path / "m.csv"), SPEC)
    assert data.labels.tolist() == [0, 0, 1]


def test_csv_manifest_unknown_label_names_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label\na.png,benign\nb.png,cyst\n", encoding="utf-8")
    with pytest.raises(SiteDataError, match=r"m\.csv:3: class 'cyst' is not in the configured classes"):
        read_labelled(str(tmp_path / "m.csv"), SPEC)


@pytest.mark.parametrize("label_shape", [(6,), (6, 1)])
def test_npz_accepts_flat_and_column_labels(tmp_path: Path, label_shape: tuple[int, ...]) -> None:
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.uint8).reshape(label_shape)
    np.savez(tmp_path / "d.npz", train_images=np.zeros((6, 28, 28), np.uint8), train_labels=labels)
    data = read_labelled(str(tmp_path / "d.npz"), SPEC)
    assert data.images.shape == (6, 1, 16, 16)
    assert data.labels.tolist() == [0, 1, 0, 1, 1, 0]


def test_npz_label_outside_classes_is_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([0, 5]))
    with pytest.raises(SiteDataError, match="label 5 is outside the 2 configured classes"):
        read_labelled(str(tmp_path / "d.npz"), SPEC)


def test_missing_data_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="data not found"):
        read_labelled(str(tmp_path / "absent"), SPEC)


def test_empty_site_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "benign").mkdir()
    with pytest.raises(SiteDataError, match="no readable labelled images"):
        read_labelled(str(tmp_path), SPEC)


def test_unlabelled_folder_is_read_recursively(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "u", {"x": 2, "y": 1})
    data = read_unlabelled(str(tmp_path / "u"), SPEC)
    assert len(data) == 3 and set(data.labels.tolist()) == {-1}


def test_stratified_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30)
    rest, held = stratified_split(labels, 0.2, seed=5)
    rest2, held2 = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(held, held2) and np.array_equal(rest, rest2)
    assert not set(rest) & set(held) and len(rest) + len(held) == 80
    assert (labels[held] == 0).sum().item() == 10 and (labels[held] == 1).sum().item() == 6


def test_split_parts_are_disjoint_stratified_and_cover_everything() -> None:
    labels = torch.tensor([0] * 30 + [1] * 12)
    parts = split_parts(labels, 3, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(42))
    assert [int((labels[p] == 1).sum()) for p in parts] == [4, 4, 4]


def test_site_with_no_images_is_an_error() -> None:
    empty = read_labelled("synthetic", ImageSpec(("a", "b"), 8, 1), synthetic_args=(8, 1.0, 0)).subset([])
    with pytest.raises(SiteDataError, match="site X: no labelled images"):
        make_site("X", empty, 0.2, 0)


def test_synthetic_data_is_deterministic_and_balanced() -> None:
    a, ya = make_synthetic(40, 4, 16, 1, 1.0, seed=9)
    b, yb = make_synthetic(40, 4, 16, 1, 1.0, seed=9)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert np.bincount(ya).tolist() == [10, 10, 10, 10]
    assert not np.array_equal(a, make_synthetic(40, 4, 16, 1, 1.0, seed=10)[0])


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(4, 1, 16, 16)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)


def test_rgb_npz_converts_to_grayscale(tmp_path: Path) -> None:
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    imgs[..., 1] = 200
    np.savez(tmp_path / "d.npz", train_images=imgs, train_labels=np.array([0, 1]))
    data = read_labelled(str(tmp_path / "d.npz"), ImageSpec(("a", "b"), 8, 1))
    assert data.images.shape == (2, 1, 8, 8)
    assert int(data.images[0, 0, 0, 0]) == round(0.587 * 200)


def test_png_rgb_image_reads_as_three_channels(tmp_path: Path) -> None:
    (tmp_path / "benign").mkdir()
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "benign" / "a.png")
    data = read_labelled(str(tmp_path), ImageSpec(SPEC.classes, 16, 3))
    assert data.images.shape == (1, 3, 16, 16) and int(data.images.max()) == 7
