"""A prototype sender on aiohttp, with the interface of
:class:`ckanext.webhooks.sender.Sender` (``submit(requests)`` returns a
``concurrent.futures.Future`` of :class:`Outcome` lists), to measure it against
the hand-written httptools sender (``bench/sender_compare.py``). Not used by
the extension.

What it does as the hand-written sender does:

* its own event loop on its own thread; one ``aiohttp.ClientSession``;
* ``TCPConnector(limit=concurrency, limit_per_host=per_host)``, keep-alive;
* every address parsed by :func:`guard.parse` (odd IPv4 spellings normalised)
  and connected to only at a checked IP: names through :class:`GuardResolver`
  (an aiohttp ``AbstractResolver`` that resolves with :class:`guard.Resolver`,
  off the loop, and returns only the addresses :func:`guard.checked` passed,
  or raises ``Refused``/``Unresolvable``), IP literals (which aiohttp never
  hands to a resolver) checked here before the request;
* ``trust_env=False`` (no proxy from the environment), no cookies,
  ``allow_redirects=False`` (a 3xx is the outcome), no decompression;
* ``ClientTimeout(total=<the rest of the attempt's deadline>,
  sock_connect=connect_timeout)`` plus ``asyncio.timeout_at(deadline)`` around
  the whole attempt (resolution and waiting for a pool slot included);
  ``ClientTimeout.connect`` is not used because aiohttp counts the wait for a
  pool slot in it;
* at most ``max_bytes`` of the body read (``resp.content.read``), a longer
  answer's connection closed, not drained; the head bounded by
  ``max_line_size``/``max_field_size``/``max_headers``;
* Standard Webhooks headers made (:func:`signing.headers`) right before the
  request is handed to aiohttp; header values checked as the hand-written
  sender checks them (``invalid_request``);
* error kinds: ``timeout``, ``connect_error``, ``connection_error``,
  ``tls_error``, ``dns_error``, ``refused_address``, ``invalid_request``,
  ``internal_error``; ``Retry-After`` parsed (seconds or an HTTP date).

What it does not do (the hand-written sender's :class:`_Gates`): the slow
lane, new receivers probed one request at a time, round robin between
waiting receivers, ``free_capacity``/``slow_hosts``. ``gates=True`` puts the
hand-written sender's ``delivery._Gates`` in front of aiohttp's pool (resolving
with :class:`guard.Resolver` first, as the hand-written sender does) to
measure what that policy costs on top of aiohttp.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from urllib.parse import quote

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from ckanext.webhooks import guard, signing
# The same outcome helpers as the hand-written sender: the comparison is of
# the HTTP clients, not of these.
from ckanext.webhooks.sender import Outcome, Request, _done, _retry_after

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16384
_TARGET_OK = re.compile(r"[\x21-\x7e]+")
_NAME_OK = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_OK = re.compile(r"[\t\x20-\x7e]*")

# The allowed networks of the attempt being resolved (the resolver is shared).
_allowed: contextvars.ContextVar[tuple[list, tuple]] = contextvars.ContextVar("allowed")


class _NoTimeout:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


_NO_TIMEOUT = _NoTimeout()


class _Invalid(Exception):
    pass


class GuardResolver(AbstractResolver):
    """Resolves through :class:`guard.Resolver` (off the loop, one lookup per
    name at a time, its own timeout) and returns only checked addresses."""

    def __init__(self, resolver: guard.Resolver, default_allowed: list) -> None:
        self._resolver = resolver
        self._default = (default_allowed, tuple(default_allowed))

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[dict]:
        allowed, key = _allowed.get(self._default)
        # Raises guard.Refused / guard.Unresolvable (not OSError: aiohttp lets
        # them through unwrapped, the attempt maps them).
        target = await self._resolver.target(("http", host, port, "/"), allowed, None, key)
        return [{"hostname": host, "host": str(ip), "port": port,
                 "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}
                for ip in target.addresses]

    async def close(self) -> None:
        pass


class AiohttpSender:
    """Sends deliveries with aiohttp; one per process, safe to call from any thread."""

    def __init__(self, connect_timeout: float = 5.0, total_timeout: float = 15.0,
                 max_bytes: int = 20480, concurrency: int = 64, per_host: int = 16,
                 dns_timeout: float = 5.0, allowed_networks: list | None = None,
                 gates: bool = False, slow_after: float = 2.0, slow_lane_seconds: float = 60.0,
                 slow_lane_concurrency: int = 16, slow_lane_per_host: int = 2,
                 dns_cache_seconds: int = 5) -> None:
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.per_host = per_host
        self.allowed_networks = allowed_networks
        self._guard_resolver = guard.Resolver(timeout=dns_timeout, slow_seconds=slow_lane_seconds)
        self._gates = None
        if gates:
            from ckanext.webhooks.sender import _Gates
            self._gates = _Gates(concurrency, per_host, slow_lane_concurrency,
                                 slow_lane_per_host, slow_after, slow_lane_seconds)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="ckanext-webhooks-aiohttp-sender")
        self._thread.start()
        self._session: aiohttp.ClientSession = asyncio.run_coroutine_threadsafe(
            self._open(dns_cache_seconds), self._loop).result()

    @classmethod
    def from_config(cls, **overrides) -> AiohttpSender:
        from ckan.plugins import toolkit

        def setting(key: str, default, kind=float):
            value = toolkit.config.get(f"ckanext.webhooks.{key}")
            return default if value in (None, "") else kind(value)
        options = {
            "connect_timeout": setting("connect_timeout", 5.0),
            "total_timeout": setting("timeout", 15.0),
            "max_bytes": setting("max_response_bytes", 20480, int),
            "concurrency": setting("concurrency", 64, int),
            "per_host": setting("connections_per_host", 16, int),
            "dns_timeout": setting("dns_timeout", 5.0),
            "slow_after": setting("slow_after", 2.0),
            "slow_lane_seconds": setting("slow_lane_seconds", 60.0),
            "slow_lane_concurrency": setting("slow_lane_concurrency", 16, int),
            "slow_lane_per_host": setting("slow_lane_per_host", 2, int)}
        options.update(overrides)
        return cls(**options)

    async def _open(self, dns_cache_seconds: int) -> aiohttp.ClientSession:
        import certifi
        # The checks run per attempt (the contextvar); aiohttp caches the
        # checked answer per (host, port) for dns_cache_seconds, as
        # guard.Resolver caches its verdicts.
        connector = aiohttp.TCPConnector(
            limit=self.concurrency, limit_per_host=self.per_host,
            resolver=GuardResolver(self._guard_resolver, list(self.allowed_networks or [])),
            use_dns_cache=True, ttl_dns_cache=dns_cache_seconds,
            ssl=ssl.create_default_context(cafile=certifi.where()))
        return aiohttp.ClientSession(
            connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            max_line_size=MAX_HEAD_BYTES, max_field_size=MAX_HEAD_BYTES, max_headers=100,
            timeout=aiohttp.ClientTimeout(total=self.total_timeout,
                                          sock_connect=self.connect_timeout))

    # --- the API of delivery.Sender -------------------------------------------

    def post(self, request, body: bytes = b"", headers: dict[str, str] | None = None
             ) -> Outcome:
        if not isinstance(request, Request):
            request = Request(request, body, headers=headers)
        return self.post_many([request])[0]

    def post_many(self, requests: Iterable) -> list[Outcome]:
        return self.submit(requests).result()

    def submit(self, requests: Iterable, allowed: list | None = None
               ) -> concurrent.futures.Future[list[Outcome]]:
        started = time.monotonic()
        items: list = []
        for item in requests:
            try:
                request = item if isinstance(item, Request) else Request(
                    item[0], item[1], headers=item[2])
                parsed = request.address if isinstance(request.address, guard.Target) \
                    else guard.parse(request.address)
                items.append((request, parsed, None))
            except guard.Refused:
                items.append((item, None, Outcome(None, "refused_address", 0.0)))
            except Exception:
                log.exception("could not prepare a request")
                items.append((item, None, Outcome(None, "internal_error", 0.0)))
        if allowed is None:
            allowed = self.allowed_networks
        if allowed is None and any(isinstance(p, tuple) for _, p, _ in items):
            allowed = guard.allowed_networks()
        allowed = list(allowed or [])
        return asyncio.run_coroutine_threadsafe(
            self._post_many(items, (allowed, tuple(allowed)), started), self._loop)

    def free_capacity(self) -> int:
        return self.concurrency  # aiohttp does not say; the prototype does not need it

    def slow_hosts(self) -> frozenset[str]:
        return frozenset()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._guard_resolver.close()

    # --- inside the event loop ---------------------------------------------------

    async def _post_many(self, items: list, allowed: tuple[list, tuple], started: float
                         ) -> list[Outcome]:
        _allowed.set(allowed)  # copied into each attempt's task
        deadline = started + self.total_timeout
        return await asyncio.gather(*(
            self._attempt(request, parsed, allowed, started, deadline) if early is None
            else _done(early) for request, parsed, early in items))

    async def _attempt(self, request: Request, parsed, allowed: tuple[list, tuple],
                       started: float, deadline: float) -> Outcome:
        slot, outcome = None, None
        try:
            # With gates, a wait outside aiohttp: the deadline around it all.
            # Without, aiohttp's total timeout (the rest of the deadline)
            # covers resolving, the pool, connecting, sending and reading.
            async with (asyncio.timeout_at(deadline) if self._gates is not None
                        else _NO_TIMEOUT):
                if isinstance(parsed, guard.Target):
                    scheme, host, port, path = parsed.scheme, parsed.host, parsed.port, parsed.path
                    first_ip = parsed.addresses[0]
                else:
                    scheme, host, port, path = parsed
                    first_ip = None
                literal = _literal(host)
                if literal is not None:
                    guard.checked((literal,), allowed[0])  # aiohttp skips resolvers for these
                    first_ip = literal
                url = _url(scheme, host, port, path)
                headers = dict(request.headers or {})
                if request.event_id is not None:
                    signing.check_secrets(request.secrets)
                if not all(_NAME_OK.fullmatch(n) and _VALUE_OK.fullmatch(v)
                           for n, v in headers.items()) or (
                        request.event_id is not None
                        and not _VALUE_OK.fullmatch(request.event_id)):
                    raise _Invalid()
                if self._gates is not None:
                    if first_ip is None:  # as the hand-written sender: resolve, then queue
                        first_ip = (await self._guard_resolver.target(
                            parsed, allowed[0], deadline, allowed[1])).addresses[0]
                    slot = await self._gates.acquire((first_ip, port), host, request.health)
                status, body, retry_after = await self._exchange(url, request, headers, deadline)
            outcome = Outcome(status, None, time.monotonic() - started, body,
                              _retry_after(retry_after))
        except TimeoutError:  # aiohttp's timeouts are these too
            outcome = Outcome(None, "timeout", time.monotonic() - started)
        except guard.Unresolvable:
            outcome = Outcome(None, "dns_error", time.monotonic() - started)
        except guard.Refused:
            outcome = Outcome(None, "refused_address", time.monotonic() - started)
        except _Invalid:
            outcome = Outcome(None, "invalid_request", time.monotonic() - started)
        except aiohttp.ClientConnectorDNSError:
            outcome = Outcome(None, "dns_error", time.monotonic() - started)
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch):
            outcome = Outcome(None, "tls_error", time.monotonic() - started)
        except aiohttp.ClientConnectorError:
            outcome = Outcome(None, "connect_error", time.monotonic() - started)
        except (aiohttp.ClientError, ssl.SSLError, OSError):
            outcome = Outcome(None, "connection_error", time.monotonic() - started)
        except Exception:
            log.exception("delivery attempt failed unexpectedly")
            outcome = Outcome(None, "internal_error", time.monotonic() - started)
        finally:
            if slot is not None:
                self._gates.release(slot, outcome)
        return outcome

    async def _exchange(self, url: URL, request: Request, headers: dict, deadline: float):
        for again in (True, False):
            if request.event_id is not None:  # signed now: the timestamp is the sending time
                headers.update(signing.headers(request.event_id, request.body,
                                               request.secrets))
            timeout = aiohttp.ClientTimeout(
                total=max(0.001, deadline - self._loop.time()),
                sock_connect=self.connect_timeout)
            try:
                async with self._session.post(url, data=request.body, headers=headers,
                                              allow_redirects=False, timeout=timeout) as resp:
                    body = await self._read_capped(resp)
                    return resp.status, body, resp.headers.get("Retry-After")
            except aiohttp.ServerDisconnectedError:
                # POST is not retried by aiohttp: a receiver that closed an idle
                # keep-alive connection gets the request once more, as the
                # hand-written sender does (it cannot tell a fresh connection apart).
                if not again:
                    raise
        raise AssertionError("unreachable")

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.max_bytes + 1
        chunks, size = [], 0
        while size < limit:
            chunk = await resp.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > self.max_bytes:
            resp.close()  # never drain a hostile answer
        return b"".join(chunks)[: self.max_bytes]


def _literal(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _url(scheme: str, host: str, port: int, path: str) -> URL:
    if not path.isascii():
        path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    if not _TARGET_OK.fullmatch(path):
        raise _Invalid()
    path, _, query = path.partition("?")
    return URL.build(scheme=scheme, host=host, port=port, path=path, query_string=query,
                     encoded=True)
