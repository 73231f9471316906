"""The addresses of this machine's network interfaces, for certificates of a wildcard bind.

On Linux the kernel is asked directly over rtnetlink (``RTM_GETADDR``, what ``ip addr``
does): every IPv4 and IPv6 address of every interface, secondary ones included, with no
subprocess, no extra package and no dependence on /etc/hosts. Elsewhere, or if netlink is
unavailable, it falls back to the host name's addresses and the source address of the
default route. Link-local addresses are left out (they need a zone to be dialled). A name
it cannot see (a NAT or public address, a DNS name) is what ``--san`` is for.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct

log = logging.getLogger("scaleout.transport")

_NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # length, type
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RT_SCOPE_LINK = 253


def local_addresses() -> list[str]:
    """Every usable address of this machine's interfaces (loopback included), IPv4 first."""
    try:
        found = _netlink_addresses()
    except (OSError, AttributeError, struct.error) as exc:  # not Linux, or netlink refused
        log.debug("cannot list interface addresses over netlink (%s): using the host name's", exc)
        found = _resolver_addresses()
    usable = {a for a in found if not _link_local(a)}
    return sorted(usable, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def _align(n: int) -> int:
    return (n + 3) & ~3


def _netlink_addresses() -> list[str]:
    out: list[str] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:  # type: ignore[attr-defined]
        sock.settimeout(2.0)
        sock.bind((0, 0))
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise OSError("netlink closed before the end of the address dump")
            offset = 0
            while offset + _NLMSG_HDR.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, offset)
                if length < _NLMSG_HDR.size:
                    raise OSError("malformed netlink message")
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    raise OSError("netlink refused the address dump")
                if kind == _RTM_NEWADDR:
                    address = _address_of(data[offset + _NLMSG_HDR.size : offset + length])
                    if address is not None:
                        out.append(address)
                offset += _align(length)


def _address_of(msg: bytes) -> str | None:
    """The address an ``RTM_NEWADDR`` message announces (its local end on point-to-point links)."""
    family, _, _, scope, _ = _IFADDRMSG.unpack_from(msg)
    if family not in (socket.AF_INET, socket.AF_INET6) or scope == _RT_SCOPE_LINK:
        return None
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(msg):
        length, kind = _RTATTR.unpack_from(msg, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = msg[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
    if raw is None or len(raw) != (4 if family == socket.AF_INET else 16):
        return None
    return socket.inet_ntop(family, raw)


def _resolver_addresses() -> list[str]:
    found = {"127.0.0.1"}
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]).partition("%")[0])
    # The address this machine sends from by default (connecting UDP sends nothing).
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            found.add(str(sock.getsockname()[0]))
    return sorted(found)


def _link_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    return ip.is_link_local or ip.is_unspecified
