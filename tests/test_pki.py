"""fedsky's CA: creating and opening it, issuing every kind of certificate, CSRs, the CRL."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.controller.security.pki import (
    CRL_DAYS,
    IssuedCertificate,
    Pki,
    PkiError,
    cert_info,
    write_private_key,
)
from fedsky.shared.ids import InvalidIdError, check_agent_id, is_aggregator_id
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.support import make_csr

AGENT_IDS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True).filter(
    lambda s: s != "controller" and not s.startswith("agg-")
)
# A fixed CA for property tests (function-scoped fixtures and hypothesis do not mix).
_SHARED: dict[str, Pki] = {}


def shared_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if "pki" not in _SHARED:
        _SHARED["pki"] = Pki.init(tmp_path_factory.mktemp("shared") / "pki")
    return _SHARED["pki"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(san.get_values_for_type(x509.DNSName)), {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


# --- the CA itself -------------------------------------------------------------------------


def test_init_creates_a_private_ca(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki", common_name="Test CA")
    assert _mode(pki.directory) == 0o700
    assert _mode(pki.directory / "ca.key") == 0o600
    ca = x509.load_pem_x509_certificate(pki.ca_cert_pem)
    assert pki.ca_cert_path.read_bytes() == pki.ca_cert_pem
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name in ("secp256r1", "secp384r1")
    # An empty CRL exists from the start (the broker needs one), with a next update.
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert len(crl) == 0
    assert crl.is_signature_valid(key)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.now(UTC)


def test_init_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    first = Pki.init(tmp_path / "pki")
    with pytest.raises(PkiError, match="refusing to replace"):
        Pki.init(tmp_path / "pki")
    assert Pki.open(tmp_path / "pki").ca_cert_pem == first.ca_cert_pem
    second = Pki.init(tmp_path / "pki", force=True)
    assert second.ca_cert_pem != first.ca_cert_pem
    assert Pki.open(tmp_path / "pki").ca_cert_pem == second.ca_cert_pem


def test_open_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="run `fedctl ca init`"):
        Pki.open(tmp_path / "nothing-here")


def test_open_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki")
    os.chmod(pki.directory / "ca.key", 0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        Pki.open(pki.directory)


def test_open_detects_a_certificate_of_another_key(tmp_path: Path) -> None:
    a = Pki.init(tmp_path / "a")
    b = Pki.init(tmp_path / "b")
    a.ca_cert_path.write_bytes(b.ca_cert_pem)
    with pytest.raises(PkiError, match="does not belong"):
        Pki.open(a.directory)


def test_private_keys_are_0600_from_creation_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Pki.init(tmp_path / "pki")
        write_private_key(tmp_path / "k.pem", b"-----BEGIN " + b"PRIVATE KEY-----\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "pki" / "ca.key") == 0o600
    assert _mode(tmp_path / "k.pem") == 0o600
    with pytest.raises(PkiError, match="refusing to overwrite"):
        write_private_key(tmp_path / "k.pem", b"x")


# --- issuing -------------------------------------------------------------------------------


def test_agent_certificate_with_a_key_made_here(pki: Pki) -> None:
    issued = pki.issue(common_name="hospital-us", kind="agent", days=30)
    assert issued.key_pem is not None
    assert b"PRIVATE KEY" in issued.key_pem
    cert = _cert(issued)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=hospital-us"
    assert cert.serial_number == issued.serial
    assert cert.not_valid_after_utc == issued.not_after
    assert timedelta(days=29) < issued.not_after - datetime.now(UTC) <= timedelta(days=30)
    assert _ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _sans(cert) == (set(), set())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    info = pki.verify(issued.cert_pem)
    assert (info.common_name, info.serial) == ("hospital-us", issued.serial)


def test_csr_gives_only_its_public_key(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # The request asks for much more than it may have: all of it is ignored.
    _, csr = make_csr(
        "hospital-eu",
        key=key,
        extensions=[
            x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.DNSName("localhost")]),
            x509.BasicConstraints(ca=True, path_length=None),
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]
            ),
        ],
    )
    issued = pki.issue(common_name="hospital-eu", kind="agent", csr_pem=csr)
    assert issued.key_pem is None
    cert = _cert(issued)
    assert cert.public_key() == key.public_key()
    assert _sans(cert) == (set(), set())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_rsa_csr_of_2048_bits_is_accepted_weaker_keys_and_other_types_are_not(pki: Pki) -> None:
    _, ok = make_csr("hospital-a", key=rsa.generate_private_key(65537, key_size=2048))
    cert = _cert(pki.issue(common_name="hospital-a", kind="agent", csr_pem=ok))
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    weak_key = rsa.generate_private_key(65537, key_size=1024)  # noqa: S505 - refused below
    _, weak = make_csr("hospital-a", key=weak_key)
    with pytest.raises(PkiError, match="too weak"):
        pki.issue(common_name="hospital-a", kind="agent", csr_pem=weak)
    _, edwards = make_csr("hospital-a", key=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(PkiError, match="key type"):
        pki.issue(common_name="hospital-a", kind="agent", csr_pem=edwards)


def test_server_certificate_names_and_usage(pki: Pki) -> None:
    issued = pki.issue(
        common_name="fedsky-broker",
        kind="server",
        dns_names=["localhost", "Broker.Example.org"],
        ip_addresses=["127.0.0.1", "::1", "10.0.0.5"],
    )
    cert = _cert(issued)
    assert _sans(cert) == (
        {"localhost", "broker.example.org"},
        {"127.0.0.1", "::1", "10.0.0.5"},
    )
    # Server only: a server certificate must never pass as a bus client.
    assert _ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    # Without names, the CN is the name.
    assert _sans(_cert(pki.issue(common_name="superlink.local", kind="server"))) == (
        {"superlink.local"},
        set(),
    )
    assert _sans(_cert(pki.issue(common_name="10.1.2.3", kind="server")))[1] == {"10.1.2.3"}
    assert _sans(_cert(pki.issue(common_name="::1", kind="server")))[1] == {"::1"}


def test_aggregator_with_names_may_also_serve(pki: Pki) -> None:
    plain = _cert(pki.issue(common_name="agg-job1", kind="aggregator"))
    assert _ekus(plain) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    serving = _cert(
        pki.issue(common_name="agg-job1", kind="aggregator", ip_addresses=["127.0.0.1"])
    )
    assert _ekus(serving) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert _sans(serving) == (set(), {"127.0.0.1"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"common_name": "hospital-a", "kind": "agent", "dns_names": ["x.org"]}, "no host names"),
        ({"common_name": "controller", "kind": "controller", "ip_addresses": ["1.2.3.4"]}, "no "),
        ({"common_name": "s", "kind": "server", "ip_addresses": ["300.1.1.1"]}, "not an IP"),
        ({"common_name": "s", "kind": "server", "dns_names": ["bad_name"]}, "not a valid DNS"),
        ({"common_name": "s", "kind": "server", "dns_names": ["a/b"]}, "not a valid DNS"),
        ({"common_name": "bad name", "kind": "server"}, "server name"),
        ({"common_name": "hospital-a", "kind": "agent", "days": 0}, "out of range"),
        ({"common_name": "hospital-a", "kind": "agent", "days": 100000}, "out of range"),
        ({"common_name": "hospital-a", "kind": "admin"}, "unknown certificate kind"),
        ({"common_name": "hospital-a", "kind": "agent", "csr_pem": b"not a csr"}, "not a PEM"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    pki: Pki, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        pki.issue(**kwargs)  # type: ignore[arg-type]


def test_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki", days=10)
    issued = pki.issue(common_name="hospital-a", kind="agent", days=365)
    assert issued.not_after == pki.ca_not_after


def test_no_key_material_in_logs_or_repr(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issued = pki.issue(common_name="hospital-a", kind="agent")
    assert issued.key_pem is not None
    body = issued.key_pem.decode().splitlines()[1]
    assert "PRIVATE" not in caplog.text
    assert body not in caplog.text
    assert "PRIVATE" not in repr(issued)
    assert body not in repr(issued)
    assert "hospital-a" in caplog.text  # it does log what it issued


def test_verify_refuses_certificates_of_another_ca(pki: Pki, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other", common_name="fedsky CA")
    foreign = other.issue(common_name="hospital-a", kind="agent")
    with pytest.raises(PkiError, match="not issued by this CA"):
        pki.verify(foreign.cert_pem)
    with pytest.raises(PkiError, match="not valid now"):
        pki.verify(
            pki.issue(common_name="hospital-a", kind="agent", days=1).cert_pem,
            at=datetime.now(UTC) + timedelta(days=2),
        )


def test_cert_info(pki: Pki) -> None:
    issued = pki.issue(common_name="hospital-asia", kind="agent")
    info = cert_info(issued.cert_pem)
    assert info.cn == info.common_name == "hospital-asia"
    assert info.serial == issued.serial
    assert info.not_after == issued.not_after
    assert info.not_before < datetime.now(UTC)
    assert "CN=fedsky CA" in info.issuer
    assert len(info.fingerprint_sha256) == 64
    with pytest.raises(PkiError, match="not a PEM"):
        cert_info(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


# --- revocation ----------------------------------------------------------------------------


def test_write_crl_lists_revoked_serials(pki: Pki) -> None:
    a = pki.issue(common_name="hospital-a", kind="agent")
    b = pki.issue(common_name="hospital-b", kind="agent")
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    pki.write_crl([(a.serial, when), (a.serial, when), (b.serial, datetime(2030, 1, 1))])
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(x509.load_pem_x509_certificate(pki.ca_cert_pem).public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {a.serial, b.serial} == pki.revoked_serials()
    entry = crl.get_revoked_certificate_by_serial_number(a.serial)
    assert entry is not None
    assert entry.revocation_date_utc == when
    assert crl.next_update_utc is not None
    assert timedelta(days=CRL_DAYS - 1) < crl.next_update_utc - datetime.now(UTC)
    assert pki.crl_next_update == crl.next_update_utc
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    # The list is the whole truth: an empty list un-lists (the store decides), the number rises.
    pki.write_crl([])
    crl2 = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert len(crl2) == 0
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert _mode(pki.crl_path) == 0o644
    assert [p.name for p in pki.directory.iterdir() if p.name.startswith(".")] == []


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(name=st.text(alphabet="abcz09-_.A /#+", min_size=0, max_size=70))
def test_names_follow_the_id_rules(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    pki = shared_pki(tmp_path_factory)
    try:
        check_agent_id(name)
        agent_ok = True
    except InvalidIdError:
        agent_ok = False
    for kind, allowed in (
        ("agent", agent_ok),
        ("aggregator", is_aggregator_id(name)),
        ("controller", name == "controller"),
    ):
        if allowed:
            issued = pki.issue(common_name=name, kind=kind)  # type: ignore[arg-type]
            assert cert_info(issued.cert_pem).common_name == name
        else:
            with pytest.raises(PkiError):
                pki.issue(common_name=name, kind=kind)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(asked=AGENT_IDS, enrolled=AGENT_IDS)
def test_csr_for_another_name_is_refused(
    tmp_path_factory: pytest.TempPathFactory, asked: str, enrolled: str
) -> None:
    assume(asked != enrolled)
    pki = shared_pki(tmp_path_factory)
    _, csr = make_csr(asked)
    with pytest.raises(PkiError, match="request is for"):
        pki.issue(common_name=enrolled, kind="agent", csr_pem=csr)


_CSR_KEY = ec.generate_private_key(ec.SECP256R1())
_, _CSR_PEM = make_csr("hospital-a", key=_CSR_KEY)
_CSR_DER = x509.load_pem_x509_csr(_CSR_PEM).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [b"-----BEGIN CERTIFICATE REQUEST-----", *lines, b"-----END CERTIFICATE REQUEST-----", b""]
    )


@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(_CSR_DER) - 1), flip=st.integers(1, 255))
def test_tampered_csr_is_refused(
    tmp_path_factory: pytest.TempPathFactory, position: int, flip: int
) -> None:
    """Any change to what the request signs, or to its signature, is refused.

    The one kind of change that can pass leaves both intact: the count of padding bits of the
    signature's BIT STRING, when the signature's last byte ends in zero bits (an encoding detail;
    found by flipping every byte of five requests: 11 of 267,240 changes, all of this kind).
    """
    pki = shared_pki(tmp_path_factory)
    der = bytearray(_CSR_DER)
    der[position] ^= flip
    try:
        pki.issue(common_name="hospital-a", kind="agent", csr_pem=_pem(bytes(der)))
    except PkiError:
        return
    original = x509.load_der_x509_csr(_CSR_DER)
    accepted = x509.load_der_x509_csr(bytes(der))
    assert accepted.tbs_certrequest_bytes == original.tbs_certrequest_bytes
    assert accepted.signature == original.signature


def test_untampered_csr_passes_through_the_same_encoding(pki: Pki) -> None:
    # The property above is only meaningful if the unaltered bytes are accepted.
    issued = pki.issue(common_name="hospital-a", kind="agent", csr_pem=_pem(_CSR_DER))
    assert _cert(issued).public_key() == _CSR_KEY.public_key()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=2048))
def test_garbage_csr_is_refused(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    pki = shared_pki(tmp_path_factory)
    with pytest.raises(PkiError):
        pki.issue(common_name="hospital-a", kind="agent", csr_pem=_pem(data))
