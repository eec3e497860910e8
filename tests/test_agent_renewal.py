"""Certificate renewal: the agent's request and checked swap, the controller's signing rules,
and the whole exchange over the real broker with the real daemons."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedsky.agent import renewal
from fedsky.agent.config import AgentConfig, resolve_identity
from fedsky.agent.enroll import InstallPaths, install_bundle, make_request
from fedsky.agent.renewal import RenewalError, install_renewed, request_renewal
from fedsky.controller.inventory import store as inventory
from fedsky.controller.onebox import Onebox
from fedsky.controller.security import enrollment
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store

from tests.support import eventually_blocking
from tests.support.csr import make_csr
from tests.test_agent_enroll import _bundle

NAME = "hospital-us"


def _enrolled(tmp_path: Path, pki: Pki) -> InstallPaths:
    paths = AgentConfig(state_dir=tmp_path / "state").install_paths
    request = make_request(name=NAME, paths=paths)
    bundle, _ = _bundle(pki, NAME, request.csr_pem)
    (tmp_path / "b.json").write_text(bundle.dump())
    install_bundle(bundle_path=tmp_path / "b.json", paths=paths)
    return paths


def _public(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_key(paths: InstallPaths) -> bytes:
    cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_renewal_swaps_key_certificate_and_bundle_together(tmp_path: Path, pki: Pki) -> None:
    paths = _enrolled(tmp_path, pki)
    old_cert = paths.cert_file.read_bytes()
    assert renewal.renewal_due(paths.cert_file, before=timedelta(days=400))
    assert not renewal.renewal_due(paths.cert_file, before=timedelta(days=30))
    csr_pem = request_renewal(paths, agent_id=NAME)
    csr = x509.load_pem_x509_csr(csr_pem)
    # Asking again (no answer yet) reuses the pending key.
    again = x509.load_pem_x509_csr(request_renewal(paths, agent_id=NAME))
    assert again.public_key() == csr.public_key()
    assert csr.subject.rfc4514_string() == f"CN={NAME}"
    next_key = paths.key_file.with_name("agent.key.next")
    assert next_key.stat().st_mode & 0o777 == 0o600
    pending = next_key.read_bytes()

    issued = pki.issue(common_name=NAME, kind="agent", csr_pem=csr_pem, days=400)
    bundle = install_renewed(paths, issued.cert_pem.decode())
    assert paths.key_file.read_bytes() == pending
    assert paths.cert_file.read_bytes() == issued.cert_pem != old_cert
    assert _cert_key(paths) == _public(paths.key_file.read_bytes())
    assert not next_key.exists()
    identity = resolve_identity(AgentConfig(state_dir=tmp_path / "state"))
    assert identity.cert_not_after == bundle.not_after == issued.not_after


def test_a_certificate_not_for_the_pending_key_name_or_ca_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    paths = _enrolled(tmp_path, pki)
    with pytest.raises(RenewalError, match="no renewal is pending"):
        install_renewed(paths, paths.cert_file.read_text())
    csr_pem = request_renewal(paths, agent_id=NAME)
    before = {p: p.read_bytes() for p in (paths.key_file, paths.cert_file, paths.bundle_file)}
    _, other_csr = make_csr(NAME)
    foreign = Pki.init(tmp_path / "foreign")
    pending_key = serialization.load_pem_private_key(
        paths.key_file.with_name("agent.key.next").read_bytes(), password=None
    )
    assert isinstance(pending_key, ec.EllipticCurvePrivateKey)
    csr_for_another_name = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital-eu")]))
        .sign(pending_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    refused = {
        "does not belong": pki.issue(common_name=NAME, kind="agent", csr_pem=other_csr),
        "names": pki.issue(common_name="hospital-eu", kind="agent", csr_pem=csr_for_another_name),
        "not signed by": foreign.issue(common_name=NAME, kind="agent", csr_pem=csr_pem),
    }
    for reason, cert in refused.items():
        with pytest.raises(RenewalError, match=reason):
            install_renewed(paths, cert.cert_pem.decode())
    with pytest.raises(RenewalError, match="cannot be read"):
        install_renewed(paths, "not a certificate")
    assert {p: p.read_bytes() for p in before} == before  # nothing touched


def test_a_swap_stopped_half_way_is_completed_at_the_next_start(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _enrolled(tmp_path, pki)
    csr_pem = request_renewal(paths, agent_id=NAME)
    issued = pki.issue(common_name=NAME, kind="agent", csr_pem=csr_pem)
    real = renewal.atomic_write

    def crash_on_the_certificate(path: Path, *args: object, **kwargs: object) -> None:
        if path == paths.cert_file:
            raise OSError("the machine lost power")
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(renewal, "atomic_write", crash_on_the_certificate)
    with pytest.raises(OSError, match="lost power"):
        install_renewed(paths, issued.cert_pem.decode())
    # The new key is in place, the old certificate still: the pair does not match.
    assert _cert_key(paths) != _public(paths.key_file.read_bytes())
    monkeypatch.setattr(renewal, "atomic_write", real)
    assert renewal.complete_interrupted_renewal(paths)
    assert _cert_key(paths) == _public(paths.key_file.read_bytes())
    assert paths.cert_file.read_bytes() == issued.cert_pem
    assert not renewal.complete_interrupted_renewal(paths)


def test_the_controller_signs_for_the_sender_and_bounds_renewals(tmp_path: Path, pki: Pki) -> None:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    _, csr = make_csr(NAME)
    store.call(
        enrollment.enroll_agent,
        pki,
        agent_id=NAME,
        location="aws:us-east-1",
        csr_pem=csr,
        broker_host="127.0.0.1",
        broker_port=8883,
        topic_prefix="fedsky/v1",
    )
    _, renewal_csr = make_csr(NAME)
    with pytest.raises(enrollment.EnrolmentError, match="at most every 3600 s"):
        store.call(enrollment.renew_agent, pki, agent_id=NAME, csr_pem=renewal_csr)
    later = datetime.now(UTC) + timedelta(hours=2)
    # A request naming another agent is refused: an agent renews only its own name.
    _, claimed_other = make_csr("hospital-eu")
    with pytest.raises(enrollment.EnrolmentError, match="is for 'hospital-eu'"):
        store.call(enrollment.renew_agent, pki, agent_id=NAME, csr_pem=claimed_other, now=later)
    cert = store.call(enrollment.renew_agent, pki, agent_id=NAME, csr_pem=renewal_csr, now=later)
    assert cert.common_name == NAME
    assert x509.load_pem_x509_certificate(cert.cert_pem).subject.rfc4514_string() == f"CN={NAME}"
    with pytest.raises(enrollment.EnrolmentError, match="no agent"):
        store.call(enrollment.renew_agent, pki, agent_id="hospital-xx", csr_pem=csr, now=later)
    store.call(enrollment.revoke_agent, pki, NAME)
    with pytest.raises(enrollment.EnrolmentError, match="revoked"):
        store.call(
            enrollment.renew_agent,
            pki,
            agent_id=NAME,
            csr_pem=csr,
            now=later + timedelta(hours=2),
        )


# -- over the real broker ------------------------------------------------------------------------


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Onebox]:
    onebox = Onebox(
        root=tmp_path / "box",
        report_interval_s=2.0,
        poll_interval_s=0.5,
        # Renew at once: the certificate just issued has less than 400 days left.
        agent_extra={NAME: "[tls]\nrenew_before_days = 400\n"},
        controller_extra="[pki]\nrenewal_min_interval_s = 0\nagent_cert_days = 30",
    )
    try:
        onebox.start({NAME: "aws:us-east-1"})
        yield onebox
    finally:
        onebox.stop()


@pytest.mark.e2e
def test_an_agent_renews_its_certificate_over_the_bus_and_reconnects_with_it(
    box: Onebox,
) -> None:
    agent = box.agents[NAME]
    assert agent.log_path is not None
    log = agent.log_path
    eventually_blocking(
        lambda: "installed the renewed certificate" in log.read_text(),
        timeout=30,
        interval=0.2,
        what="the agent to install its renewed certificate",
    )
    # The agent's configured 30-day certificate (the controller's [pki] agent_cert_days).
    cert = x509.load_pem_x509_certificate((agent.state_dir / "agent.crt").read_bytes())
    left = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < left <= timedelta(days=30)
    eventually_blocking(
        lambda: log.read_text().count(f"connected to broker 127.0.0.1:{box.broker_port}"),
        until=lambda n: n >= 2,
        timeout=15,
        interval=0.2,
        what="the agent to reconnect with the new certificate",
    )
    # It goes on reporting over the new session; the old certificate is still valid, unused.
    seen = box.api.get(f"/v1/agents/{NAME}")["last_report_at"]
    eventually_blocking(
        lambda: box.api.get(f"/v1/agents/{NAME}")["last_report_at"],
        until=lambda at: at != seen,
        timeout=15,
        interval=0.5,
        what="a report over the renewed session",
    )
    assert box.api.get(f"/v1/agents/{NAME}")["state"] == "online"
    status = json.loads(box.fedctl("ca", "status", "--json").stdout)
    agent_certs = [e for e in status["certificates"] if e["name"] == NAME]
    assert [round(e["days_left"]) for e in agent_certs] == [30]
    records = json.loads(box.fedctl("audit", "list", "--json").stdout)
    renewals = [r for r in records if r["action"] == "agent.renew"]
    assert [r["outcome"].split(":")[0] for r in renewals] == ["ok"]
    assert log.read_text().count("asked the controller to renew") == 1
