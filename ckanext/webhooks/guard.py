"""SSRF defence: which addresses the portal may send requests to.

Every request the portal sends to a hook's address goes through
:func:`resolve`: the host is normalised (odd IPv4 spellings such as
``2130706433`` or ``0x7f.1`` included), resolved once, every address it
resolves to is checked, and the caller connects to a checked address, never
to the name again (so DNS rebinding cannot swap it in between).

Refused unless ``ckanext.webhooks.allowed_networks`` lists them: every address
that is not globally routable (loopback, RFC 1918, link-local with cloud
metadata, CGNAT, 0/8, documentation, benchmarking, reserved, 240/4,
multicast, IPv6 unique-local and link-local) and IPv6 addresses that embed
such an IPv4 address (mapped, NAT64, 6to4, Teredo).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from ckan.plugins import toolkit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
MAX_ADDRESS_LENGTH = 2000
_SPECIAL_USE_TLDS = {"localhost", "local", "internal", "intranet", "lan", "home", "corp",
                     "private", "test", "invalid", "example", "onion", "arpa", "localdomain"}


class Refused(ValueError):
    """The address must not be contacted; the message says why."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str          # normalised host name or IP literal (no brackets)
    port: int
    path: str          # path and query, as sent in the request line
    addresses: tuple[IPAddress, ...]  # checked addresses, in resolver order

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    raw = toolkit.config.get("ckanext.webhooks.allowed_networks") or []
    if isinstance(raw, str):
        raw = raw.split()
    return [ipaddress.ip_network(item, strict=False) for item in raw if item]


def parse(address: str) -> tuple[str, str, int, str]:
    """Split and normalise an address: (scheme, host, port, path). Raises Refused."""
    if not isinstance(address, str) or not address:
        raise Refused("Missing value")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise Refused(f"Must be at most {MAX_ADDRESS_LENGTH} characters")
    if _CONTROL.search(address):
        raise Refused("Must not contain spaces or control characters")
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        raise Refused("Not a valid URL")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("Must be an absolute http:// or https:// URL")
    if toolkit.asbool(toolkit.config.get("ckanext.webhooks.https_only")) and scheme != "https":
        raise Refused("Must be an https:// URL on this portal")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("Must not contain credentials")
    if parts.fragment:
        raise Refused("Must not contain a fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused("Must be an absolute http:// or https:// URL")
    host = _normalise_host(host)
    if port == 0:
        raise Refused("Not a valid port")
    port = port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


@functools.lru_cache(maxsize=4096)
def _normalise_host(host: str) -> str:
    literal = _ip_literal(host)
    if literal is not None:
        return literal.compressed
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise Refused("Not a valid host name")
    if len(ascii_host) > 253:
        raise Refused("Not a valid host name")
    labels = ascii_host.split(".")
    if labels[-1] in _SPECIAL_USE_TLDS or ascii_host.endswith(".home.arpa"):
        # Special-use names (RFC 6761 and friends) are local by definition:
        # refused without asking DNS.
        raise Refused("Refers to a private, local or reserved network address")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*",
                        ascii_host):
        raise Refused("Not a valid host name")
    return ascii_host


def _ip_literal(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host.lower()):
        # inet_aton accepts the forms browsers and libc do: 2130706433, 0x7f.1, 017.1 ...
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise Refused("Not a valid IP address")
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_ip(ip: IPAddress, allowed: Iterable = ()) -> None:
    """Raise Refused unless ``ip`` may be contacted."""
    allowed = list(allowed)
    if any(ip in net for net in allowed if net.version == ip.version):
        return
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            check_ip(inner, allowed)
            if ip.ipv4_mapped:
                return
    if ip.is_multicast or not ip.is_global or ip.is_reserved or ip.is_unspecified:
        raise Refused("Refers to a private, local or reserved network address")


def resolve(address: str, allowed: Optional[list] = None,
            hosts: Optional[dict] = None) -> Target:
    """Parse, resolve and check ``address``; the Target holds checked IPs only.

    ``hosts`` caches the outcome per (host, port) for the duration of one
    batch of deliveries: many hooks share a receiver host.
    """
    scheme, host, port, path = parse(address)
    if allowed is None:
        allowed = allowed_networks()
    if hosts is not None:
        key = (host, port)
        if key not in hosts:
            try:
                hosts[key] = _resolve_host(host, port, allowed)
            except Refused as refused:
                hosts[key] = refused
        found = hosts[key]
        if isinstance(found, Refused):
            raise found
        return Target(scheme, host, port, path, found)
    return Target(scheme, host, port, path, _resolve_host(host, port, allowed))


def _resolve_host(host: str, port: int, allowed: list) -> tuple[IPAddress, ...]:
    literal = _ip_literal(host)
    if literal is not None:
        ips: list[IPAddress] = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise Refused("The host name could not be resolved")
        ips = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if ip not in ips:
                ips.append(ip)
        if not ips:
            raise Refused("The host name could not be resolved")
    for ip in ips:  # one bad address refuses the name: rebinding tricks mix them
        check_ip(ip, allowed)
    return tuple(ips)
