"""Hostile payloads are refused before anything is loaded: NaN/Inf, oversized declarations, damaged
byte framing, wrong shapes for the architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from weckd.chain.errors import PayloadError
from weckd.chain.models import create_model
from weckd.chain.payload import (
    Payload,
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
    return {"w": torch.randn(4, 3), "b": torch.zeros(4), "n": torch.tensor(7)}


def test_payload_bytes_round_trip_is_exact(state: dict[str, torch.Tensor]) -> None:
    header, arrays = payload_from_bytes(payload_bytes(encode_state(state, "test_resnet", 2)))
    arch, got = decode_state(header, arrays, link=2)
    assert arch == "test_resnet" and set(got) == set(state)
    assert all(torch.equal(got[k], state[k].to(got[k].dtype)) for k in state)


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_truncated_payload_bytes_are_refused(state: dict[str, torch.Tensor], cut: int) -> None:
    data = payload_bytes(encode_state(state, "test_resnet", 0))
    with pytest.raises(PayloadError, match="truncated|not readable|do not add up"):
        payload_from_bytes(data[:-cut])


@pytest.mark.parametrize("data", [b"\x80\x04pickle-stream" * 4, b"\x80\x04", b"\x08" + b"\0" * 7 + b'{"a":1}x'])
def test_foreign_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(PayloadError, match="not a weckd payload|over the limit|runs past|not readable|metadata"):
        payload_from_bytes(data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_before_loading(state: dict[str, torch.Tensor], bad: float) -> None:
    state["w"][1, 2] = bad
    header, arrays = wire(encode_state(state, "test_resnet", 0))
    with pytest.raises(PayloadError, match="'w' holds 1 NaN/Inf"):
        decode_state(header, arrays, link=0)


def test_nan_logits_are_refused() -> None:
    logits = torch.zeros(5, 2)
    logits[0, 0] = float("nan")
    header, arrays = wire(encode_logits(logits, "test_resnet", 0))
    with pytest.raises(PayloadError, match="NaN/Inf"):
        decode_logits(header, arrays, n_classes=2, n_proxy=5, link=0)


def test_oversized_declaration_is_refused_before_allocation(state: dict[str, torch.Tensor]) -> None:
    head, body = split(payload_bytes(encode_state(state, "test_resnet", 0)))
    head["w"]["shape"] = [10**9, 10**9]  # 10^18 floats declared for 'w'
    with pytest.raises(PayloadError, match="over the limit"):
        payload_from_bytes(forged(head, body))


def test_payload_over_a_lowered_limit_is_refused(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(PayloadError, match="over the limit of 16 bytes"):
        payload_from_bytes(payload_bytes(encode_state(state, "test_resnet", 0)), max_bytes=16)


def test_negative_dimension_is_refused(state: dict[str, torch.Tensor]) -> None:
    head, body = split(payload_bytes(encode_state(state, "test_resnet", 0)))
    head["w"]["shape"] = [-4, -3]
    with pytest.raises(PayloadError, match="negative"):
        payload_from_bytes(forged(head, body))


def test_wrong_shapes_for_the_architecture_are_refused_before_loading() -> None:
    from weckd.chain.models import load_state

    model = create_model("test_resnet", 4, 1)
    own = model.state_dict()
    name = next(k for k, v in own.items() if v.ndim == 4)
    hostile = {k: v.clone() for k, v in own.items()}
    hostile[name] = torch.zeros(1, *own[name].shape[1:])
    _, decoded = decode_state(*wire(encode_state(hostile, "test_resnet", 0)), link=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PayloadError, match=f"{name}.*has shape"):
        load_state(model, decoded, "link 1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_payload_bytes_keep_tensors_bit_exact() -> None:
    arrays = {"a": np.array([1.5, -2.25], dtype=np.float16), "n": np.array(3, dtype=np.int64)}
    header, got = payload_from_bytes(payload_bytes(Payload("weights", "x", 4, arrays, "float16")))
    assert header == {"format": "weckd-payload", "version": 3, "kind": "weights", "arch": "x", "link": 4,
                      "wire-dtype": "float16"}
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype and got[k].shape == v.shape
               for k, v in arrays.items())
    assert all(a.flags.writeable for a in got.values())  # torch takes them without a copy or a warning
