"""`weckd chain`: learning on the synthetic config, determinism, outputs and the bad-input matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from weckd.chain.artifacts import load_model_files
from weckd.chain.cli import main
from weckd.chain.data import ImageSpec, read_labelled
from weckd.chain.link import evaluate, model_from_state

from .helpers import THREADS, TINY_CHAIN, deep_merge, make_image_folder, write_yaml


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synthetic_chain_last_link_beats_link1_and_chance(repo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, "chain", "-c", str(repo / "configs/chain-synthetic.yaml"), "-o", str(out),
                           "--set", f"runtime.threads={THREADS}", "--set", "link.epochs=4",
                           "--set", "baselines.sites=false", "--set", "baselines.pooled=false")
    # the links only, 4 epochs each: baselines have tests of their own
    assert code == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["delivered_test_accuracy"] > summary["link1_test_accuracy"] + 0.05
    assert summary["delivered_test_accuracy"] > 0.25 + 0.4  # four classes: chance is 0.25
    assert "delivered model vs link 1" in stdout


def test_outputs_hold_results_config_and_a_loadable_model(tmp_path: Path, capsys) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", TINY_CHAIN)
    out = tmp_path / "run"
    assert _run(capsys, "chain", "-c", str(cfg), "-o", str(out))[0] == 0
    run_files = {"results.json", "timings.json", "config.effective.yaml", "model"}
    report = {"report.md", "report.html", "accuracy_per_link.png", "loss_curves.png", "confusion_matrix.png"}
    assert {p.name for p in out.iterdir()} == run_files | report
    card, state = load_model_files(out / "model")
    assert card["classes"] == ["c0", "c1", "c2", "c3"] and card["input"]["size"] == 32
    assert [link["site"] for link in card["provenance"]["links"]] == ["A", "B"]
    spec = ImageSpec(tuple(card["classes"]), card["input"]["size"], card["input"]["channels"])
    model = model_from_state(card["arch"], state, spec, torch.device("cpu"))
    data = read_labelled("synthetic", spec, synthetic_args=(40, 1.8, 99))
    results = json.loads((out / "results.json").read_text())
    assert len(results["links"]) == 2 and [b["name"] for b in results["baselines"]] == [
        "site A alone",
        "site B alone",
        "pooled",
    ]
    assert evaluate(model, data, 4, torch.device("cpu")).n == 40


def test_same_seed_gives_identical_results_json(tmp_path: Path, capsys) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", TINY_CHAIN)
    for name in ("a", "b"):
        assert _run(capsys, "chain", "-c", str(cfg), "-o", str(tmp_path / name))[0] == 0
    assert (tmp_path / "a/results.json").read_bytes() == (tmp_path / "b/results.json").read_bytes()
    assert (tmp_path / "a/model/model.safetensors").read_bytes() == (
        tmp_path / "b/model/model.safetensors"
    ).read_bytes()


def _bad_config(tmp_path: Path, kind: str) -> tuple[Path, int, str]:
    path = tmp_path / "c.yaml"
    if kind == "missing config":
        return tmp_path / "absent.yaml", 2, "config file not found"
    if kind == "yaml syntax":
        path.write_text("link: {epochs: 1\n", encoding="utf-8")
        return path, 2, "YAML syntax error"
    if kind == "unknown key":
        return write_yaml(path, deep_merge(TINY_CHAIN, {"link": {"temprature": 2}})), 2, "did you mean 'temperature'"
    if kind == "wrong type":
        return write_yaml(path, deep_merge(TINY_CHAIN, {"link": {"lr": "fast"}})), 2, "link.lr: expected a number"
    if kind == "unknown timm name":
        return write_yaml(path, deep_merge(TINY_CHAIN, {"link": {"arch": "resnet19"}})), 2, "unknown timm architecture"
    if kind == "missing data dir":
        return write_yaml(path, deep_merge(TINY_CHAIN, {"data": {"dataset": "nowhere"}})), 1, "data not found"
    images = make_image_folder(tmp_path / "imgs", {"c0": 2, "c1": 2})
    if kind == "class mismatch":
        make_image_folder(images, {"c9": 1})
    elif kind == "corrupt only":
        for f in images.rglob("*.png"):
            f.write_bytes(b"garbage")
    elif kind == "empty site":
        (tmp_path / "empty").mkdir()
    site_b = str(tmp_path / "empty") if kind == "empty site" else str(images)
    data = {"dataset": None, "sites": {"A": str(images), "B": site_b}, "test": str(images)}
    message = {
        "class mismatch": "class 'c9' is not in the configured classes",
        "corrupt only": "no readable labelled images",
        "empty site": "no readable labelled images",
    }[kind]
    return write_yaml(path, deep_merge(TINY_CHAIN, {"data": data})), 1, message


@pytest.mark.parametrize(
    "kind",
    [
        "missing config",
        "yaml syntax",
        "unknown key",
        "wrong type",
        "unknown timm name",
        "missing data dir",
        "class mismatch",
        "corrupt only",
        "empty site",
    ],
)
def test_bad_input_is_one_line_with_exit_code_and_no_output(kind: str, tmp_path: Path, capsys) -> None:
    cfg, expected_code, message = _bad_config(tmp_path, kind)
    out = tmp_path / "run"
    code, _, err = _run(capsys, "chain", "-c", str(cfg), "-o", str(out))
    assert code == expected_code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("weckd: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".run.staging") for p in tmp_path.iterdir())


def test_corrupt_image_among_good_ones_is_skipped_with_one_warning(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "imgs", {"c0": 6, "c1": 6}, size=32)
    (images / "c0" / "bad.png").write_bytes(b"garbage")
    data = {
        "dataset": None,
        "classes": ["c0", "c1"],
        "sites": {"A": str(images), "B": str(images)},
        "test": str(images),
    }
    cfg = write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"data": data}))
    code, _, err = _run(capsys, "chain", "-c", str(cfg), "-o", str(tmp_path / "run"))
    assert code == 0
    warnings = [line for line in err.splitlines() if "WARNING" in line and "unreadable" in line]
    assert len(warnings) == 3  # site A, site B and the test set each read the folder once
    assert all("skipped 1 unreadable image(s) of 13" in w for w in warnings)


def test_unknown_command_exits_2(capsys) -> None:
    code, _, err = _run(capsys, "chian")
    assert code == 2 and "unknown command 'chian'" in err


def test_output_dir_is_replaced_whole_on_rerun(tmp_path: Path, capsys) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", TINY_CHAIN)
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert _run(capsys, "chain", "-c", str(cfg), "-o", str(out))[0] == 0
    assert not (out / "stale.txt").exists() and (out / "results.json").exists()


def test_png_images_of_any_size_feed_the_chain(tmp_path: Path, capsys) -> None:
    root = tmp_path / "imgs"
    for c in ("c0", "c1"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((40, 50), 30 + 150 * (c == "c1"), np.uint8)).save(root / c / f"{i}.png")
    data = {"dataset": str(root), "classes": ["c0", "c1"]}
    cfg = write_yaml(tmp_path / "c.yaml", deep_merge(TINY_CHAIN, {"data": data}))
    assert _run(capsys, "chain", "-c", str(cfg), "-o", str(tmp_path / "run"))[0] == 0
