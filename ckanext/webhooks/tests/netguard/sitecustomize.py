"""Test network guard: no packet leaves 127.0.0.0/8 and ::1.

Loaded by every process the test suite starts (this directory is put first
on PYTHONPATH) and by the test process itself. Connecting a socket to any
non-loopback address, or resolving any name but localhost (the resolver sits
outside the machine), raises, and is written to $WEBHOOKS_NETGUARD_LOG, which
the suite checks at its end: a broken SSRF guard fails the run instead of
reaching a real host.
"""
import ipaddress
import os
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _violation(what):
    path = os.environ.get("WEBHOOKS_NETGUARD_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{os.getpid()} {what}\n")
    return ConnectionRefusedError(f"test network guard: refused {what}")


def _check(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _violation(f"connect to unresolved name {host!r}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise _violation(f"connect to {host}")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is None:
        return _getaddrinfo(host, *args, **kwargs)
    name = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return _getaddrinfo(host, *args, **kwargs)  # a literal: no DNS query
    except ValueError:
        pass
    if name.lower().rstrip(".") in _LOCAL_NAMES:
        return _getaddrinfo(host, *args, **kwargs)
    _violation(f"DNS lookup of {name!r}")
    raise socket.gaierror(socket.EAI_NONAME, f"test network guard: no DNS for {name!r}")


def install():
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo


if os.environ.get("WEBHOOKS_NETGUARD_LOG"):
    install()
