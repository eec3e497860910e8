"""When the broker restarts to refuse revoked certificates: at once for an agent, after the last
running job for a job's certificate. A small fake broker stands in for Mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from fedsky.controller.api.agents import revoke
from fedsky.controller.api.app import make_app
from fedsky.controller.api.responses import ApiProblem
from fedsky.controller.bus.broker_config import BrokerError, external_revocation_instructions
from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.bus.settings import BrokerConfig
from fedsky.controller.inventory import store as inventory
from fedsky.controller.security import enrollment
from fedsky.controller.security.pki import Pki, cert_info
from fedsky.controller.security.revocation import (
    MANAGED_BROKER_RESTARTED,
    SESSION_CUT,
    RevocationEnforcer,
)
from fedsky.controller.services import Services
from fedsky.controller.store import Store

from tests.support import eventually


class FakeBroker:
    """Counts restarts and CRL reloads; fails the next `failures` restarts. `can_cut_sessions`:
    it has the dynamic-security plugin."""

    def __init__(self, *, failures: int = 0, can_cut_sessions: bool = False) -> None:
        self.restarts = 0
        self.reloads = 0
        self.failures = failures
        self.can_cut_sessions = can_cut_sessions

    async def reload_crl(self) -> None:
        self.reloads += 1

    async def restart(self) -> None:
        if self.failures:
            self.failures -= 1
            raise BrokerError("mosquitto did not restart within 30 s")
        self.restarts += 1


class FakeSessions:
    """The bus's session cut: records whom; refuses while `down`."""

    def __init__(self, *, down: bool = False) -> None:
        self.cut: list[str] = []
        self.down = down

    async def cut_session(self, username: str) -> None:
        if self.down:
            raise BusUnavailable("the broker is not reachable")
        self.cut.append(username)


def _enforcer(
    pki: Pki,
    broker: FakeBroker | None,
    *,
    managed: bool = True,
    sessions: FakeSessions | None = None,
) -> RevocationEnforcer:
    return RevocationEnforcer(
        settings=BrokerConfig(managed=managed), broker=broker, pki=pki, sessions=sessions
    )


# --- with the dynamic-security plugin: cut the one session, no restart --------------------


async def test_an_agent_revocation_cuts_its_session_and_reloads_the_crl(pki: Pki) -> None:
    broker, sessions = FakeBroker(can_cut_sessions=True), FakeSessions()
    enforcer = _enforcer(pki, broker, sessions=sessions)
    assert await enforcer.agent_revoked("hospital-a") == SESSION_CUT
    assert (sessions.cut, broker.reloads, broker.restarts) == (["hospital-a"], 1, 0)


async def test_a_job_identity_is_cut_at_the_jobs_end_even_while_others_run(pki: Pki) -> None:
    broker, sessions = FakeBroker(can_cut_sessions=True), FakeSessions()
    enforcer = _enforcer(pki, broker, sessions=sessions)
    enforcer.job_certificate_revoked("agg-job-1")
    await enforcer.job_ended(others_running=True)
    assert (sessions.cut, broker.restarts) == (["agg-job-1"], 0)
    assert not enforcer.job_revocations_pending


async def test_a_cut_that_fails_falls_back_to_the_restart(pki: Pki) -> None:
    broker, sessions = FakeBroker(can_cut_sessions=True), FakeSessions(down=True)
    enforcer = _enforcer(pki, broker, sessions=sessions)
    assert await enforcer.agent_revoked("hospital-a") == MANAGED_BROKER_RESTARTED
    assert broker.restarts == 1
    enforcer.job_certificate_revoked("agg-job-1")
    await enforcer.job_ended(others_running=True)  # no restart while a job runs
    assert enforcer.job_revocations_pending
    sessions.down = False
    await enforcer.job_ended(others_running=True)  # the next job's end cuts it
    assert (sessions.cut, broker.restarts) == (["agg-job-1"], 1)
    assert not enforcer.job_revocations_pending


# --- an agent revoked by the operator -------------------------------------------------------


async def test_agent_revocation_restarts_the_managed_broker_at_once(pki: Pki) -> None:
    broker = FakeBroker()
    assert await _enforcer(pki, broker).agent_revoked() == MANAGED_BROKER_RESTARTED
    assert broker.restarts == 1


@pytest.mark.parametrize(("managed", "running"), [(False, False), (True, False), (False, True)])
async def test_agent_revocation_without_a_managed_broker_says_what_to_do(
    pki: Pki, managed: bool, running: bool
) -> None:
    broker = FakeBroker() if running else None
    enforcement = await _enforcer(pki, broker, managed=managed).agent_revoked()
    assert enforcement == external_revocation_instructions(crl_path=pki.crl_path)
    assert str(pki.crl_path) in enforcement
    assert broker is None or broker.restarts == 0


async def test_agent_revocation_reports_a_failed_restart(pki: Pki) -> None:
    with pytest.raises(BrokerError, match="did not restart"):
        await _enforcer(pki, FakeBroker(failures=1)).agent_revoked()


# --- a job's certificate, revoked when the job ended -----------------------------------------


async def test_job_end_without_revocations_leaves_the_broker_alone(pki: Pki) -> None:
    broker = FakeBroker()
    await _enforcer(pki, broker).job_ended(others_running=False)
    assert broker.restarts == 0


async def test_job_revocations_wait_for_the_last_running_job(pki: Pki) -> None:
    broker = FakeBroker()
    enforcer = _enforcer(pki, broker)
    enforcer.job_certificate_revoked()
    await enforcer.job_ended(others_running=True)
    assert broker.restarts == 0
    assert enforcer.job_revocations_pending
    enforcer.job_certificate_revoked()  # the second job ends: one restart for both
    await enforcer.job_ended(others_running=False)
    assert broker.restarts == 1
    assert not enforcer.job_revocations_pending
    await enforcer.job_ended(others_running=False)
    assert broker.restarts == 1


async def test_a_failed_restart_stays_pending_for_the_next_job_end(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FakeBroker(failures=1)
    enforcer = _enforcer(pki, broker)
    enforcer.job_certificate_revoked()
    with caplog.at_level(logging.ERROR, logger="fedsky.controller.security.revocation"):
        await enforcer.job_ended(others_running=False)  # logged, never raised
    assert "restarting the broker to apply revocations failed" in caplog.text
    assert enforcer.job_revocations_pending
    await enforcer.job_ended(others_running=False)
    assert broker.restarts == 1
    assert not enforcer.job_revocations_pending


async def test_job_revocations_with_an_external_broker_restart_nothing(pki: Pki) -> None:
    enforcer = _enforcer(pki, None, managed=False)
    enforcer.job_certificate_revoked()
    await enforcer.job_ended(others_running=False)
    assert enforcer.job_revocations_pending


# --- the API view: revoke, then enforce ----------------------------------------------------


async def test_the_revoke_view_revokes_then_restarts_the_managed_broker(
    pki: Pki, tmp_path: Path
) -> None:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    enrolled = store.call(
        enrollment.enroll_agent,
        pki,
        agent_id="hospital-a",
        location="aws:us-east-1",
        csr_pem=None,
        broker_host="127.0.0.1",
        broker_port=8883,
        topic_prefix="fedsky/v1",
    )
    broker = FakeBroker()
    app = make_app(Services(store=store, pki=pki, revocations=_enforcer(pki, broker)))

    def request(agent_id: str) -> web.Request:
        return make_mocked_request(
            "POST", f"/v1/agents/{agent_id}/revoke", match_info={"agent_id": agent_id}, app=app
        )

    response = await revoke(request("hospital-a"))
    assert isinstance(response, web.Response)
    assert json.loads(response.text or "") == {
        "agent_id": "hospital-a",
        "revoked_certificates": 1,
        "enforcement": MANAGED_BROKER_RESTARTED,
    }
    assert broker.restarts == 1
    assert cert_info(enrolled.bundle.cert_pem.encode()).serial in pki.revoked_serials()
    # Nothing was revoked a second time: nothing to enforce.
    with pytest.raises(ApiProblem) as refused:
        await revoke(request("hospital-a"))
    assert refused.value.status == 409
    assert broker.restarts == 1
    store.close()


async def test_the_crl_timer_renews_a_crl_near_its_end_and_the_broker_reloads_it(
    pki: Pki, tmp_path: Path
) -> None:
    from fedsky.controller import daemon
    from fedsky.controller.security.upkeep import keep_fresh

    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    pki.write_crl([], days=2)  # past it, Mosquitto would refuse every client
    broker = FakeBroker()
    timer = asyncio.create_task(
        keep_fresh(
            renew_crl=lambda: daemon._renew_crl(pki, store),
            reload_crl=broker.reload_crl,
            certificates=[],
            interval_s=0.01,
        )
    )
    try:
        await eventually(lambda: broker.reloads, timeout=5, what="the broker to reload the CRL")
    finally:
        timer.cancel()
    next_update = pki.crl_next_update
    assert next_update is not None
    assert next_update - datetime.now(UTC) > timedelta(days=30)
    assert broker.reloads == 1  # renewed once; later checks find it fresh
    store.close()
