"""This machine's interface addresses, as read from the kernel over rtnetlink."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from scaleout.transport import interfaces


def newaddr(family: int, scope: int, attrs: list[tuple[int, bytes]]) -> bytes:
    """The body of an RTM_NEWADDR message (ifaddrmsg and its attributes), as the kernel sends it."""
    body = struct.pack("=BBBBI", family, 24, 0, scope, 3)
    for kind, value in attrs:
        attr = struct.pack("=HH", 4 + len(value), kind) + value
        body += attr + b"\0" * (-len(attr) % 4)
    return body


def test_address_of_reads_the_local_end_and_skips_link_local() -> None:
    v4 = socket.inet_pton(socket.AF_INET, "192.0.2.7")
    peer = socket.inet_pton(socket.AF_INET, "192.0.2.1")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::2")
    # IFA_LABEL (3) before the address, odd length: attributes are 4-byte aligned.
    assert interfaces._address_of(newaddr(socket.AF_INET, 0, [(3, b"eth0\0"), (1, v4)])) == "192.0.2.7"
    # Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL is ours.
    assert interfaces._address_of(newaddr(socket.AF_INET, 0, [(1, peer), (2, v4)])) == "192.0.2.7"
    assert interfaces._address_of(newaddr(socket.AF_INET6, 0, [(1, v6)])) == "fd00::2"
    fe80 = socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert interfaces._address_of(newaddr(socket.AF_INET6, 253, [(1, fe80)])) is None  # RT_SCOPE_LINK
    assert interfaces._address_of(newaddr(socket.AF_INET, 0, [(1, b"\1\2")])) is None  # truncated


def test_local_addresses_has_loopback_and_no_link_local() -> None:
    found = interfaces.local_addresses()
    assert "127.0.0.1" in found
    assert not any(a.startswith("fe80:") or a.startswith("169.254.") for a in found), found
    assert [":" in a for a in found] == sorted(":" in a for a in found), found


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ip") is None, reason="needs Linux and iproute2")
def test_local_addresses_match_ip_addr() -> None:
    """The same set `ip addr` shows (an independent reader of the same kernel table)."""
    shown = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    want = {a["local"] for link in shown for a in link.get("addr_info", []) if a.get("scope") != "link"}
    assert set(interfaces.local_addresses()) == want
