"""Payload round trips and the decoder's refusals (version, kind, link, architecture, shapes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from weckd.chain.errors import PayloadError
from weckd.chain.models import create_model, state_of
from weckd.chain.payload import VERSION, decode_logits, decode_state, encode_logits, encode_state


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return state_of(create_model("test_resnet", 3, 1))


def test_weights_round_trip_is_exact(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 2).pack()
    arch, back = decode_state(header, buffers, link=2, arch="test_resnet")
    assert arch == "test_resnet" and back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name].to(tensor.dtype), tensor)


def test_a_model_travels_as_one_flat_buffer_per_dtype(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0).pack()
    assert sorted(buffers) == ["float32", "int64"] and all(b.ndim == 1 for b in buffers.values())
    _, back = decode_state(header, buffers)
    assert all(back[k].shape == state[k].shape for k in state)  # 0-d num_batches_tracked included


def test_damaged_buffer_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0).pack()
    with pytest.raises(PayloadError, match="left over"):
        decode_state(header, {**buffers, "float32": np.concatenate([buffers["float32"], np.zeros(3, np.float32)])})
    with pytest.raises(PayloadError, match="too short"):
        decode_state(header, {**buffers, "float32": buffers["float32"][:-1]})


def test_weights_are_fp32_arrays_without_pickle(state: dict[str, torch.Tensor]) -> None:
    payload = encode_state({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, "a", 0)
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in payload.arrays.values())
    assert {a.dtype for a in payload.arrays.values()} <= {np.dtype("float32"), np.dtype("int64")}


def test_other_version_is_refused_with_a_fix(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0).pack()
    fix = rf"payload v{VERSION + 2}, expected v{VERSION}; upgrade weckd on both sides"
    with pytest.raises(PayloadError, match=fix):
        decode_state({**header, "version": VERSION + 2}, buffers)


@pytest.mark.parametrize("field,value,match", [("link", 5, "for link 5, expected link 1"),
                                               ("arch", "resnet18", "architecture 'resnet18'"),
                                               ("kind", "logits", "kind 'logits', expected 'weights'"),
                                               ("format", "other", "not a weckd payload")])
def test_mismatched_header_is_refused(state: dict[str, torch.Tensor], field: str, value: object, match: str) -> None:
    header, buffers = encode_state(state, "test_resnet", 1).pack()
    with pytest.raises(PayloadError, match=match):
        decode_state({**header, field: value}, buffers, link=1, arch="test_resnet")


def test_logits_round_trip_and_shape_check() -> None:
    logits = torch.randn(10, 4)
    header, buffers = encode_logits(logits, "test_resnet", 0).pack()
    arch, back = decode_logits(header, buffers, n_classes=4, n_proxy=10, link=0)
    assert arch == "test_resnet" and torch.equal(back, logits)
    with pytest.raises(PayloadError, match="same proxy set"):
        decode_logits(header, buffers, n_classes=4, n_proxy=12)
