"""Every hostile input becomes a typed refusal: payload headers, saved models, images, the site's link
store and YAML configs. One test per input; each asserts the error type (and, for payloads, the
refusal reason a site would send back)."""
from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from weckd.chain import artifacts
from weckd.chain.artifacts import ModelCard, read_card, save_model
from weckd.chain.cli import main
from weckd.chain.config import MAX_CONFIG_BYTES, load_config
from weckd.chain.data import MAX_IMAGE_PIXELS, ImageSpec, read_labelled
from weckd.chain.errors import ConfigError, PayloadError, SecurityError
from weckd.chain.models import create_model
from weckd.chain.payload import (
    MAX_HEADER_BYTES,
    PayloadSizeError,
    check_header,
    encode_state,
    payload_bytes,
    payload_from_bytes,
)
from weckd.chain.protocol import Reason, reason_of
from weckd.client.linkstore import LinkOutput, LinkStore

from .helpers import make_image_folder
from .payload_forge import forged, framed, split

# ---------------------------------------------------------------- payload headers


@pytest.fixture
def packed() -> tuple[dict[str, Any], bytes]:
    """A small payload's parsed JSON header and its data section."""
    state = {"w": torch.randn(4, 3), "b": torch.zeros(4), "n": torch.tensor(7)}
    return split(payload_bytes(encode_state(state, "test_resnet", 0)))


def _refused(err: pytest.ExceptionInfo[PayloadError], reason: Reason) -> None:
    assert reason_of(err.value) is reason
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_deeply_nested_header_is_refused_before_parsing() -> None:
    head = b'{"__metadata__":{},"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(PayloadError, match="nests deeper than") as err:
        payload_from_bytes(framed(head))
    _refused(err, Reason.MALFORMED_PAYLOAD)


def test_nested_tensor_entry_is_refused(packed: tuple[dict[str, Any], bytes]) -> None:
    head, body = packed
    head["w"]["shape"] = [[4], 3]
    with pytest.raises(PayloadError, match="non-integer dimension") as err:
        payload_from_bytes(forged(head, body))
    _refused(err, Reason.MALFORMED_PAYLOAD)


def test_tensor_entry_with_other_fields_is_refused(packed: tuple[dict[str, Any], bytes]) -> None:
    head, body = packed
    head["w"]["note"] = "x"
    with pytest.raises(PayloadError, match="lacks its dtype, shape or data offsets") as err:
        payload_from_bytes(forged(head, body))
    _refused(err, Reason.MALFORMED_PAYLOAD)


@pytest.mark.parametrize("shape", [[10**30, 0], [2**40, 2**40, 0]], ids=["overflow", "too-big-with-a-zero"])
def test_huge_dimension_is_refused_as_too_large(packed: tuple[dict[str, Any], bytes], shape: list[int]) -> None:
    head, body = packed
    head["w"]["shape"] = shape
    with pytest.raises(PayloadSizeError, match="over the limit") as err:
        payload_from_bytes(forged(head, body))
    _refused(err, Reason.TOO_LARGE)


def test_bool_dimension_is_not_an_int(packed: tuple[dict[str, Any], bytes]) -> None:
    head, body = packed
    head["w"]["shape"] = [True, 12]
    with pytest.raises(PayloadError, match="non-integer dimension") as err:
        payload_from_bytes(forged(head, body))
    _refused(err, Reason.MALFORMED_PAYLOAD)


def test_bool_link_is_not_an_int(packed: tuple[dict[str, Any], bytes]) -> None:
    header, _ = payload_from_bytes(forged(*packed))
    with pytest.raises(PayloadError, match="for link True"):
        check_header({**header, "link": True}, kind="weights")


@pytest.mark.parametrize("link", ["-1", "1e3", " 1", "0x1", "9" * 40])
def test_a_link_that_is_not_a_plain_decimal_is_refused(packed: tuple[dict[str, Any], bytes], link: str) -> None:
    head, body = packed
    head["__metadata__"]["link"] = link
    header, _ = payload_from_bytes(forged(head, body))
    with pytest.raises(PayloadError, match="for link"):
        check_header(header, kind="weights")


def test_header_over_the_byte_cap_is_refused_as_too_large() -> None:
    data = framed(b" " * (8 << 20))
    with pytest.raises(PayloadSizeError, match=f"over the limit of {MAX_HEADER_BYTES} bytes") as err:
        payload_from_bytes(data)
    _refused(err, Reason.TOO_LARGE)


def test_header_too_large_for_its_tensor_count_is_refused(packed: tuple[dict[str, Any], bytes]) -> None:
    head, body = packed
    text = json.dumps(head).encode() + b" " * 20_000  # safetensors pads its header with spaces; not this many
    with pytest.raises(PayloadSizeError, match="too large for its 3 tensor") as err:
        payload_from_bytes(framed(text, body))
    _refused(err, Reason.TOO_LARGE)


def test_header_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(PayloadError, match="JSON list, not an object") as err:
        payload_from_bytes(framed(b"[1, 2]"))
    _refused(err, Reason.MALFORMED_PAYLOAD)


# ---------------------------------------------------------------- saved models


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    state = create_model("test_resnet", 2, 1).state_dict()
    save_model(folder, state, ModelCard("test_resnet", ["a", "b"], 32, 1, {}))
    return folder


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(path)
    return path


def _predict_error(capsys: pytest.CaptureFixture[str], model: Path, image: Path) -> str:
    assert main(["predict", str(model), str(image), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and " WARNING " not in line]
    assert out == "" and len(lines) == 1 and lines[0].startswith("weckd: error: "), err
    return lines[0]


def _edit_card(model: Path, **fields: Any) -> None:
    card = json.loads((model / "model_card.json").read_text())
    (model / "model_card.json").write_text(json.dumps({**card, **fields}))


def test_model_card_that_is_a_list_is_refused(model: Path) -> None:
    (model / "model_card.json").write_text("[1, 2, 3]")
    with pytest.raises(PayloadError, match="JSON list, not an object"):
        read_card(model)


def test_weights_file_outside_the_model_folder_is_refused(model: Path, image: Path, capsys) -> None:
    _edit_card(model, weights={"file": "../x.png", "sha256": "0" * 64})
    assert "not {file: a plain file name" in _predict_error(capsys, model, image)


def test_weights_linked_to_a_device_are_refused(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(SecurityError, match="leaves the folder"):
        artifacts.load_model_files(model)


def test_weights_that_are_not_a_regular_file_are_refused(model: Path) -> None:
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    with pytest.raises(PayloadError, match="not a regular file"):
        artifacts.load_model_files(model)


def test_weights_over_the_size_cap_are_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_WEIGHTS_BYTES", 1024)
    with pytest.raises(PayloadError, match="expected a regular file of at most 1024 bytes"):
        artifacts.load_model_files(model)


def test_predict_refuses_nan_weights(tmp_path: Path, image: Path, capsys) -> None:
    state = create_model("test_resnet", 2, 1).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[name][0].fill_(float("nan"))
    save_model(tmp_path / "nan", state, ModelCard("test_resnet", ["a", "b"], 32, 1, {}))
    assert "NaN/Inf" in _predict_error(capsys, tmp_path / "nan", image)


def test_predict_refuses_a_card_that_does_not_validate(model: Path, image: Path, capsys) -> None:
    _edit_card(model, input={"size": 10**9, "channels": 1, "layout": "NCHW", "dtype": "float32"})
    assert "input.size is 1000000000" in _predict_error(capsys, model, image)


# ---------------------------------------------------------------- images


def _png_bomb(side: int, complete: bool) -> bytes:
    """A PNG whose header declares ``side`` x ``side`` grey pixels: with ``complete``, all of them
    (zeros, compressed row by row), else a 64-byte stub (a few dozen bytes in all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    if complete:
        packer, row = zlib.compressobj(1), b"\0" * (side + 1)
        pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    else:
        pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "complete"), [(100_000, False), (8_200, True)],
                         ids=["over-pil-limit", "over-weckd-limit-only"])
def test_decompression_bomb_is_skipped_and_counted(
    tmp_path: Path, side: int, complete: bool, caplog: pytest.LogCaptureFixture
) -> None:
    assert side * side > MAX_IMAGE_PIXELS
    make_image_folder(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "a" / "bomb.png").write_bytes(_png_bomb(side, complete))
    with caplog.at_level(logging.WARNING):
        data = read_labelled(str(tmp_path), ImageSpec(("a", "b"), 16, 1))
    assert len(data) == 5 and data.skipped == 1
    assert "skipped 1 unreadable image(s) of 6" in caplog.text


# ---------------------------------------------------------------- the site's link store


def _stored(tmp_path: Path) -> LinkStore:
    store = LinkStore(tmp_path)
    store.put("k", LinkOutput({"weights": b"w" * 10}, {"val-accuracy": 0.5}, {"arch": "test_resnet"}))
    return store


@pytest.mark.parametrize(
    "meta",
    ["{not json", "[1, 2]", '{"key": "k", "kinds": "weights", "sha256": {}, "metrics": {}, "info": {}}',
     '{"key": 7, "kinds": ["weights"], "sha256": {}, "metrics": {}, "info": {}}'],
    ids=["bad-json", "a-list", "kinds-not-a-list", "key-not-a-string"],
)
def test_corrupt_link_record_means_nothing_stored(
    tmp_path: Path, meta: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _stored(tmp_path)
    (store.dir / "meta.json").write_text(meta)
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_stored_link_without_checksums_is_not_used(tmp_path: Path) -> None:
    store = _stored(tmp_path)
    meta = json.loads((store.dir / "meta.json").read_text())
    (store.dir / "meta.json").write_text(json.dumps({**meta, "sha256": {}}))
    (store.dir / "weights.bin").write_bytes(b"forged")
    assert store.get("k") is None


# ---------------------------------------------------------------- YAML configs


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join([*lines, "seed: *i"]) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="aliases") as err:
        load_config(path)
    assert time.monotonic() - start < 5 and len(str(err.value)) < 400


def test_long_value_in_a_config_error_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(f"seed: {'x' * 200_000}\n")
    with pytest.raises(ConfigError, match="expected an integer") as err:
        load_config(path)
    assert len(str(err.value)) < 400


def test_oversized_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"over {MAX_CONFIG_BYTES} bytes"):
        load_config(path)
