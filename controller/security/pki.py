"""fedsky's certificate authority: one code path issues every certificate in the system.

The CA lives in one directory (0700): `ca.key` (0600), `ca.crt` and `crl.pem`. Agents,
aggregators, the controller and servers (the broker, Flower's SuperLink) all get their
certificates from `Pki.issue`. What was issued and what is revoked is recorded by the caller
(the controller's store); this module only turns keys, requests and serial lists into files.

Private keys are written 0600 from the moment the file exists, and never logged.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.shared.files import atomic_write
from fedsky.shared.ids import (
    CONTROLLER_ID,
    NODE_SUFFIX,
    InvalidIdError,
    check_agent_id,
    is_aggregator_id,
    is_node_name,
    node_name,
)

log = logging.getLogger(__name__)

CertKind = Literal["agent", "controller", "aggregator", "server", "node"]

CERT_KINDS: tuple[CertKind, ...] = get_args(CertKind)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CRL_FILE = "crl.pem"

CA_DAYS = 3650
MAX_LEAF_DAYS = 3650
# Mosquitto (OpenSSL) refuses every client once the CRL's next_update has passed, and reads the
# CRL only at start: a long window, renewed by the controller well before it ends.
CRL_DAYS = 365
# Tolerate clocks a little behind ours on the other machines.
_BACKDATE = timedelta(minutes=5)
_MAX_PEM = 64 * 1024

_SERVER_CN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class PkiError(ValueError):
    """The CA cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: bytes
    key_pem: bytes | None  # only when the PKI made the key (no CSR was given)
    serial: int
    not_after: datetime
    common_name: str
    kind: CertKind

    def __repr__(self) -> str:  # keep key material out of logs and tracebacks
        return (
            f"IssuedCertificate(common_name={self.common_name!r}, kind={self.kind!r}, "
            f"serial={self.serial}, not_after={self.not_after.isoformat()}, "
            f"key_pem={'<set>' if self.key_pem else None})"
        )


@dataclass(frozen=True)
class CertInfo:
    common_name: str
    serial: int
    not_before: datetime
    not_after: datetime
    issuer: str  # RFC 4514, e.g. "CN=fedsky CA,O=fedsky"
    fingerprint_sha256: str  # hex

    @property
    def cn(self) -> str:
        return self.common_name


def cert_info(pem: bytes) -> CertInfo:
    """What a person (or a check) needs to know about a PEM certificate."""
    cert = _load_cert(pem, what="certificate")
    return _info(cert)


def _info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        common_name=_common_name(cert.subject) or "",
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issuer=cert.issuer.rfc4514_string(),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def _load_cert(pem: bytes, *, what: str) -> x509.Certificate:
    if len(pem) > _MAX_PEM:
        raise PkiError(f"the {what} is too large to be a PEM certificate")
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm):
        raise PkiError(f"the {what} is not a PEM X.509 certificate") from None


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh key for a leaf certificate (EC P-256: small, fast, every TLS stack speaks it)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key_pem: bytes, *, overwrite: bool = False) -> None:
    """Write a private key 0600 from its creation on, atomically.

    The temporary file is created with mode 0600 (never wider, whatever the umask) and renamed
    over `path`, so no reader ever sees a partial or world-readable key.
    """
    if path.exists() and not overwrite:
        raise PkiError(f"{path} already exists; refusing to overwrite a private key")
    atomic_write(path, key_pem, mode=0o600)


def _parse_san(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in dns_names:
        lowered = name.lower().rstrip(".")
        if len(lowered) > 253 or not all(_DNS_LABEL_RE.match(p) for p in lowered.split(".")):
            raise PkiError(f"{name!r} is not a valid DNS name for a certificate")
        if lowered not in seen:
            seen.add(lowered)
            names.append(x509.DNSName(lowered))
    for addr in ip_addresses:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise PkiError(f"{addr!r} is not an IP address") from None
        if str(ip) not in seen:
            seen.add(str(ip))
            names.append(x509.IPAddress(ip))
    return names


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_name(common_name: str, kind: str) -> None:
    if kind not in CERT_KINDS:
        raise PkiError(
            f"unknown certificate kind {kind!r}: expected one of {', '.join(CERT_KINDS)}"
        )
    if kind == "agent":
        try:
            check_agent_id(common_name)
        except InvalidIdError as exc:
            raise PkiError(str(exc)) from None
    elif kind == "aggregator":
        if not is_aggregator_id(common_name):
            raise PkiError(
                f"aggregator name {common_name!r} is invalid: aggregators are 'agg-' followed by "
                "a-z, 0-9 and '-' (63 characters at most)"
            )
    elif kind == "node" and not is_node_name(common_name):
        raise PkiError(f"node name {common_name!r} is not an agent id and {NODE_SUFFIX!r}")
    elif kind == "controller":
        if common_name != CONTROLLER_ID:
            raise PkiError(f"the controller's certificate must have the name {CONTROLLER_ID!r}")
    elif not (_SERVER_CN_RE.fullmatch(common_name) or _is_ip(common_name)):
        raise PkiError(
            f"server name {common_name!r} is invalid: "
            "use 1-64 characters from A-Z, a-z, 0-9, '.' and '-'"
        )


def _public_key_from_csr(
    csr_pem: bytes, common_name: str
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """Check a certificate request and return only its public key.

    The requested subject and extensions are ignored: the CA decides names and usages.
    """
    if len(csr_pem) > _MAX_PEM:
        raise PkiError("the certificate request is too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm):
        raise PkiError("the certificate request is not a PEM PKCS#10 request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise PkiError(
            "the certificate request's signature does not verify: it was altered or corrupted"
        )
    requested = _common_name(csr.subject)
    if requested != common_name:
        raise PkiError(
            f"the certificate request is for {requested!r}, not {common_name!r}: "
            "make the request with the name being enrolled"
        )
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError("the certificate request's public key cannot be read") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise PkiError(f"EC curve {key.curve.name} is not accepted: use P-256, P-384 or P-521")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"an RSA key of {key.key_size} bits is too weak: use at least 2048")
        return key
    raise PkiError("the certificate request's key type is not accepted: use EC (P-256) or RSA")


class Pki:
    """fedsky's CA over one directory. Create with `Pki.init`, load with `Pki.open`."""

    def __init__(
        self, directory: Path, *, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> None:
        self._dir = directory
        self._key = key
        self._cert = cert
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    def __repr__(self) -> str:
        return f"Pki(directory={str(self._dir)!r})"

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        common_name: str = "fedsky CA",
        force: bool = False,
        days: int = CA_DAYS,
    ) -> Pki:
        """Create a new CA (EC P-384) in `directory`; refuse to replace one unless `force`."""
        directory = Path(directory)
        if not common_name.strip() or len(common_name) > 64:
            raise PkiError("the CA's name must be 1-64 characters")
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if not force and (key_path.exists() or cert_path.exists()):
            raise PkiError(
                f"{directory} already holds a CA; refusing to replace it. Replacing it (--force) "
                "invalidates every certificate it issued: every agent must enrol again."
            )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        now = datetime.now(UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsky"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA384())
        )
        # Key first: a crash between the two writes leaves a pair that `open` reports as mismatched.
        atomic_write(key_path, private_key_pem(key), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        pki = cls(directory, key=key, cert=cert)
        # An empty CRL from the start: the broker needs one to start.
        pki.write_crl(())
        log.info("created CA %r in %s", common_name, directory)
        return pki

    @classmethod
    def open(cls, directory: Path) -> Pki:
        """Load the CA in `directory`."""
        directory = Path(directory)
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if not key_path.is_file() or not cert_path.is_file():
            raise PkiError(f"no fedsky CA in {directory}: run `fedctl ca init` first")
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PkiError(
                f"{key_path} is readable by others (mode {mode:04o}): run `chmod 600 {key_path}`"
            )
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise PkiError(f"{key_path} is not an unencrypted PEM private key") from None
        except OSError as exc:
            raise PkiError(f"cannot read {key_path}: {exc.strerror}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path} is not an EC key: it was not made by `fedctl ca init`")
        cert = _load_cert(cert_path.read_bytes(), what=str(cert_path))
        if cert.public_key() != key.public_key():
            raise PkiError(
                f"{cert_path} does not belong to {key_path}: run `fedctl ca init --force`"
            )
        return cls(directory, key=key, cert=cert)

    # --- where things are -----------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def ca_cert_path(self) -> Path:
        return self._dir / CA_CERT_FILE

    @property
    def crl_path(self) -> Path:
        return self._dir / CRL_FILE

    @property
    def controller_identity(self) -> tuple[Path, Path]:
        """The controller's own client certificate and key (the daemon makes them at start): its
        name on the bus and, at an aggregator's front, the only one served the Control API."""
        return self._dir / "controller.crt", self._dir / "controller.key"

    @property
    def ca_cert_pem(self) -> bytes:
        return self._cert_pem

    @property
    def ca_not_after(self) -> datetime:
        return self._cert.not_valid_after_utc

    # --- issuing --------------------------------------------------------------------------

    def issue_node(
        self, agent_id: str, public_key_openssh: str, *, days: int = 30
    ) -> IssuedCertificate:
        """A SuperNode's TLS client certificate (`<agent>.node`) over its OpenSSH node key."""
        try:
            key = serialization.load_ssh_public_key(public_key_openssh.strip().encode())
        except (ValueError, UnsupportedAlgorithm):
            raise PkiError(f"the node key of {agent_id} is not an OpenSSH public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PkiError(f"the node key of {agent_id} is not an EC key")
        try:
            name = node_name(agent_id)
        except InvalidIdError as exc:
            raise PkiError(str(exc)) from None
        return self.issue(common_name=name, kind="node", public_key=key, days=days)

    def write_controller_identity(self) -> IssuedCertificate:
        """Issue the controller's client certificate and write it with its key (0600) where
        `controller_identity` says."""
        issued = self.issue(common_name=CONTROLLER_ID, kind="controller")
        assert issued.key_pem is not None
        cert_path, key_path = self.controller_identity
        atomic_write(key_path, issued.key_pem, mode=0o600)
        atomic_write(cert_path, issued.cert_pem, mode=0o644)
        return issued

    def issue(
        self,
        *,
        common_name: str,
        kind: CertKind,
        csr_pem: bytes | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        days: int = 365,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> IssuedCertificate:
        """Sign a certificate for `common_name`; make its key too when neither a CSR nor a
        public key is given (`node` certificates take the SuperNode's registered node key).

        Usages follow the kind: `agent` and `controller` are bus clients (clientAuth only);
        `aggregator` is a bus client that may also serve (clientAuth, plus serverAuth when it
        has names); `server` only serves (serverAuth): a server certificate can never log in to
        the broker as a client, where its name would count as an identity.
        """
        _check_name(common_name, kind)
        if not 1 <= days <= MAX_LEAF_DAYS:
            raise PkiError(f"validity of {days} days is out of range: use 1-{MAX_LEAF_DAYS}")
        sans = _parse_san(dns_names, ip_addresses)
        if kind == "server" and not sans:
            if _is_ip(common_name):
                sans = _parse_san((), (common_name,))
            else:
                sans = _parse_san((common_name,), ())
        if kind in ("agent", "controller", "node") and sans:
            raise PkiError(
                f"{kind} certificates carry no host names; "
                "issue a 'server' certificate for a service"
            )

        if (kind == "node") != (public_key is not None) or (csr_pem and public_key):
            raise PkiError("a node certificate, and only it, is issued over a given public key")
        key_pem: bytes | None = None
        subject_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
        if public_key is not None:
            subject_key = public_key
        elif csr_pem is None:
            private = generate_private_key()
            key_pem = private_key_pem(private)
            subject_key = private.public_key()
        else:
            subject_key = _public_key_from_csr(csr_pem, common_name)

        if kind == "server":
            ekus = [ExtendedKeyUsageOID.SERVER_AUTH]
        elif kind == "aggregator" and sans:
            ekus = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        else:
            ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]

        now = datetime.now(UTC)
        not_after = min(now + timedelta(days=days), self._cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        is_rsa = isinstance(subject_key, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(subject_key)
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA384())
        log.info(
            "issued %s certificate for %s (serial %x, until %s)",
            kind,
            common_name,
            serial,
            not_after.date().isoformat(),
        )
        return IssuedCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem,
            serial=serial,
            not_after=cert.not_valid_after_utc,
            common_name=common_name,
            kind=kind,
        )

    def verify(self, cert_pem: bytes, *, at: datetime | None = None) -> CertInfo:
        """Check that this CA signed `cert_pem` and that it is valid at `at` (now)."""
        cert = _load_cert(cert_pem, what="certificate")
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise PkiError("the certificate was not issued by this CA") from None
        moment = at or datetime.now(UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise PkiError(
                f"the certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        return _info(cert)

    # --- revocation -----------------------------------------------------------------------

    def write_crl(self, revoked: Iterable[tuple[int, datetime]], *, days: int = CRL_DAYS) -> None:
        """Replace the CRL (atomically) with one listing `revoked` (serial, revocation time).

        The list is the whole truth (the caller's store keeps it), not an addition. The CRL
        expires after `days`: rewrite it before `crl_next_update`, Mosquitto refuses every
        client once it has expired.
        """
        now = datetime.now(UTC)
        number = 1
        previous = self._read_crl()
        if previous is not None:
            try:
                ext = previous.extensions.get_extension_for_class(x509.CRLNumber)
                number = ext.value.crl_number + 1
            except x509.ExtensionNotFound:
                pass
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._aki, critical=False)
        )
        seen: set[int] = set()
        for serial, when in revoked:
            if serial in seen:
                continue
            seen.add(serial)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._key, hashes.SHA384())
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        log.info("wrote CRL #%d with %d revoked certificate(s)", number, len(seen))

    def _read_crl(self) -> x509.CertificateRevocationList | None:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None

    @property
    def crl_next_update(self) -> datetime | None:
        """When the current CRL expires (None if there is none): rewrite it well before."""
        crl = self._read_crl()
        return None if crl is None else crl.next_update_utc

    def revoked_serials(self) -> set[int]:
        """The serials on the current CRL."""
        crl = self._read_crl()
        return set() if crl is None else {entry.serial_number for entry in crl}
