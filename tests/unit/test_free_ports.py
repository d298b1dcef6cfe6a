"""Ports picked for the processes of a local federation (the demo, the tests): free, distinct, and outside the range
the kernel hands to outgoing connections, which could take a port before its server binds it."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from weckd.chain import procs


def test_ports_come_from_below_the_ephemeral_range_distinct_and_bindable(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(procs, "EPHEMERAL_RANGE", ranges)
    ports = procs.free_ports(12)
    assert len(set(ports)) == 12 and all(procs.LOWEST_PICKED <= p < 32768 for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_picked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        ranges = tmp_path / "ip_local_port_range"  # a range whose only port below it is the one held
        ranges.write_text(f"{taken + 1} 60999\n")
        monkeypatch.setattr(procs, "LOWEST_PICKED", taken)
        monkeypatch.setattr(procs, "EPHEMERAL_RANGE", ranges)
        [port] = procs.free_ports(1)
    assert port != taken  # the kernel picked one instead


def test_without_a_readable_range_the_kernel_picks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "EPHEMERAL_RANGE", tmp_path / "missing")
    ports = procs.free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)
