"""fp16 on the wire: float tensors halve, integer buffers stay exact, the header's wire dtype is checked,
and the in-process teacher is rounded exactly as the wire rounds it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from weckd.chain.errors import ConfigError, PayloadError
from weckd.chain.models import create_model, state_of
from weckd.chain.payload import decode_state, encode_state, payload_bytes, payload_from_bytes, round_state

from .payload_forge import forged, split, wire
from .test_config import _load


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, 1)
    model(torch.randn(4, 1, 32, 32))  # moves BatchNorm running stats and num_batches_tracked off their defaults
    return state_of(model)


def test_fp16_round_trip_is_within_fp16_tolerance(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 1, "float16"))
    _, back = decode_state(header, arrays, link=1, arch="test_resnet")
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert back[name].dtype == torch.float32
            torch.testing.assert_close(back[name], tensor, rtol=1e-3, atol=1e-4)


def _bytes_of(arrays: dict[str, np.ndarray], kind: str) -> int:
    return sum(a.nbytes for a in arrays.values() if a.dtype.kind == kind)


def test_fp16_halves_the_float_bytes(state: dict[str, torch.Tensor]) -> None:
    a32 = encode_state(state, "test_resnet", 0, "float32").arrays
    a16 = encode_state(state, "test_resnet", 0, "float16").arrays
    assert _bytes_of(a16, "f") * 2 == _bytes_of(a32, "f")
    data = payload_bytes(encode_state(state, "test_resnet", 0, "float16"))
    head, body = split(data)
    assert len(body) == _bytes_of(a16, "f") + _bytes_of(a16, "i")  # the header aside, nothing but the tensors
    assert len(body) <= 0.5 * sum(t.numel() * t.element_size() for t in state.values()) + _bytes_of(a16, "i")


def test_fp16_leaves_integer_buffers_exact(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 0, "float16"))
    _, back = decode_state(header, arrays)
    ints = [k for k, t in state.items() if not t.is_floating_point()]
    assert ints and all(back[k].dtype == torch.int64 and torch.equal(back[k], state[k]) for k in ints)
    assert all(arrays[k].dtype == np.int64 for k in ints)


def test_header_records_the_wire_dtype(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 0, "float16"))
    assert header["wire-dtype"] == "float16" and {str(a.dtype) for a in arrays.values()} == {"float16", "int64"}


def test_unknown_wire_dtype_in_the_header_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 0, "float16"))
    with pytest.raises(PayloadError, match="wire dtype 'bfloat16' unknown"):
        decode_state({**header, "wire-dtype": "bfloat16"}, arrays)


def test_unknown_tensor_dtype_is_refused(state: dict[str, torch.Tensor]) -> None:
    head, body = split(payload_bytes(encode_state(state, "test_resnet", 0, "float16")))
    name = next(k for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F16")
    head[name]["dtype"] = "F64"
    with pytest.raises(PayloadError, match=r"declares dtype 'F64'; this weckd reads F32, F16, I64"):
        payload_from_bytes(forged(head, body))


def test_float_buffer_not_in_the_declared_wire_dtype_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, arrays = wire(encode_state(state, "test_resnet", 0, "float16"))
    with pytest.raises(PayloadError, match="not in the declared wire dtype float32"):
        decode_state({**header, "wire-dtype": "float32"}, arrays)


def test_encoder_refuses_an_unknown_wire_dtype(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(PayloadError, match="use one of float32, float16"):
        encode_state(state, "test_resnet", 0, "int8")


def test_in_process_rounding_equals_the_decoded_wire_state(state: dict[str, torch.Tensor]) -> None:
    _, decoded = decode_state(*wire(encode_state(state, "test_resnet", 0, "float16")))
    rounded = round_state(state, "float16")
    assert all(rounded[k].dtype == decoded[k].dtype and torch.equal(rounded[k], decoded[k]) for k in state)


def test_wire_dtype_defaults_to_float16_and_accepts_float32(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).chain.wire_dtype == "float16"
    assert _load(tmp_path, {}, ("chain.wire_dtype=float32",)).chain.wire_dtype == "float32"


def test_unknown_wire_dtype_in_the_config_suggests_the_close_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chain\.wire_dtype: 'fp16' is not one of float32, float16"):
        _load(tmp_path, {"chain": {"wire_dtype": "fp16"}})
