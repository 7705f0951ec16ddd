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

A name that cannot be resolved (no answer, a resolver error, or no answer
within ``ckanext.webhooks.dns_timeout``) raises :class:`Unresolvable`: a
network condition, not a verdict on the address. Deliveries retry it (error
kind ``dns_error``); input validation refuses it like any other Refused.
Deliveries resolve through :class:`Resolver`, off the sender's event loop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from . import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
MAX_ADDRESS_LENGTH = 2000
_SPECIAL_USE_TLDS = {"localhost", "local", "internal", "intranet", "lan", "home", "corp",
                     "private", "test", "invalid", "example", "onion", "arpa", "localdomain"}


class Refused(ValueError):
    """The address must not be contacted; the message says why."""


class Unresolvable(Refused):
    """The host name could not be resolved now (the resolver failed, said
    there is no such name, or did not answer in time). A Refused, so input
    validation refuses such an address; deliveries retry it."""


UNRESOLVABLE = "The host name could not be resolved"
DNS_CACHE_SECONDS = 5.0  # positive answers only: a changed record is seen soon


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
    return [ipaddress.ip_network(item, strict=False) for item in settings.allowed_networks()]


def address_rules() -> tuple[bool, frozenset[int]]:
    """The settings :func:`parse` applies (read once for many addresses)."""
    return settings.https_only(), frozenset(settings.allowed_ports_below_1024())


def parse(address: str, rules: Optional[tuple[bool, frozenset[int]]] = None
          ) -> tuple[str, str, int, str]:
    """Split and normalise an address: (scheme, host, port, path). Raises Refused.
    ``rules``: :func:`address_rules`, when the caller has read them already."""
    if not isinstance(address, str) or not address:
        raise Refused("Missing value")
    # The same addresses come back at every delivery: parsed once per
    # address and settings (a refusal is not cached, it is raised again).
    return _parse(address, *(rules or address_rules()))


@functools.lru_cache(maxsize=16384)
def _parse(address: str, https_only: bool,
           allowed_ports_below_1024: frozenset[int]) -> tuple[str, str, int, str]:
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
    if https_only and scheme != "https":
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
    if port < 1024 and port not in allowed_ports_below_1024:
        raise Refused("Ports below 1024 other than 80 and 443 are not allowed on this portal")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


@functools.lru_cache(maxsize=4096)
def site_of(host: str) -> str:
    """What the per-site cap counts: the registrable domain of a name (from
    the bundled public suffix list: ``a.evil.example`` -> ``evil.example``),
    or the address itself for an IP literal or a bare public suffix."""
    if _ip_literal(host.strip("[]")) is not None:
        return host
    return _suffixes().privatesuffix(host) or host


@functools.lru_cache(maxsize=1)
def _suffixes():
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()  # the list shipped with the package: no download


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
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", ascii_host):
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

    Blocking, for input validation and the CLI: a name that does not resolve
    within ``dns_timeout`` raises :class:`Unresolvable` (a Refused).
    Deliveries use :class:`Resolver` instead. ``hosts`` caches the outcome
    per (host, port) for the caller's while.
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
    ips = [literal] if literal is not None else addresses_of(_lookup(host, port))
    return checked(ips, allowed)


def checked(ips, allowed: list) -> tuple[IPAddress, ...]:
    """``ips`` if every one may be contacted; else Refused."""
    for ip in ips:  # one bad address refuses the name: rebinding tricks mix them
        check_ip(ip, allowed)
    return tuple(ips)


def addresses_of(infos) -> list[IPAddress]:
    """The distinct addresses of a getaddrinfo answer, in its order; an empty
    answer is Unresolvable."""
    ips: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if ip not in ips:
            ips.append(ip)
    if not ips:
        raise Unresolvable(UNRESOLVABLE)
    return ips


_sync_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_sync_pool_lock = threading.Lock()


def _lookup(host: str, port: int):
    """getaddrinfo for the blocking callers (input validation, the CLI), on a
    thread so that it gives up after ``dns_timeout`` seconds."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="ckanext-webhooks-dns-sync")
    future = _sync_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(settings.dns_timeout())
    except concurrent.futures.TimeoutError:
        raise Unresolvable(UNRESOLVABLE + " in time")
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        raise Unresolvable(UNRESOLVABLE)


class Resolver:
    """Name resolution for deliveries, inside an event loop.

    * Off the loop: ``socket.getaddrinfo`` runs on threads of the resolver's
      own (a test stand-in replaces it at the process level).
    * One lookup per name at a time: every attempt that needs the name waits
      for the lookup in flight, each only until its own timeout
      (``timeout``, and never past the attempt's deadline). A hanging
      resolver holds one thread per name, and delays that name's deliveries
      only.
    * A name whose lookup has timed out recently gets its next lookups on
      two threads of its own (for ``slow_seconds``), so names that hang do
      not take the threads of the others.
    * Positive answers are cached for ``cache_seconds`` (a few seconds: a
      fan-out to many hooks of one host asks once, and changes are seen
      soon); failures are not cached.
    """

    def __init__(self, timeout: float = 5.0, cache_seconds: float = DNS_CACHE_SECONDS,
                 threads: int = 16, slow_seconds: float = 60.0) -> None:
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.slow_seconds = slow_seconds
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="ckanext-webhooks-dns")
        self._slow_pool = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="ckanext-webhooks-dns-slow")
        self._cache: "collections.OrderedDict[str, tuple[float, tuple]]" = \
            collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._slow: dict[str, float] = {}
        # (host, allowed networks) -> (until, checked addresses or the Refused)
        self._verdicts: "collections.OrderedDict[tuple, tuple[float, Any]]" = \
            collections.OrderedDict()

    async def target(self, parsed: tuple[str, str, int, str], allowed: list,
                     deadline: Optional[float] = None, allowed_key: Optional[tuple] = None
                     ) -> Target:
        """The checked Target of a :func:`parse` result. Raises Refused, or
        Unresolvable when the name cannot be resolved by ``deadline``
        (``loop.time()``) or within ``timeout``. ``allowed_key``: ``tuple(allowed)``,
        if the caller has it already."""
        scheme, host, port, path = parsed
        key = (host, tuple(allowed) if allowed_key is None else allowed_key)
        now = asyncio.get_running_loop().time()
        verdict = self._verdicts.get(key)
        if verdict is None or verdict[0] <= now:
            literal = _ip_literal(host)
            ips = (literal,) if literal is not None else \
                await self.addresses(host, port, deadline)
            try:
                found: Any = checked(ips, allowed)
            except Refused as refused:
                found = refused
            # As long as the answer is cached: a fan-out checks each host once.
            verdict = self._verdicts[key] = (now + self.cache_seconds, found)
            while len(self._verdicts) > 4096:
                self._verdicts.popitem(last=False)
        if isinstance(verdict[1], Refused):
            raise type(verdict[1])(*verdict[1].args)  # a fresh one: tracebacks do not pile up
        return Target(scheme, host, port, path, verdict[1])

    async def addresses(self, host: str, port: int, deadline: Optional[float] = None
                        ) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        cached = self._cache.get(host)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[host]
        lookup = self._inflight.get(host)
        if lookup is None:
            pool = self._slow_pool if self._slow.get(host, 0.0) > now else self._pool
            lookup = self._inflight[host] = loop.run_in_executor(
                pool, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
            lookup.add_done_callback(functools.partial(self._looked_up, host))
        wait = self.timeout if deadline is None else min(self.timeout, deadline - now)
        try:
            async with asyncio.timeout(max(0.0, wait)):
                infos = await asyncio.shield(lookup)
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise  # the attempt's deadline, not the resolver's: a timeout
            self._slow[host] = loop.time() + self.slow_seconds
            raise Unresolvable(UNRESOLVABLE + " in time")
        except (OSError, UnicodeError):
            raise Unresolvable(UNRESOLVABLE)
        return tuple(addresses_of(infos))

    def _looked_up(self, host: str, lookup: asyncio.Future) -> None:
        if self._inflight.get(host) is lookup:
            del self._inflight[host]
        if lookup.cancelled() or lookup.exception() is not None:
            return
        try:
            ips = tuple(addresses_of(lookup.result()))
        except (Unresolvable, ValueError):
            return
        now = asyncio.get_running_loop().time()
        self._cache[host] = (now + self.cache_seconds, ips)
        self._cache.move_to_end(host)
        while len(self._cache) > 4096:
            self._cache.popitem(last=False)
        if len(self._slow) > 4096:
            self._slow = {h: t for h, t in self._slow.items() if t > now}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._slow_pool.shutdown(wait=False, cancel_futures=True)
