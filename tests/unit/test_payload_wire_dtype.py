"""fp16 on the wire: float tensors halve, integer buffers stay exact, the header's wire dtype is checked,
and the in-process teacher is rounded exactly as the wire rounds it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from weckd.chain.errors import ConfigError, PayloadError
from weckd.chain.models import create_model, state_of
from weckd.chain.payload import decode_state, encode_state, round_state

from .test_config import _load


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, 1)
    model(torch.randn(4, 1, 32, 32))  # moves BatchNorm running stats and num_batches_tracked off their defaults
    return state_of(model)


def test_fp16_round_trip_is_within_fp16_tolerance(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 1, "float16").pack()
    _, back = decode_state(header, buffers, link=1, arch="test_resnet")
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert back[name].dtype == torch.float32
            torch.testing.assert_close(back[name], tensor, rtol=1e-3, atol=1e-4)


def test_fp16_halves_the_float_bytes(state: dict[str, torch.Tensor]) -> None:
    _, b32 = encode_state(state, "test_resnet", 0, "float32").pack()
    _, b16 = encode_state(state, "test_resnet", 0, "float16").pack()
    assert b16["float16"].nbytes * 2 == b32["float32"].nbytes
    total = sum(b.nbytes for b in b16.values())
    assert total <= 0.5 * sum(t.numel() * t.element_size() for t in state.values()) + b16["int64"].nbytes


def test_fp16_leaves_integer_buffers_exact(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0, "float16").pack()
    _, back = decode_state(header, buffers)
    ints = [k for k, t in state.items() if not t.is_floating_point()]
    assert ints and all(back[k].dtype == torch.int64 and torch.equal(back[k], state[k]) for k in ints)
    assert np.array_equal(buffers["int64"], np.concatenate([state[k].reshape(-1).numpy() for k in ints]))


def test_header_records_the_wire_dtype(state: dict[str, torch.Tensor]) -> None:
    header, _ = encode_state(state, "test_resnet", 0, "float16").pack()
    assert header["wire-dtype"] == "float16" and set(header["dtypes"]) == {"float16", "int64"}


def test_unknown_wire_dtype_in_the_header_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0, "float16").pack()
    with pytest.raises(PayloadError, match="wire dtype 'bfloat16' unknown"):
        decode_state({**header, "wire-dtype": "bfloat16"}, buffers)


def test_unknown_tensor_dtype_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0, "float16").pack()
    dtypes = ["float64" if d == "float16" else d for d in header["dtypes"]]
    with pytest.raises(PayloadError, match=r"declares dtype\(s\) \['float64'\]"):
        decode_state({**header, "dtypes": dtypes}, {"float64": buffers["float16"].astype(np.float64),
                                                    "int64": buffers["int64"]})


def test_float_buffer_not_in_the_declared_wire_dtype_is_refused(state: dict[str, torch.Tensor]) -> None:
    header, buffers = encode_state(state, "test_resnet", 0, "float16").pack()
    with pytest.raises(PayloadError, match="not in the declared wire dtype float32"):
        decode_state({**header, "wire-dtype": "float32"}, buffers)


def test_encoder_refuses_an_unknown_wire_dtype(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(PayloadError, match="use one of float32, float16"):
        encode_state(state, "test_resnet", 0, "int8")


def test_in_process_rounding_equals_the_decoded_wire_state(state: dict[str, torch.Tensor]) -> None:
    _, wire = decode_state(*encode_state(state, "test_resnet", 0, "float16").pack())
    rounded = round_state(state, "float16")
    assert all(rounded[k].dtype == wire[k].dtype and torch.equal(rounded[k], wire[k]) for k in state)


def test_wire_dtype_defaults_to_float16_and_accepts_float32(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).chain.wire_dtype == "float16"
    assert _load(tmp_path, {}, ("chain.wire_dtype=float32",)).chain.wire_dtype == "float32"


def test_unknown_wire_dtype_in_the_config_suggests_the_close_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chain\.wire_dtype: 'fp16' is not one of float32, float16"):
        _load(tmp_path, {"chain": {"wire_dtype": "fp16"}})
