"""``weckd demo`` (the README's first command) finishes, and ``weckd predict`` on the model it delivered
scores exactly the run's reported held-out accuracy on the same images, written out as PNG files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from weckd.client.site import load_local_data, load_site_config

pytestmark = pytest.mark.slow


def test_predict_on_the_demo_model_matches_the_reported_accuracy(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    run = subprocess.run([str(Path(sys.executable).with_name("weckd")), "demo", "--epochs", "3", "--keep", str(root)],
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "last link vs link 1" in run.stdout and "every process stopped" in run.stdout
    results = json.loads((root / "out" / "results.json").read_text())
    reported = results["links"][-1]["test"]  # the final model on every site's validation split, pooled
    assert reported["sites"] == ["A", "B", "C"]

    images = tmp_path / "held-out"  # the same images the sites evaluated, as lossless PNG files
    classes = results["classes"]
    for site in reported["sites"]:
        data = load_local_data(load_site_config(root / f"site-{site}.yaml"))
        for i, (image, label) in enumerate(zip(data.site.val.images, data.site.val.labels)):
            folder = images / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{site}-{i:03d}.png")
    out = tmp_path / "predictions.csv"
    pred = subprocess.run([str(Path(sys.executable).with_name("weckd")), "predict", str(root / "out" / "model"),
                           str(images), "--csv", str(out)], capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == reported["n"]
    correct = sum(Path(r["path"]).parent.name == r["predicted"] for r in rows)
    assert correct / len(rows) == pytest.approx(reported["accuracy"], abs=1e-12)
    assert reported["accuracy"] > 0.4  # four classes: chance is 0.25
