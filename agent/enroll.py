"""Enrolment on the hospital side: the private key is made here and never leaves this machine.

1. `agentctl enroll request NAME` makes the key (0600) and a certificate request (CN = NAME).
2. The operator signs it: `fedctl agents enroll NAME --location cloud:region --csr FILE` writes a
   bundle (CA certificate, agent certificate, broker address; no private key).
3. `agentctl enroll BUNDLE` checks that the bundle's certificate was signed by the bundle's CA,
   names the bundle's agent id, is a client certificate, is valid now, and holds the public key
   of the local private key; then installs the CA, the certificate and the bundle's metadata.

For one-machine set-ups `fedctl agents enroll ... --with-key` makes the key too; then
`agentctl enroll BUNDLE --key FILE` checks it the same way and copies it in, 0600.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.shared.bundle import BundleError, EnrolmentBundle, read_bundle
from fedsky.shared.files import atomic_write
from fedsky.shared.ids import InvalidIdError, check_agent_id

_MAX_KEY_BYTES = 64 * 1024
# The bundle's `not_after` is informative; the certificate's own date must agree with it.
_NOT_AFTER_SLACK_S = 1.0


class EnrolError(Exception):
    """Enrolment cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class InstallPaths:
    """Where `agentctl enroll` writes (from the agent's config, or defaults in a state dir)."""

    state_dir: Path
    key_file: Path
    cert_file: Path
    ca_file: Path
    bundle_file: Path


@dataclass(frozen=True)
class RequestResult:
    name: str
    key_file: Path
    key_created: bool
    csr_pem: bytes


# --- files -------------------------------------------------------------------------------------


def _owner_of(directory: Path) -> tuple[int, int] | None:
    """Files installed by root belong to the agent's service user, who owns the state dir."""
    if os.geteuid() != 0:
        return None
    st = directory.stat()
    return st.st_uid, st.st_gid


def _prepare_state_dir(state_dir: Path) -> None:
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o750)


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()[: _MAX_KEY_BYTES + 1]
    except FileNotFoundError:
        raise EnrolError(
            f"no private key at {path}: run `agentctl enroll request NAME` first "
            "(or pass --key FILE with the key the operator made)"
        ) from None
    except OSError as exc:
        raise EnrolError(f"cannot read the private key {path}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_BYTES:
        raise EnrolError(f"{path} is too large to be a private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never echo the file's content: it may be a key in another format.
        raise EnrolError(f"{path} is not an unencrypted PEM private key") from None


def _spki(public: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo: equal bytes, equal keys, whatever the key type."""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- step 1: key and request -------------------------------------------------------------------


def make_request(*, name: str, paths: InstallPaths, new_key: bool = False) -> RequestResult:
    """Make (or reuse) the agent's private key and return a CSR for `name`.

    An existing key is reused unless `new_key`: re-running the request must not silently
    invalidate a certificate already installed for that key.
    """
    try:
        check_agent_id(name)
    except InvalidIdError as exc:
        raise EnrolError(str(exc)) from None
    _prepare_state_dir(paths.state_dir)
    created = False
    if paths.key_file.exists() and not new_key:
        key = _load_key(paths.key_file)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise EnrolError(f"{paths.key_file} is neither an EC nor an RSA key")
    else:
        key = new_private_key(paths.key_file, owner=_owner_of(paths.state_dir))
        created = True
    return RequestResult(
        name=name, key_file=paths.key_file, key_created=created, csr_pem=csr_for(name, key)
    )


def new_private_key(path: Path, *, owner: tuple[int, int] | None) -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key, written to `path` 0600 from its creation on."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem, mode=0o600, owner=owner)
    return key


def csr_for(name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """A PEM certificate request for the common name `name`, signed with `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


# --- step 3: check and install the bundle ------------------------------------------------------


def _load_cert(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise EnrolError(f"the bundle's {what} is not a valid PEM certificate") from None


def verify_bundle(
    bundle: EnrolmentBundle, key: PrivateKeyTypes, *, now: datetime | None = None
) -> None:
    """Raise EnrolError unless `bundle` is a genuine, current certificate for `key`."""
    ca = _load_cert(bundle.ca_pem, "CA certificate")
    cert = _load_cert(bundle.cert_pem, "agent certificate")
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise EnrolError("the bundle's CA certificate is not a certificate authority")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrolError(
            "the bundle's certificate was not signed by the bundle's CA: the bundle was altered "
            "or mixed up; ask the operator for a new one"
        ) from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if len(names) == 1 else None
    if cn != bundle.agent_id:
        raise EnrolError(
            f"the bundle is for agent {bundle.agent_id!r} but its certificate names {cn!r}: "
            "the bundle was altered; ask the operator for a new one"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise EnrolError("the bundle's certificate is not a client certificate")
    except x509.ExtensionNotFound:
        pass
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise EnrolError(
            "the bundle's certificate is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); check the clock here or enrol again"
        )
    not_after = (
        bundle.not_after if bundle.not_after.tzinfo else bundle.not_after.replace(tzinfo=UTC)
    )
    if abs((not_after - cert.not_valid_after_utc).total_seconds()) > _NOT_AFTER_SLACK_S:
        raise EnrolError(
            "the bundle's not_after does not match its certificate: the bundle was altered"
        )
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise EnrolError(
            "the bundle's certificate does not belong to this agent's private key: it was made "
            "for another request (or the key was replaced); send the current request again"
        )


def install_bundle(
    *,
    bundle_path: Path,
    paths: InstallPaths,
    key_source: Path | None = None,
    force: bool = False,
    expected_agent_id: str | None = None,
) -> EnrolmentBundle:
    """Check `bundle_path` against the local key (or `key_source`) and install it.

    `expected_agent_id`: the agent id the config already names; a bundle for another one is
    refused unless `force` (re-enrolment under a new name).
    """
    try:
        bundle = read_bundle(bundle_path)
    except BundleError as exc:
        raise EnrolError(str(exc)) from None
    try:
        check_agent_id(bundle.agent_id)
    except InvalidIdError as exc:
        raise EnrolError(f"{bundle_path}: {exc}") from None
    if expected_agent_id is not None and expected_agent_id != bundle.agent_id and not force:
        raise EnrolError(
            f"the config names agent {expected_agent_id!r} but this bundle is for "
            f"{bundle.agent_id!r}; pass --force to enrol under the new name"
        )
    key = _load_key(key_source if key_source is not None else paths.key_file)
    verify_bundle(bundle, key)

    _prepare_state_dir(paths.state_dir)
    owner = _owner_of(paths.state_dir)
    if key_source is not None:
        if (
            paths.key_file.exists()
            and key_source.resolve() != paths.key_file.resolve()
            and not force
        ):
            existing = _load_key(paths.key_file)
            if _spki(existing.public_key()) != _spki(key.public_key()):
                raise EnrolError(
                    f"{paths.key_file} already holds a different private key; pass --force to "
                    "replace it (the certificate made for it stops working)"
                )
        if key_source.resolve() != paths.key_file.resolve():
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write(paths.key_file, pem, mode=0o600, owner=owner)
    elif paths.key_file.stat().st_mode & 0o077:
        os.chmod(paths.key_file, 0o600)  # a private key is for the agent alone

    atomic_write(paths.ca_file, bundle.ca_pem.encode(), mode=0o644, owner=owner)
    atomic_write(paths.cert_file, bundle.cert_pem.encode(), mode=0o644, owner=owner)
    # Last: its presence is what makes the agent count as enrolled.
    atomic_write(paths.bundle_file, bundle.dump().encode(), mode=0o640, owner=owner)
    return bundle
