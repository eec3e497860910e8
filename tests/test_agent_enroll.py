"""Enrolment on the hospital side: key and request here, bundle checked before it is installed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fedsky.agent import cli
from fedsky.agent.config import AgentConfig, resolve_identity
from fedsky.agent.enroll import EnrolError, InstallPaths, install_bundle, make_request
from fedsky.controller.security.pki import Pki
from fedsky.shared import exitcodes
from fedsky.shared.bundle import EnrolmentBundle


def _paths(state: Path) -> InstallPaths:
    return AgentConfig(state_dir=state).install_paths


def _bundle(
    pki: Pki, name: str, csr: bytes | None, **changes: object
) -> tuple[EnrolmentBundle, bytes | None]:
    issued = pki.issue(common_name=name, kind="agent", csr_pem=csr)
    bundle = EnrolmentBundle(
        agent_id=name,
        location="aws:us-east-1",
        ca_pem=pki.ca_cert_pem.decode(),
        cert_pem=issued.cert_pem.decode(),
        broker_host="127.0.0.1",
        broker_port=8883,
        topic_prefix="fedsky/v1",
        not_after=issued.not_after,
    )
    return bundle.model_copy(update=changes), issued.key_pem


def _write(path: Path, bundle: EnrolmentBundle) -> Path:
    path.write_text(bundle.dump())
    return path


def test_request_sign_install_round_trip(tmp_path: Path, pki: Pki) -> None:
    state = tmp_path / "state"
    paths = _paths(state)
    req = make_request(name="hospital-us", paths=paths)
    assert req.key_created
    assert stat.S_IMODE(paths.key_file.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr(req.csr_pem)
    assert csr.subject.rfc4514_string() == "CN=hospital-us"
    assert b"PRIVATE" not in req.csr_pem

    # Asking again keeps the key (a certificate may already be installed for it).
    again = make_request(name="hospital-us", paths=paths)
    assert not again.key_created
    assert x509.load_pem_x509_csr(again.csr_pem).public_key() == csr.public_key()

    bundle, key_pem = _bundle(pki, "hospital-us", req.csr_pem)
    assert key_pem is None
    installed = install_bundle(bundle_path=_write(tmp_path / "b.json", bundle), paths=paths)
    assert installed.agent_id == "hospital-us"
    assert paths.cert_file.read_text() == bundle.cert_pem
    assert paths.ca_file.read_text() == bundle.ca_pem
    assert "PRIVATE KEY" not in paths.bundle_file.read_text()
    pki.verify(paths.cert_file.read_bytes())

    identity = resolve_identity(AgentConfig(state_dir=state))
    assert (identity.agent_id, identity.location) == ("hospital-us", "aws:us-east-1")
    assert (identity.broker_host, identity.broker_port) == ("127.0.0.1", 8883)
    assert identity.cert_not_after == bundle.not_after


def test_bundle_for_another_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    ours = _paths(tmp_path / "ours")
    other = _paths(tmp_path / "other")
    make_request(name="hospital-us", paths=ours)
    theirs = make_request(name="hospital-us", paths=other)
    bundle, _ = _bundle(pki, "hospital-us", theirs.csr_pem)
    with pytest.raises(EnrolError, match="does not belong to this agent's private key"):
        install_bundle(bundle_path=_write(tmp_path / "b.json", bundle), paths=ours)
    assert not ours.bundle_file.exists()
    assert not ours.cert_file.exists()


def test_tampered_bundles_are_refused(tmp_path: Path, pki: Pki) -> None:
    paths = _paths(tmp_path / "state")
    req = make_request(name="hospital-us", paths=paths)
    good, _ = _bundle(pki, "hospital-us", req.csr_pem)
    foreign = Pki.init(tmp_path / "foreign-ca")
    foreign_bundle, _ = _bundle(foreign, "hospital-us", req.csr_pem)
    other_req = make_request(name="hospital-eu", paths=_paths(tmp_path / "eu"))
    eu_bundle, _ = _bundle(pki, "hospital-eu", other_req.csr_pem)

    lines = good.cert_pem.splitlines()
    middle = len(lines) // 2
    flipped = lines[middle][:10] + ("A" if lines[middle][10] != "A" else "B") + lines[middle][11:]
    corrupted = "\n".join([*lines[:middle], flipped, *lines[middle + 1 :]]) + "\n"

    cases = {
        # A certificate from another CA, presented with our CA.
        "not signed by the bundle's CA": good.model_copy(
            update={"cert_pem": foreign_bundle.cert_pem}
        ),
        # Our certificate, presented with another CA.
        "not signed by the bundle's CA ": good.model_copy(
            update={"ca_pem": foreign.ca_cert_pem.decode()}
        ),
        # Renamed to another agent.
        "certificate names 'hospital-us'": good.model_copy(update={"agent_id": "hospital-eu"}),
        # Another agent's genuine certificate under our name.
        "certificate names 'hospital-eu'": good.model_copy(update={"cert_pem": eu_bundle.cert_pem}),
        "not_after does not match": good.model_copy(
            update={"not_after": good.not_after.replace(year=good.not_after.year + 5)}
        ),
        "not a valid PEM certificate|not signed": good.model_copy(update={"cert_pem": corrupted}),
    }
    for i, (expected, bundle) in enumerate(cases.items()):
        with pytest.raises(EnrolError, match=expected.strip()):
            install_bundle(bundle_path=_write(tmp_path / f"t{i}.json", bundle), paths=paths)
    assert not paths.bundle_file.exists()

    # Not JSON, or carrying a private key: refused before any check of certificates.
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(EnrolError, match="not a fedsky enrolment bundle"):
        install_bundle(bundle_path=tmp_path / "junk.json", paths=paths)
    marker = "-----BEGIN " + "PRIVATE KEY-----"  # a marker, not a key
    data = good.dump().replace('"ca_pem": "', f'"ca_pem": "{marker}\\n', 1)
    (tmp_path / "key.json").write_text(data)
    with pytest.raises(EnrolError, match="must not carry a private key"):
        install_bundle(bundle_path=tmp_path / "key.json", paths=paths)

    # The genuine one still installs.
    install_bundle(bundle_path=_write(tmp_path / "good.json", good), paths=paths)
    assert paths.bundle_file.exists()


def test_server_certificate_is_not_an_agent_identity(tmp_path: Path, pki: Pki) -> None:
    paths = _paths(tmp_path / "state")
    req = make_request(name="hospital-us", paths=paths)
    good, _ = _bundle(pki, "hospital-us", req.csr_pem)
    server = pki.issue(common_name="hospital-us", kind="server", csr_pem=req.csr_pem)
    bundle = good.model_copy(
        update={"cert_pem": server.cert_pem.decode(), "not_after": server.not_after}
    )
    with pytest.raises(EnrolError, match="not a client certificate"):
        install_bundle(bundle_path=_write(tmp_path / "s.json", bundle), paths=paths)


def test_with_key_flow_copies_the_key_0600(tmp_path: Path, pki: Pki) -> None:
    paths = _paths(tmp_path / "state")
    bundle, key_pem = _bundle(pki, "hospital-asia", None)
    assert key_pem is not None
    key_file = tmp_path / "hospital-asia.key"
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    install_bundle(
        bundle_path=_write(tmp_path / "b.json", bundle), paths=paths, key_source=key_file
    )
    assert stat.S_IMODE(paths.key_file.stat().st_mode) == 0o600
    installed = serialization.load_pem_private_key(paths.key_file.read_bytes(), password=None)
    original = serialization.load_pem_private_key(key_pem, password=None)
    assert installed.public_key() == original.public_key()

    # Another bundle+key must not silently replace an installed, different key.
    other, other_key = _bundle(pki, "hospital-asia", None)
    assert other_key is not None
    other_file = tmp_path / "other.key"
    other_file.write_bytes(other_key)
    with pytest.raises(EnrolError, match="already holds a different private key"):
        install_bundle(
            bundle_path=_write(tmp_path / "o.json", other), paths=paths, key_source=other_file
        )
    install_bundle(
        bundle_path=_write(tmp_path / "o.json", other),
        paths=paths,
        key_source=other_file,
        force=True,
    )
    assert paths.key_file.read_bytes() != key_pem


def test_agentctl_enroll_commands(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    csr = tmp_path / "req.csr"
    assert (
        cli.main(["enroll", "request", "hospital-eu", "--state-dir", str(state), "--out", str(csr)])
        == 0
    )
    assert "fedctl agents enroll hospital-eu" in capsys.readouterr().out
    bundle, _ = _bundle(pki, "hospital-eu", csr.read_bytes())
    path = _write(tmp_path / "hospital-eu.bundle.json", bundle)
    assert cli.main(["enroll", str(path), "--state-dir", str(state)]) == 0
    assert "enrolled as hospital-eu" in capsys.readouterr().out

    # Reserved and malformed names are refused before any key is made.
    for bad in ("controller", "agg-job1", "Hospital_EU", "x" * 64):
        assert cli.main(["enroll", "request", bad, "--state-dir", str(tmp_path / bad[:8])]) == 1
        assert not (tmp_path / bad[:8] / "agent.key").exists()
    err = capsys.readouterr().err
    assert "reserved" in err
    assert "invalid" in err

    # A bundle for another request is refused with a reason, exit 1.
    other = make_request(name="hospital-eu", paths=_paths(tmp_path / "elsewhere"))
    foreign, _ = _bundle(pki, "hospital-eu", other.csr_pem)
    assert (
        cli.main(["enroll", str(_write(tmp_path / "f.json", foreign)), "--state-dir", str(state)])
        == 1
    )
    assert "does not belong" in capsys.readouterr().err
    assert cli.main(["enroll", "request", "--state-dir", str(state)]) == exitcodes.USAGE
