"""https receivers: certificates and host names are verified.

The test makes its own certificate authorities and certificates
(``cryptography``) and runs TLS receivers on 127.0.0.2. The sender trusts the
test CA through ``ckanext.webhooks.ca_bundle`` (the ``ca_bundle`` option);
names under ``.dns-standin`` resolve to 127.0.0.2 through the suite's DNS
stand-in (``tests/dns_standin.py``). Nothing leaves 127.0.0.0/8.
"""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ckanext.webhooks import settings
from ckanext.webhooks.sender import Sender

from . import dns_standin as dns
from .test_delivery import ALLOWED, RawServer, _read_request
from .waiting import until

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
RECEIVER_IP = "127.0.0.2"


# --- a small PKI, made here -------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Authority:
    """A certificate authority: a self-signed CA certificate and its key."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, directory: Path, dns_names=(), ips=(), expired: bool = False
              ) -> tuple[Path, Path]:
        """A server certificate for ``dns_names`` and ``ips`` (its SANs):
        (certificate, key) PEM files in ``directory``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in dns_names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        first = (list(dns_names) + list(ips))[0]
        begins = _now() - datetime.timedelta(days=10 if expired else 1)
        ends = _now() - datetime.timedelta(days=1) if expired else \
            _now() + datetime.timedelta(days=7)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begins).not_valid_after(ends)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        stem = directory / f"server-{x509.random_serial_number():x}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The test CA (its bundle is what the sender trusts) and an untrusted one."""
    directory = tmp_path_factory.mktemp("tls")
    trusted, untrusted = Authority("webhooks test CA"), Authority("some other CA")
    bundle = directory / "test-ca.pem"
    bundle.write_bytes(trusted.pem())
    return directory, trusted, untrusted, bundle


class TLSReceiver:
    """An https receiver on 127.0.0.2 with the given certificate: it records
    the SNI of each handshake, failed handshakes, and every request it read
    (each answered 200, keep-alive)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.server_names: list = []
        self.context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
        self.failed_handshakes: list = []
        self.requests: list[bytes] = []
        self.raw = RawServer(self._serve)
        self.port = self.raw.port

    def _serve(self, conn) -> None:
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError as error:  # ssl.SSLError included: the client gave up on us
            self.failed_handshakes.append(error)
            return
        with tls:
            while True:
                data = _read_request(tls)
                if not data:
                    return
                self.requests.append(data)
                tls.sendall(OK)

    @property
    def connections(self) -> int:
        return self.raw.connections

    def url(self, host: str = RECEIVER_IP, path: str = "/hook") -> str:
        return f"https://{host}:{self.port}{path}"

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def tls_receiver(pki):
    """make(authority, dns_names=(), ips=(), expired=False): a running receiver."""
    directory = pki[0]
    made = []

    def make(authority, dns_names=(), ips=(), expired=False):
        made.append(TLSReceiver(*authority.issue(directory, dns_names, ips, expired)))
        return made[-1]
    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def sender(pki):
    """make(**options): a Sender that may reach 127.0.0.2 and trusts the test CA
    unless told otherwise (``ca_bundle=None``: certifi's bundle)."""
    made = []

    def make(**options):
        options.setdefault("ca_bundle", str(pki[3]))
        made.append(Sender(total_timeout=5, allowed_networks=ALLOWED, **options))
        return made[-1]
    yield make
    for one in made:
        one.close()


def _standin_name(label: str) -> str:
    name = dns.name(label)
    dns.answer(name, RECEIVER_IP)
    return name


def _assert_tls_error(post, receiver: TLSReceiver) -> None:
    """``post()`` makes one attempt: it ends as a ``tls_error`` in a handshake
    the receiver saw fail."""
    failed_before = len(receiver.failed_handshakes)
    outcome = post()
    assert (outcome.status, outcome.error, outcome.body, outcome.sent) == \
        (None, "tls_error", b"", False)
    # The receiver was reached, and the sender refused it in the handshake (the
    # receiver learns of it from the sender's alert, in its own thread).
    until(lambda: len(receiver.failed_handshakes) > failed_before, 10,
          "the receiver to see this attempt's handshake fail", interval=0.01)
    assert receiver.requests == []  # nothing was read, so nothing was answered


# --- (a) a certificate from the trusted CA, for the right name: accepted --------------

def test_certificate_for_the_host_name_is_accepted(pki, tls_receiver, sender):
    """By name: the name resolves (DNS stand-in) to 127.0.0.2, the handshake
    carries it as SNI and the certificate is checked against it; the
    connection is kept alive over TLS."""
    _, trusted, _, _ = pki
    name = _standin_name("tls-ok")
    receiver = tls_receiver(trusted, dns_names=[name])
    one = sender()
    first, second = one.post(receiver.url(name), b"{}"), one.post(receiver.url(name), b"{}")
    assert (first.status, first.body) == (200, b"ok") == (second.status, second.body)
    assert receiver.server_names == [name]
    assert len(receiver.requests) == 2 and receiver.connections == 1
    assert receiver.requests[0].startswith(b"POST /hook HTTP/1.1\r\n")
    assert f"Host: {name}:{receiver.port}".encode() in receiver.requests[0]


def test_certificate_for_the_ip_address_is_accepted(pki, tls_receiver, sender):
    """By address: a literal https://127.0.0.2 is checked against the
    certificate's IP address SAN."""
    _, trusted, _, _ = pki
    receiver = tls_receiver(trusted, ips=[RECEIVER_IP])
    outcome = sender().post(receiver.url(), b"{}")
    assert (outcome.status, outcome.body, outcome.error) == (200, b"ok", None)
    assert receiver.server_names == [None]  # no SNI for an address
    assert len(receiver.requests) == 1


# --- (b), (c): an untrusted, wrong-name or expired certificate fails the attempt -----

@pytest.mark.parametrize("case", ["untrusted-ca", "expired"])
def test_certificate_that_does_not_verify_fails_the_attempt(pki, tls_receiver, sender, case):
    """Valid for both the name and the address, but signed by a CA the sender
    does not trust, or expired: ``tls_error``, nothing sent, either way in."""
    _, trusted, untrusted, _ = pki
    name = _standin_name("tls-bad")
    receiver = tls_receiver(untrusted if case == "untrusted-ca" else trusted,
                            dns_names=[name], ips=[RECEIVER_IP], expired=case == "expired")
    one = sender()
    for host in (name, RECEIVER_IP):
        _assert_tls_error(lambda: one.post(receiver.url(host), b"{}"), receiver)


@pytest.mark.parametrize("case", ["other-name", "other-ip", "name-only-by-ip",
                                  "ip-only-by-name"])
def test_certificate_for_another_name_fails_the_attempt(pki, tls_receiver, sender, case):
    """A certificate from the trusted CA that is valid for a different name
    or address than the one the hook points at: ``tls_error``."""
    _, trusted, _, _ = pki
    name = _standin_name("tls-name")
    other = dns.name("somebody-else")  # never resolved: only in the certificate
    cert_for, host = {
        "other-name": (dict(dns_names=[other]), name),
        "other-ip": (dict(ips=["127.0.0.3"]), RECEIVER_IP),
        "name-only-by-ip": (dict(dns_names=[name]), RECEIVER_IP),
        "ip-only-by-name": (dict(ips=[RECEIVER_IP]), name),
    }[case]
    receiver = tls_receiver(trusted, **cert_for)
    one = sender()
    _assert_tls_error(lambda: one.post(receiver.url(host), b"{}"), receiver)


# --- (d) the default bundle does not know the test CA -----------------------------------

def test_default_bundle_does_not_trust_the_test_ca(pki, tls_receiver, sender):
    """Without ``ca_bundle`` certifi's bundle is used: the test CA is unknown
    there, so a certificate that the configured bundle accepts fails."""
    _, trusted, _, _ = pki
    name = _standin_name("tls-default")
    receiver = tls_receiver(trusted, dns_names=[name], ips=[RECEIVER_IP])
    plain = sender(ca_bundle=None)
    assert plain.ca_bundle is None
    _assert_tls_error(lambda: plain.post(receiver.url(name), b"{}"), receiver)
    assert sender().post(receiver.url(name), b"{}").status == 200  # the same, trusted


def test_a_missing_or_empty_bundle_fails_when_the_sender_is_made(pki, tmp_path):
    """A wrong ``ca_bundle`` is a configuration error raised at start-up, not
    a failure of every https attempt."""
    with pytest.raises(FileNotFoundError):
        Sender(ca_bundle=str(tmp_path / "no-such-bundle.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ssl.SSLError):
        Sender(ca_bundle=str(empty))


# --- the setting ----------------------------------------------------------------------------

def test_ca_bundle_setting_defaults_to_certifi(ckan_config, monkeypatch):
    monkeypatch.delitem(ckan_config, "ckanext.webhooks.ca_bundle", raising=False)
    assert settings.ca_bundle() is None
    monkeypatch.setitem(ckan_config, "ckanext.webhooks.ca_bundle", "  ")
    assert settings.ca_bundle() is None
    default = Sender.from_config()
    try:
        assert default.ca_bundle is None
        assert default._ssl_context().check_hostname
        assert default._ssl_context().verify_mode == ssl.CERT_REQUIRED
        assert default._ssl_context().minimum_version >= ssl.TLSVersion.TLSv1_2
    finally:
        default.close()


def test_from_config_uses_the_ca_bundle_setting(pki, tls_receiver, ckan_config, monkeypatch):
    """``ckanext.webhooks.ca_bundle`` in the CKAN config reaches the sender
    made by ``Sender.from_config`` (the workers' and the web process's)."""
    _, trusted, _, bundle = pki
    name = _standin_name("tls-config")
    receiver = tls_receiver(trusted, dns_names=[name])
    monkeypatch.setitem(ckan_config, "ckanext.webhooks.ca_bundle", str(bundle))
    assert settings.ca_bundle() == str(bundle)
    configured = Sender.from_config(allowed_networks=ALLOWED)
    try:
        assert configured.ca_bundle == str(bundle)
        outcome = configured.post(receiver.url(name), b"{}")
        assert (outcome.status, outcome.body) == (200, b"ok")
    finally:
        configured.close()
    monkeypatch.delitem(ckan_config, "ckanext.webhooks.ca_bundle")
    unconfigured = Sender.from_config(allowed_networks=ALLOWED)
    try:
        assert unconfigured.post(receiver.url(name), b"{}").error == "tls_error"
    finally:
        unconfigured.close()
