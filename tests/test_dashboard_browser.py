"""The dashboard in a real browser (Debian's chromium, driven by Playwright) on the one-box
system: an admin logs in, sees the hospitals' VMs change when one stops, uploads a bad
credential file and reads why it was refused, plans a placement and sees the plot, submits a
small job from its spec and model files and watches its curves grow to the end, sees the
failover when a VM dies under it, and downloads the best model, which verifies. A viewer sees
the same pages without the means to submit, upload or revoke, and the API refuses the page's
requests anyway. Every page is photographed into artifacts/dashboard/.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fedsky.controller.models.signing import verify_download
from fedsky.controller.onebox import Onebox
from fedsky.shared.net import free_port

from tests.test_jobs_e2e import HOSPITALS, _datasets, write_job
from tests.test_orchestrator_e2e import _fault

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROUNDS = 4
LONG = 300_000  # ms: a round on 2 busy cores, a failover


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Onebox, str]]:
    port = free_port()
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    onebox = Onebox(
        root=tmp_path_factory.mktemp("browser"),
        report_interval_s=2.0,
        poll_interval_s=0.5,
        agent_extra=extra,
        controller_extra=f'[api]\nlisten = "127.0.0.1:{port}"\nevents_interval_s = 0.5',
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox, f"https://127.0.0.1:{port}"
    finally:
        onebox.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # As root (CI) chromium needs --no-sandbox; the pages are ours, served on loopback.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield launched
        finally:
            launched.close()


class Problems(list[str]):
    """Uncaught errors and console errors of every page of a context (a refused request's own
    "Failed to load resource" line aside: the tests make some on purpose), CSP violations among
    them."""

    def watch(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.append(f"uncaught: {exc}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.append(message.text)


def _context(browser: Any) -> tuple[Any, Problems]:
    # The listener's certificate is from fedsky's own CA, which chromium's store does not hold.
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, ignore_https_errors=True, accept_downloads=True
    )
    problems = Problems()
    context.on("page", problems.watch)
    return context, problems


def _login(page: Any, url: str, token: str, who: str) -> None:
    page.goto(f"{url}/")
    page.fill("#login-token", token)
    page.click("#login-submit")
    page.wait_for_selector(f"#whoami:has-text('{who}')")


def _shot(page: Any, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays at the top of the picture
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _go(page: Any, name: str) -> None:
    page.click(f"nav a[data-page='{name}']")
    page.wait_for_selector(f"#page-{name}")


def _page_fetch(page: Any, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """A request from inside the logged-in page, with its session and CSRF token."""
    result: dict[str, Any] = page.evaluate(
        """async ([method, path, body]) => {
            const headers = {"X-CSRF-Token": sessionStorage.getItem("fedsky.csrf") || ""};
            if (body !== null) headers["Content-Type"] = "application/json";
            const r = await fetch(path, {method, headers,
                body: body === null ? undefined : JSON.stringify(body)});
            return {status: r.status, text: await r.text()};
        }""",
        [method, path, body],
    )
    return result


@pytest.mark.timeout(900)
def test_an_operator_follows_hospitals_clouds_placement_a_job_and_its_model(
    box: tuple[Onebox, str], browser: Any, tmp_path: Path
) -> None:
    onebox, url = box
    token = onebox.fedctl("users", "add", "ada", "--role", "admin").stdout.strip()
    context, problems = _context(browser)
    page = context.new_page()
    page.goto(f"{url}/")
    page.wait_for_selector("#login-token")
    _shot(page, "login")
    page.fill("#login-token", "fsk_wrong")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:not(:empty)")
    _login(page, url, token, "ada (admin)")

    # Overview: both hospitals online, their VMs counted.
    page.wait_for_selector("#card-hospitals:has-text('2')")
    assert page.locator("#card-vms").inner_text().strip()
    _shot(page, "overview")

    # Hospitals and VMs, with a job's minimums: each VM eligible or why not.
    _go(page, "hospitals")
    rows = page.locator("#vms-table tr[data-vm]")
    rows.first.wait_for()
    vms = sorted(rows.nth(i).get_attribute("data-vm") for i in range(rows.count()))
    assert vms == sorted(f"{a}/vm-00{n}" for a in HOSPITALS for n in range(1, 6)), vms
    page.fill("#min-vcpus", "2")
    page.fill("#min-memory", "4")
    page.fill("#min-disk", "0")
    page.click("#min-apply")
    page.wait_for_selector("#vms-table td.eligibility:has-text('eligible')")
    _shot(page, "hospitals")

    # Clouds: a malformed credential file is refused with the reason.
    _go(page, "clouds")
    bad = tmp_path / "credentials.csv"
    bad.write_text("this is,not\na credentials file\n")
    page.select_option("#cloud-kind", "aws")
    page.fill("#cloud-name", "prod")
    page.set_input_files("#cloud-file", str(bad))
    page.click("#cloud-upload")
    reason = page.inner_text("#cloud-result.bad .error-text")
    assert "not an AWS access-key file" in reason, reason
    assert page.locator("#clouds-table tr[data-cloud]").count() == 0
    _shot(page, "clouds")
    # Too large, and not text at all: refused with the reason; the controller goes on serving.
    for name, data, words in (
        ("huge.csv", b"a," * (300 << 10), "KiB"),
        ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "AWS"),
    ):
        page.evaluate("document.querySelector('#cloud-result').replaceChildren()")
        page.set_input_files(
            "#cloud-file", files=[{"name": name, "mimeType": "text/csv", "buffer": data}]
        )
        page.click("#cloud-upload")
        said = page.inner_text("#cloud-result.bad .error-text")
        assert words in said, (name, said)
    assert onebox.api.get("/v1/health")["status"] == "ok"

    # Placement: the limits form, the front drawn, the choice explained.
    _go(page, "placement")
    page.fill("#pl-model-mb", "26")
    page.fill("#pl-rounds", "20")
    page.fill("#pl-max-cost", "85000 KRW/month")
    page.fill("#pl-max-latency", "250")
    page.click("#pl-submit")
    page.wait_for_selector("#pl-plot canvas")
    page.wait_for_selector("#pl-choice:not(:empty)")
    assert "KRW" in page.inner_text("#pl-choice")
    _shot(page, "placement")

    # A job submitted from its files, followed live; a VM dies under it.
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=ROUNDS, round_timeout_s=90)
    _go(page, "jobs")
    # A model file that does not load is refused with the reason, and no job is made.
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_bytes(b"these are my notes, not weights")
    page.set_input_files("#job-spec", str(spec))
    page.set_input_files("#job-model", str(not_a_model))
    page.click("#job-submit")
    page.wait_for_selector("#job-error:has-text('does not load')")
    assert onebox.api.get("/v1/jobs") == []
    page.set_input_files("#job-spec", str(spec))
    page.set_input_files("#job-model", str(tmp_path / "digits.safetensors"))
    page.click("#job-submit")
    page.wait_for_selector("#page-job", timeout=60_000)
    job_id = page.url.rsplit("/", 1)[-1]
    chart = page.locator("#job-curves [data-metric='accuracy']")
    page.wait_for_function(
        "() => Number(document.querySelector(\"#job-curves [data-metric='accuracy']\")"
        "?.dataset.points || 0) >= 1",
        timeout=LONG,
    )
    first_points = int(chart.get_attribute("data-points") or 0)
    _shot(page, "job-running")

    # The hospitals page, in a second tab, sees the VM leave the running state.
    job = onebox.api.get(f"/v1/jobs/{job_id}")
    victim = next(
        t["vm"]
        for t in job["tasks"]
        if t["participant"] == "hospital-us" and t["state"] == "running"
    )
    watcher = context.new_page()
    watcher.goto(f"{url}/#/hospitals")
    cell = watcher.locator(f"#vms-table tr[data-vm='hospital-us/{victim}'] td.state")
    cell.wait_for()
    assert cell.inner_text().strip() == "running"
    _fault(onebox, "hospital-us", "destroy", victim)
    watcher.wait_for_function(
        f"() => document.querySelector(\"#vms-table tr[data-vm='hospital-us/{victim}'] "
        "td.state\")?.textContent.trim() !== 'running'",
        timeout=60_000,
    )
    _shot(watcher, "hospitals-vm-stopped")
    watcher.close()

    # The job page: the failover appears, the curves grow to the end.
    page.wait_for_function(
        "() => document.querySelectorAll('#job-tasks tr[data-participant=\"hospital-us\"]')"
        ".length >= 2",
        timeout=LONG,
    )
    page.wait_for_selector("#job-state:has-text('completed')", timeout=LONG)
    page.wait_for_function(
        f"() => document.querySelector(\"#job-curves [data-metric='accuracy']\")"
        f".dataset.points === '{ROUNDS}'",
        timeout=30_000,
    )
    assert int(chart.get_attribute("data-points") or 0) > first_points or first_points == ROUNDS
    assert page.inner_text("#job-rounds").strip().startswith(f"{ROUNDS}/{ROUNDS}")
    explain = page.inner_text("#job-explain")
    assert f"on {victim} (hospital-us): failed" in explain, explain
    _shot(page, "job")
    _go(page, "jobs")
    page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}'] td.state:has-text('completed')")
    _shot(page, "jobs")

    # Models: the recommended round downloaded, verified in the page and here.
    _go(page, "models")
    page.select_option("#models-job", job_id)
    page.wait_for_selector("#models-rounds tr[data-round]")
    page.wait_for_selector("#models-recommended:has-text('round')")
    with page.expect_download() as download_info:
        page.click("#models-download")
        page.wait_for_selector("#models-verify:has-text('verified')", timeout=60_000)
        page.click("a#models-file")
    assert page.inner_text("#models-verify").startswith("verified"), page.inner_text(
        "#models-verify"
    )
    weights = tmp_path / "best.safetensors"
    download_info.value.save_as(weights)
    recommended = int(page.inner_text("#models-recommended").split("round")[1].split()[0])
    metadata = tmp_path / "best.safetensors.meta.json"
    metadata.write_bytes(onebox.api.download(f"/v1/jobs/{job_id}/models/{recommended}/metadata")[0])
    key_pem = onebox.api.get("/v1/models/signing-key")["public_key_pem"]
    verified = verify_download(weights, metadata, load_pem_public_key(key_pem.encode()))
    assert verified.size == weights.stat().st_size
    _shot(page, "models")

    # A second job, cancelled from its page: the button goes with the job's end.
    _go(page, "jobs")
    page.set_input_files("#job-spec", str(spec))
    page.set_input_files("#job-model", str(tmp_path / "digits.safetensors"))
    page.click("#job-submit")
    page.wait_for_function(
        f"() => location.hash.startsWith('#/jobs/') && !location.hash.endsWith('{job_id}')"
    )
    page.wait_for_selector("#page-job #job-cancel")
    page.click("#job-cancel")
    page.wait_for_selector("#job-state:has-text('cancelled')", timeout=120_000)
    assert page.locator("#job-cancel").count() == 0
    _shot(page, "job-cancelled")

    # An admin revokes a hospital from its row (a second press confirms).
    _go(page, "hospitals")
    revoke = page.locator("#agents-table button[data-action='revoke'][data-agent='hospital-asia']")
    assert page.locator("#agents-table button[data-action='revoke']").count() == len(HOSPITALS)
    revoke.click()
    assert onebox.api.get("/v1/agents/hospital-asia")["state"] != "revoked"
    revoke.click()
    page.wait_for_selector("#revoke-result:has-text('Revoked hospital-asia')")
    page.wait_for_selector(
        "#agents-table tr[data-agent='hospital-asia'] td.state:has-text('revoked')"
    )
    assert onebox.api.get("/v1/agents/hospital-asia")["state"] == "revoked"
    context.close()
    assert problems == [], problems


def test_a_viewer_sees_but_cannot_submit_upload_or_revoke(
    box: tuple[Onebox, str], browser: Any
) -> None:
    onebox, url = box
    token = onebox.fedctl("users", "add", "vince", "--role", "viewer").stdout.strip()
    context, problems = _context(browser)
    page = context.new_page()
    # By keyboard alone: the token typed into the focused field, Enter, then Tab to a link.
    page.goto(f"{url}/")
    page.wait_for_selector("#login-token")
    for _ in range(10):
        if page.evaluate("document.activeElement?.id") == "login-token":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement?.id") == "login-token"
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    page.wait_for_selector("#whoami:has-text('vince (viewer)')")
    for _ in range(30):
        if page.evaluate("document.activeElement?.dataset?.page") == "jobs":
            break
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-jobs")
    assert page.locator("#job-submit-form").count() == 0
    _go(page, "clouds")
    assert page.locator("#cloud-upload").count() == 0
    _go(page, "hospitals")
    page.locator("#vms-table tr[data-vm]").first.wait_for()
    assert page.locator("#agents-table tr[data-agent]").count() >= 1
    assert page.locator("#agents-table button[data-action='revoke']").count() == 0
    _shot(page, "viewer-hospitals")
    # The page's own session asking anyway is refused by the API, which keeps serving.
    for method, path, body in (
        ("POST", "/v1/jobs", {"spec": {}, "model_digest": "0" * 64}),
        ("POST", "/v1/clouds/aws?name=x", None),
        ("POST", "/v1/agents/hospital-us/revoke", None),
        ("POST", "/v1/job-specs", None),
    ):
        answer = _page_fetch(page, method, path, body)
        assert answer["status"] == 403, (path, answer)
        assert "viewer" in json.loads(answer["text"])["error"]
    assert _page_fetch(page, "GET", "/v1/agents")["status"] == 200
    context.close()
    assert problems == [], problems
