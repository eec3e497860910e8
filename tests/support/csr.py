"""Certificate requests as a hospital makes them (the key stays with the requester)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from fedsky.controller.security.pki import Pki
from fedsky.shared.supernode import NodeKeyPair


def make_csr(
    common_name: str,
    *,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) for `common_name`, optionally asking for `extensions`."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    pure = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    csr = builder.sign(key, None if pure else hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def node_certificate(pki: Pki, site: str, keys: NodeKeyPair) -> Path:
    """The SuperNode certificate the controller would issue for `site`'s node key, written
    beside the key (what the aggregator's front asks of a Fleet caller)."""
    path = keys.private_key.with_name(keys.private_key.name + ".crt")
    path.write_bytes(pki.issue_node(site, keys.public_text()).cert_pem)
    return path
