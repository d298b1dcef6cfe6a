"""Payload round trips and the decoder's refusals (version, kind, link, architecture, layout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load, save
from weckd.chain.errors import PayloadError
from weckd.chain.models import create_model, state_of
from weckd.chain.payload import (
    VERSION,
    decode_logits,
    decode_state,
    encode_logits,
    encode_state,
    payload_bytes,
    payload_from_bytes,
)

from .payload_forge import forged, split, wire


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return state_of(create_model("test_resnet", 3, 1))


def test_weights_round_trip_is_exact(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 2))
    arch, back = decode_state(header, arrays, link=2, arch="test_resnet")
    assert arch == "test_resnet" and back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name].to(tensor.dtype), tensor)


def test_a_payload_is_safetensors_bytes_any_reader_opens(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    data = payload_bytes(encode_state(state, "test_resnet", 1, "float16"))
    (tmp_path / "p.safetensors").write_bytes(data)
    with safe_open(tmp_path / "p.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "weckd-payload", "version": str(VERSION), "kind": "weights",
                                "arch": "test_resnet", "link": "1", "wire-dtype": "float16"}
    plain = load(data)
    assert plain.keys() == state.keys()
    assert all(plain[k].shape == tuple(state[k].shape) for k in state)  # 0-d num_batches_tracked included


def test_a_safetensors_file_written_elsewhere_is_read(state: dict[str, torch.Tensor]) -> None:
    arrays = {k: v.numpy() for k, v in state.items()}
    meta = {"format": "weckd-payload", "version": str(VERSION), "kind": "weights", "arch": "test_resnet",
            "link": "0", "wire-dtype": "float32"}
    _, back = decode_state(*payload_from_bytes(save(arrays, metadata=meta)), link=0)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_damaged_layout_is_refused(state: dict[str, torch.Tensor]) -> None:
    data = payload_bytes(encode_state(state, "test_resnet", 0))
    with pytest.raises(PayloadError, match="do not add up"):
        payload_from_bytes(data + b"\0\0\0\0")
    head, body = split(data)
    first, second = sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])[:2]
    head[second]["data_offsets"] = [x - 4 for x in head[second]["data_offsets"]]  # overlaps the one before
    with pytest.raises(PayloadError, match="does not start where the one before it ends"):
        payload_from_bytes(forged(head, body))
    head, body = split(data)
    head[first]["data_offsets"][1] += 4
    with pytest.raises(PayloadError, match=r"spans \d+ bytes, its shape \d+"):
        payload_from_bytes(forged(head, body))


def test_weights_are_fp32_arrays_without_pickle(state: dict[str, torch.Tensor]) -> None:
    payload = encode_state({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, "a", 0)
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in payload.arrays.values())
    assert {a.dtype for a in payload.arrays.values()} <= {np.dtype("float32"), np.dtype("int64")}


def test_other_version_is_refused_with_a_fix(state: dict[str, torch.Tensor]) -> None:
    data = payload_bytes(encode_state(state, "test_resnet", 0))
    head, body = split(data)
    head["__metadata__"]["version"] = str(VERSION + 2)
    fix = rf"payload v{VERSION + 2}, expected v{VERSION}; upgrade weckd on both sides"
    with pytest.raises(PayloadError, match=fix):
        decode_state(*payload_from_bytes(forged(head, body)))


def test_a_v2_payload_is_named_as_such() -> None:
    with pytest.raises(PayloadError, match=rf"payload v2, expected v{VERSION}; upgrade weckd on both sides"):
        payload_from_bytes(b"WKPB\0\0\0\x10" + b"{}" * 8)


@pytest.mark.parametrize("field,value,match", [("link", 5, "for link 5, expected link 1"),
                                               ("arch", "resnet18", "architecture 'resnet18'"),
                                               ("kind", "logits", "kind 'logits', expected 'weights'"),
                                               ("format", "other", "not a weckd payload")])
def test_mismatched_header_is_refused(state: dict[str, torch.Tensor], field: str, value: object, match: str) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 1))
    with pytest.raises(PayloadError, match=match):
        decode_state({**header, field: value}, arrays, link=1, arch="test_resnet")


def test_metadata_fields_must_be_strings(state: dict[str, torch.Tensor]) -> None:
    head, body = split(payload_bytes(encode_state(state, "test_resnet", 1)))
    head["__metadata__"]["link"] = 1
    with pytest.raises(PayloadError, match="lacks its metadata"):
        payload_from_bytes(forged(head, body))


def test_logits_round_trip_and_shape_check() -> None:
    logits = torch.randn(10, 4)
    header, arrays = wire(encode_logits(logits, "test_resnet", 0))
    arch, back = decode_logits(header, arrays, n_classes=4, n_proxy=10, link=0)
    assert arch == "test_resnet" and torch.equal(back, logits)
    with pytest.raises(PayloadError, match="same proxy set"):
        decode_logits(header, arrays, n_classes=4, n_proxy=12)
