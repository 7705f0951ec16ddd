"""Test network guard: no packet leaves 127.0.0.0/8 and ::1.

Loaded by every process the test suite starts (this directory is put first
on PYTHONPATH) and by the test process itself. Connecting a socket to any
non-loopback address, or resolving any name but localhost (the resolver sits
outside the machine), raises, and is written to $WEBHOOKS_NETGUARD_LOG, which
the suite checks at its end: a broken SSRF guard fails the run instead of
reaching a real host.

A resolver stand-in answers names under ``.dns-standin`` (a name no real
resolver knows, and not a special-use name, which the guard refuses without
asking DNS): no DNS query ever leaves the machine, yet the worker's real
resolution path runs (``socket.getaddrinfo`` on the resolver's threads). It
reads the JSON file named by ``$WEBHOOKS_DNS_STANDIN`` at every lookup, so a
test changes the answers of running processes by rewriting it
(``tests/dns_standin.py`` does), a name to an entry::

    {"ok.dns-standin": {"answer": ["127.0.0.2"]},
     "down.dns-standin": {"fail": "EAI_AGAIN"},           # or EAI_NONAME, EAI_FAIL
     "hangs.dns-standin": {"hang": true},                  # until the entry changes
     "soon.dns-standin": {"fail": "EAI_AGAIN", "until": 1795977164.0,
                          "answer": ["127.0.0.2"]}}        # fails until then

A name under the suffix without an entry does not exist (EAI_NONAME); a
hanging lookup gives up after 60 s (EAI_AGAIN). Every lookup appends
``<time> <pid> start|end <name> [<result>]`` to ``$WEBHOOKS_DNS_STANDIN.log``.
"""
import ipaddress
import json
import os
import socket
import time

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


STANDIN_SUFFIX = ".dns-standin"
_HANG_LIMIT = 60.0


def _standin_log(*words):
    path = os.environ.get("WEBHOOKS_DNS_STANDIN")
    if path:
        with open(path + ".log", "a") as handle:
            handle.write(" ".join([f"{time.time():.3f}", str(os.getpid()), *map(str, words)])
                         + "\n")


def _standin_entry(name):
    path = os.environ.get("WEBHOOKS_DNS_STANDIN")
    try:
        with open(path) as handle:
            return json.load(handle).get(name)
    except (TypeError, OSError, ValueError):
        return None


def _standin(name, port):
    """The stand-in resolver's answer for ``name`` (see the module docstring)."""
    _standin_log("start", name)
    result = "error"
    try:
        give_up = time.monotonic() + _HANG_LIMIT
        while True:
            entry = _standin_entry(name)
            if entry is None:
                raise socket.gaierror(socket.EAI_NONAME, f"dns stand-in: no such name {name}")
            current = entry.get("until") is None or time.time() < entry["until"]
            if current and entry.get("hang"):
                if time.monotonic() > give_up:
                    raise socket.gaierror(socket.EAI_AGAIN, "dns stand-in: gave up hanging")
                time.sleep(0.05)  # the hanging resolver, waiting for its entry to change
                continue
            if current and entry.get("fail"):
                raise socket.gaierror(getattr(socket, entry["fail"]),
                                      f"dns stand-in: {entry['fail']}")
            infos = []
            for address in entry.get("answer") or []:
                if ":" in address:
                    infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                                  (address, port or 0, 0, 0)))
                else:
                    infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                  (address, port or 0)))
            if not infos:
                raise socket.gaierror(socket.EAI_NONAME, f"dns stand-in: no address for {name}")
            result = ",".join(info[4][0] for info in infos)
            return infos
    except socket.gaierror as error:
        result = f"gaierror:{error.errno}"
        raise
    finally:
        _standin_log("end", name, result)


def getaddrinfo(host, *args, **kwargs):
    if host is None:
        return _getaddrinfo(host, *args, **kwargs)
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name.lower().rstrip(".").endswith(STANDIN_SUFFIX):
        port = args[0] if args else kwargs.get("port")
        return _standin(name.lower().rstrip("."), int(port) if str(port).isdigit() else 0)
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
