"""`weckd predict`: agreement with evaluate, unreadable files, tampered weights and card checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from weckd.chain.artifacts import load_model_files
from weckd.chain.cli import main
from weckd.chain.data import ImageSpec, read_labelled
from weckd.chain.link import evaluate, model_from_state

from .helpers import TINY_CHAIN, write_yaml

CLASSES = TINY_CHAIN["data"]["classes"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model of one tiny chain run, shared by this module's tests."""
    root = tmp_path_factory.mktemp("predict")
    cfg = write_yaml(root / "c.yaml", TINY_CHAIN)
    assert main(["chain", "-c", str(cfg), "-o", str(root / "run")]) == 0
    return root / "run" / "model"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic test images saved as PNGs in one folder per class."""
    root = tmp_path_factory.mktemp("images")
    spec = ImageSpec(tuple(CLASSES), 32, 1)
    data = read_labelled("synthetic", spec, synthetic_args=(48, 1.8, 99))
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    return root


def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("weckd: error: ") and "Traceback" not in err
    return lines[0]


def test_csv_accuracy_equals_evaluate_on_the_same_files(model_dir: Path, image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model_dir), str(image_root), "--csv", str(out), "--device", "cpu"]) == 0
    rows = _read_csv(out)
    assert len(rows) == 48
    csv_accuracy = sum(r["predicted"] == Path(r["path"]).parent.name for r in rows) / len(rows)
    card, state = load_model_files(model_dir)
    spec = ImageSpec(tuple(card["classes"]), card["input"]["size"], card["input"]["channels"])
    model = model_from_state(card["arch"], state, spec, torch.device("cpu"))
    expected = evaluate(model, read_labelled(str(image_root), spec), len(CLASSES), torch.device("cpu"))
    assert expected.n == 48
    assert abs(csv_accuracy - expected.accuracy) < 1e-9


def test_csv_rows_hold_one_probability_per_class_summing_to_one(
    model_dir: Path, image_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model_dir), str(image_root / "c0"), "--csv", str(out)]) == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["path", "predicted", *(f"p({c})" for c in CLASSES)]
    for row in rows:
        probs = [float(row[f"p({c})"]) for c in CLASSES]
        assert abs(sum(probs) - 1.0) < 1e-6
        assert row["predicted"] == CLASSES[probs.index(max(probs))]


def test_stdout_has_one_tab_separated_line_per_image(model_dir: Path, image_root: Path, capsys) -> None:
    assert main(["predict", str(model_dir), str(image_root / "c1")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list((image_root / "c1").glob("*.png")))
    fields = lines[0].split("\t")
    assert fields[1] in CLASSES and fields[2].startswith("p(c0)=") and len(fields) == 2 + len(CLASSES)


def test_unreadable_file_is_listed_with_one_warning_and_not_fatal(
    model_dir: Path, image_root: Path, tmp_path: Path, capsys
) -> None:
    folder = Path(shutil.copytree(image_root / "c2", tmp_path / "imgs"))
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model_dir), str(folder), "--csv", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in _read_csv(out)}
    assert rows["broken.png"]["predicted"] == "" and rows["broken.png"]["p(c0)"] == ""
    assert sum(r["predicted"] != "" for r in rows.values()) == len(rows) - 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "skipped 1 unreadable image(s)" in warnings[0]


def test_no_readable_image_exits_1_with_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model_dir), str(bad), "--csv", str(out)]) == 1
    assert "no readable image" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_tampered_weights_exit_1_with_the_sha256_message(
    model_dir: Path, image_root: Path, tmp_path: Path, capsys
) -> None:
    model = _copy_model(model_dir, tmp_path)
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert main(["predict", str(model), str(image_root)]) == 1
    assert "sha256 does not match the model card" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalisation.mean", 0.485),
        ("normalisation.std", 0.25),
        ("input.channels", 2),
        ("arch", "resnet19"),
        ("classes", ["only"]),
        ("weckd_version", None),
    ],
)
def test_card_mismatch_exits_1_naming_the_field(
    field: str, value: object, model_dir: Path, image_root: Path, tmp_path: Path, capsys
) -> None:
    model = _copy_model(model_dir, tmp_path)
    card_path = model / "model_card.json"
    card = json.loads(card_path.read_text())
    *parents, key = field.split(".")
    node = card
    for name in parents:
        node = node[name]
    node[key] = value
    card_path.write_text(json.dumps(card))
    assert main(["predict", str(model), str(image_root)]) == 1
    assert f"{field} is " in _one_error_line(capsys.readouterr().err)


def test_missing_model_dir_exits_2(image_root: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(tmp_path / "absent"), str(image_root)]) == 2
    assert "model folder not found" in _one_error_line(capsys.readouterr().err)


def test_missing_image_path_exits_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(model_dir), str(tmp_path / "nowhere")]) == 2
    assert "no such image or folder" in _one_error_line(capsys.readouterr().err)


def test_a_dp_trained_groupnorm_model_predicts(image_root: Path, tmp_path: Path, capsys) -> None:
    """A model trained with DP-SGD is the GroupNorm variant ``<arch>+gn``; its card is accepted."""
    from weckd.chain.artifacts import ModelCard, save_model
    from weckd.chain.models import create_model

    model = create_model("test_resnet+gn", len(CLASSES), 1)
    save_model(tmp_path / "dp-model", model.state_dict(), ModelCard("test_resnet+gn", CLASSES, 32, 1, {}))
    assert main(["predict", str(tmp_path / "dp-model"), str(image_root)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 48
