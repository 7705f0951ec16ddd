"""SSRF guard: refusals happen before any connection (literals need no DNS;
the only name used, localhost, resolves from /etc/hosts)."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from ckanext.webhooks import guard

ALLOW_TEST_RECEIVER = [ipaddress.ip_network("127.0.0.2/32")]

REFUSED = [
    "http://127.0.0.1/", "http://127.0.0.1:8080/x", "http://localhost/",
    "http://2130706433/", "http://0x7f.1/", "http://0x7f000001/", "http://017700000001/",
    "http://127.1/", "http://0177.0.0.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/", "http://[0:0:0:0:0:ffff:127.0.0.1]/", "http://[::127.0.0.1]/",
    "http://0.0.0.0/", "http://0/", "http://10.0.0.1/", "http://172.16.5.4/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://255.255.255.255/", "http://198.18.0.1/", "http://192.0.2.1/",
    "http://[fc00::1]/", "http://[fd12:3456::1]/", "http://[fe80::1]/",
    "http://[64:ff9b::a00:1]/", "http://[64:ff9b::127.0.0.1]/", "http://[2002:7f00:1::]/",
    "http://[2002:a00:1::1]/", "http://[ff02::1]/", "http://[::]/",
    "http://127.0.0.2.nip.invalid@127.0.0.1/",
]


@pytest.mark.parametrize("address", REFUSED)
def test_refused_before_any_connection(address, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the guard tried to connect")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(guard.Refused):
        guard.resolve(address, ALLOW_TEST_RECEIVER)


@pytest.mark.parametrize("address", [
    "ftp://127.0.0.2/", "file:///etc/passwd", "gopher://127.0.0.2:70/", "//127.0.0.2/",
    "http://user:pass@127.0.0.2/", "http://127.0.0.2/#frag", "http://127.0.0.2:0/",
    "http://exa mple.test/", "http://\u00e9\u0301\u0000.test/", "http:///x",
])
def test_malformed_addresses_are_refused(address):
    with pytest.raises(guard.Refused):
        guard.resolve(address, ALLOW_TEST_RECEIVER)


def test_allowed_network_is_the_only_exception():
    target = guard.resolve("http://127.0.0.2:9000/cb?x=1", ALLOW_TEST_RECEIVER)
    assert target.addresses == (ipaddress.ip_address("127.0.0.2"),)
    assert target.path == "/cb?x=1" and target.host_header == "127.0.0.2:9000"
    with pytest.raises(guard.Refused):
        guard.resolve("http://127.0.0.2:9000/cb", [])


def test_odd_spellings_are_normalised():
    assert guard.parse("HTTP://0X7F.2/a")[1] == "127.0.0.2"
    assert guard.parse("http://2130706434/")[1] == "127.0.0.2"
    assert guard.parse("http://[::FFFF:7F00:2]/")[1] == "::ffff:7f00:2"


def test_public_addresses_pass_the_check_without_resolving():
    # Literals are checked without DNS and nothing is contacted here.
    for literal in ("8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        guard.check_ip(ipaddress.ip_address(literal))


def test_one_lookup_per_attempt_and_any_bad_answer_refuses(monkeypatch):
    """DNS rebinding: the name is resolved once, every answer is checked, and
    the connection goes to a checked address (the sender never resolves)."""
    calls = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        answers = ["127.0.0.2", "127.0.0.1"] if host == "rebind.dns-standin" else ["127.0.0.2"]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers]
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(guard.Refused):
        guard.resolve("http://rebind.dns-standin/", ALLOW_TEST_RECEIVER)
    target = guard.resolve("http://receiver.dns-standin:9999/", ALLOW_TEST_RECEIVER)
    assert target.addresses == (ipaddress.ip_address("127.0.0.2"),)
    assert target.host_header == "receiver.dns-standin:9999"
    assert calls == ["rebind.dns-standin", "receiver.dns-standin"]


def test_https_only(monkeypatch):
    from ckan.plugins import toolkit
    monkeypatch.setitem(toolkit.config, "ckanext.webhooks.https_only", "true")
    with pytest.raises(guard.Refused, match="https"):
        guard.parse("http://127.0.0.2/")
    assert guard.parse("https://127.0.0.2/")[0] == "https"


def test_a_name_that_does_not_resolve_is_unresolvable(monkeypatch):
    """Input validation: a name that fails to resolve, or does not resolve in
    ``dns_timeout``, is refused as Unresolvable (a Refused), not hung on.
    Names answered by the test DNS stand-in (tests/netguard/sitecustomize.py)."""
    from ckan.plugins import toolkit

    from . import dns_standin as dns
    monkeypatch.setitem(toolkit.config, "ckanext.webhooks.dns_timeout", "0.5")
    down, hangs = dns.name("down"), dns.name("hangs")
    dns.fail(down, "EAI_NONAME")
    dns.hang(hangs)
    try:
        with pytest.raises(guard.Unresolvable, match="could not be resolved"):
            guard.resolve(f"http://{down}/", ALLOW_TEST_RECEIVER)
        with pytest.raises(guard.Unresolvable, match="in time"):
            guard.resolve(f"http://{hangs}/", ALLOW_TEST_RECEIVER)
        assert issubclass(guard.Unresolvable, guard.Refused)
    finally:
        dns.answer(hangs, "127.0.0.2")
