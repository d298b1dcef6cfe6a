"""Payload bytes in Flower arrays as the coordinator relays them: a received payload is assembled in one copy and
handed on as the very array it came in, never copied again to be sent."""
from __future__ import annotations

import inspect
import os
import tracemalloc
from typing import Any

import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.app.message import array as flower_array
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from weckd.chain import flower
from weckd.server.relay import relay_from_reply

MIB = 1 << 20


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 MiB chunks (what every Flower process weckd starts uses), and Flower's own ``Array.inflate`` restored
    after the test."""
    monkeypatch.setattr(flower_array, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", MIB)
    monkeypatch.setattr(Array, "inflate", inspect.getattr_static(Array, "inflate"))


def sent_contents(blob: bytes, sealed: bool = True) -> tuple[str, dict[str, bytes]]:
    """A message content carrying ``blob`` as the objects the SuperLink stores for it (id of the root, contents)."""
    content = RecordDict(flower.payload_records(sealed, {"payload": blob}))
    return content.object_id, {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}


def inflate_peak(root: str, contents: dict[str, bytes]) -> tuple[Any, int]:
    """The received content, and the most memory its assembly held beyond the stored objects themselves."""
    tracemalloc.start()
    try:
        content = inflate_object_from_contents(root, contents)
        return content, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.usefixtures("small_chunks")
def test_a_received_payload_is_joined_from_its_chunks_in_one_copy() -> None:
    """Flower grows a bytearray from the chunks and copies it into bytes (chunks + buffer + bytes); joined, the
    chunks and the bytes: a 6 MiB payload costs under 2.5x its size to receive, where Flower's costs over 2.5x."""
    blob = os.urandom(6 * MIB)
    root, contents = sent_contents(blob)
    _, flowers = inflate_peak(root, dict(contents))
    flower.join_array_chunks()
    content, joined = inflate_peak(root, dict(contents))
    assert flower.read_payloads(content, "site A") == (True, {"payload": blob})
    assert flowers > 2.5 * len(blob) > joined
    assert content.object_id == root  # what was received is what was sent, to the byte


@pytest.mark.usefixtures("small_chunks")
def test_joining_chunks_twice_wraps_flowers_own_inflate_once() -> None:
    flower.join_array_chunks()
    wrapper = inspect.getattr_static(Array, "inflate").__func__
    flower.join_array_chunks()
    again = inspect.getattr_static(Array, "inflate").__func__
    assert again.__wrapped__ is wrapper.__wrapped__  # Flower's, not the first wrapper
    root, contents = sent_contents(b"\x01\x02" * MIB)
    content = inflate_object_from_contents(root, contents)
    assert flower.read_payloads(content, "site A") == (True, {"payload": b"\x01\x02" * MIB})


@pytest.mark.usefixtures("small_chunks")
def test_a_moved_array_assembly_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def inflate(cls: type, object_content: bytes, children: Any = None) -> Any:
        return cls(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b"")

    monkeypatch.setattr(Array, "inflate", classmethod(inflate))
    with pytest.raises(flower.ConfigError, match=r"Array.inflate no longer joins chunks into one buffer"):
        flower.join_array_chunks()
    with pytest.raises(flower.ConfigError, match=r"join_array_chunks"):
        flower.check_internals()


@pytest.mark.parametrize("sealed", [True, False])
def test_the_relay_hands_on_the_array_the_reply_came_in(sealed: bool) -> None:
    """The coordinator's relay holds a view into the reply's array, and the messages that hand the payload on
    carry that same array (its bytes are not copied to be sent)."""
    blob = os.urandom(3 * MIB + 5)
    if sealed:  # a real sealed payload: the relay routes it by the recipients its header names
        from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
        from weckd.chain.seal import SealHeader, seal

        header = SealHeader(run_id="run-1", link=0, sender="A", model="resnet18")
        blob = seal(blob, header, {"B": x25519.X25519PrivateKey.generate().public_key()},
                    ed25519.Ed25519PrivateKey.generate())
    reply = RecordDict(flower.payload_records(sealed, {"weights": blob}))
    received = next(iter(next(iter(reply.array_records.values())).values()))
    relay = relay_from_reply(reply, 0, "A", sealed)
    assert relay.blobs["weights"] == blob
    record = relay.records("weights", "B")[relay.record_key]
    assert record["payload"].data is received.data
    content = RecordDict({relay.record_key: record})
    assert flower.read_payloads(content, "site B") == (sealed, {"payload": blob})


@pytest.mark.parametrize("held", ["bytes", "offset view", "short view", "head view"])
def test_a_payload_not_held_as_a_received_array_is_serialised_afresh(held: str) -> None:
    """Bytes read from a checkpoint, or a view that is not an array's whole payload: the array is built from the
    bytes (a canonical ``.npy`` header), never from whatever buffer happens to hold them."""
    blob = os.urandom(4096)
    source = RecordDict(flower.payload_records(True, {"payload": blob}))
    npy = next(iter(source.array_records[flower.KEY_SEALED].values())).data
    data: bytes | memoryview = {"bytes": blob, "offset view": memoryview(b"\x00" + npy)[len(npy) - 4095:],
                                "short view": memoryview(npy)[len(npy) - 4096:-1],
                                "head view": memoryview(npy)[:4096]}[held]  # as long as the payload, not it
    arr = flower.payload_record({"payload": data})["payload"]
    assert arr.data is not npy and arr.data.endswith(bytes(data))
    content = RecordDict({flower.KEY_SEALED: ArrayRecord({"payload": arr})})
    assert flower.read_payloads(content, "site A") == (True, {"payload": bytes(data)})


@pytest.mark.usefixtures("small_chunks")
def test_chunks_in_any_order_a_sender_chose_are_joined_as_flower_joins_them() -> None:
    """The chunk order (and repeats) in an array's metadata are the sender's to choose, a hostile coordinator's
    included: joined, the bytes are exactly those Flower's own assembly gives, chunk for chunk."""
    blob = os.urandom(3 * MIB)
    content = RecordDict(flower.payload_records(True, {"payload": blob}))
    arr = content.array_records[flower.KEY_SEALED]["payload"]
    chunks = arr.slice_array()
    arr.__dict__["_chunks"] = [chunks[2], chunks[0], chunks[2], chunks[1]]  # what the metadata will name
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    flowers = inflate_object_from_contents(content.object_id, dict(contents))
    flower.join_array_chunks()
    joined = inflate_object_from_contents(content.object_id, dict(contents))
    data = joined.array_records[flower.KEY_SEALED]["payload"].data
    assert data == flowers.array_records[flower.KEY_SEALED]["payload"].data
    assert data == b"".join(bytes(chunks[i][1].data) for i in (2, 0, 2, 1)) != arr.data  # in the order named


@pytest.mark.usefixtures("small_chunks")
def test_an_array_whose_chunks_are_not_the_ones_it_names_is_refused_as_flower_refuses_it() -> None:
    root, contents = sent_contents(os.urandom(2 * MIB))
    array_id = next(oid for oid, c in contents.items() if c.startswith(b"Array "))
    chunk = next(oid for oid, c in contents.items() if c.startswith(b"ArrayChunk "))
    flower.join_array_chunks()
    with pytest.raises(ValueError, match="Unexpected set of `children`"):
        Array.inflate(contents[array_id], {chunk: flower_array.ArrayChunk.inflate(contents[chunk])})
