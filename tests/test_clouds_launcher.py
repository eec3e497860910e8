"""The `[clouds.launcher]` provider: an operator's command boots the aggregator machine with
the start-up script as its user data.

The command here is a real executable (a small Python program the test writes) that records
what it was given and answers as the protocol says; the controller's side is the real
`CloudService`, token store and start-up script renderer.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.clouds.base import AggregatorSpec, ProviderError
from fedsky.controller.clouds.launcher import BootedMachine, CommandLauncher, parse_launch_output
from fedsky.controller.clouds.settings import LauncherConfig
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from pydantic import ValidationError

from tests.fakes.clouds import HealthSwitch, assert_pinned_install, clouds_config, open_service

# The launcher: records argv and stdin per action, answers from a behaviour file.
LAUNCHER = r"""
import json, sys
from pathlib import Path
here = Path(sys.argv[0]).parent
action = sys.argv[1]
with (here / "calls.jsonl").open("a") as calls:
    stdin = sys.stdin.read() if action == "launch" else ""
    calls.write(json.dumps({"argv": sys.argv[1:], "stdin": stdin}) + "\n")
behaviour = json.loads((here / "behaviour.json").read_text())
answer = behaviour.get(action)
if isinstance(answer, dict) and "exit" in answer:
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer["exit"])
print(answer if isinstance(answer, str) else json.dumps(answer))
"""


class Launcher:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.program = directory / "launcher.py"
        self.program.write_text(LAUNCHER)
        self.behave(
            launch={"ref": "dc1/vm-7", "address": "192.0.2.40", "console": "/var/log/dc1/vm-7"},
            terminate={"state": "terminated"},
            list=[],
        )

    def behave(self, **answers: Any) -> None:
        path = self.directory / "behaviour.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(answers)
        path.write_text(json.dumps(current))

    @property
    def calls(self) -> list[dict[str, Any]]:
        path = self.directory / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def config(self, **changes: Any) -> LauncherConfig:
        values: dict[str, Any] = {
            "name": "dc1",
            "clouds": ("aws",),
            "command": (sys.executable, str(self.program)),
            "timeout_s": 30,
        }
        values.update(changes)
        return LauncherConfig(**values)


@pytest.fixture
def launcher(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path / "launcher")


@pytest.fixture
def service(tmp_path: Path, pki: Pki, launcher: Launcher) -> Any:
    health = HealthSwitch()
    config = clouds_config(launcher=launcher.config(), ready_timeout_s=1.0)
    service, store = open_service(tmp_path / "state", pki, config, health)
    yield service, health, store
    store.close()


SPEC = AggregatorSpec(
    job_id="job-l1",
    cloud="aws",
    region="eu-west-2",
    instance_type="t3.medium",
    allowed_sources=("198.51.100.0/24",),
)


def _tokens(store: Store, job_id: str) -> list[sqlite3.Row]:
    return store.call(
        lambda c: c.execute("SELECT * FROM bootstrap_tokens WHERE job_id = ?", (job_id,)).fetchall()
    )


async def test_placement_sees_the_launchers_clouds_and_launch_goes_to_it(service: Any) -> None:
    clouds, _, _ = service
    assert await clouds.linked_clouds() == ["aws"]
    provider = await clouds.provider_for_launch("aws", region="eu-west-2")
    assert isinstance(provider, CommandLauncher)
    assert provider.name == provider.account_name == "dc1"
    # A job launched by it is found again by its name (a restarted controller terminating it).
    assert isinstance(await clouds.provider("dc1"), CommandLauncher)
    with pytest.raises(ProviderError, match="no gcp account is linked"):
        await clouds.provider_for_launch("gcp", region="europe-west1")


async def test_launch_hands_the_start_up_script_over_stdin_and_binds_the_address(
    service: Any, launcher: Launcher, tmp_path: Path
) -> None:
    clouds, health, store = service
    provider = await clouds.provider_for_launch("aws", region="eu-west-2")
    handle = await provider.launch(SPEC)

    assert handle.provider == "dc1"
    assert handle.ref == "dc1/vm-7"
    assert handle.address == "192.0.2.40:9092"
    assert health.calls[-1] == "192.0.2.40:9092"
    (call,) = launcher.calls
    assert call["argv"] == [
        "launch",
        "--job", "job-l1",
        "--cloud", "aws",
        "--region", "eu-west-2",
        "--instance-type", "t3.medium",
        "--allow", "198.51.100.0/24",
    ]  # fmt: skip
    script = call["stdin"]
    assert script.startswith("#!/bin/bash")
    assert_pinned_install(script, tmp_path / "state")
    # The one-time token travels in the script only, never on a command line.
    (token_row,) = _tokens(store, "job-l1")
    assert "fsk1_" in script
    assert not any("fsk1_" in arg for arg in call["argv"])
    # The certificate the machine enrols for will name the address the launcher reported.
    assert json.loads(token_row["ip_addresses"]) == ["192.0.2.40"]

    await provider.terminate(handle)
    assert launcher.calls[-1]["argv"] == ["terminate", "--job", "job-l1", "--ref", "dc1/vm-7"]
    assert _tokens(store, "job-l1")[0]["revoked_at"] is not None


async def test_a_failing_launcher_says_why_without_the_token(
    service: Any, launcher: Launcher
) -> None:
    clouds, _, store = service
    provider = await clouds.provider_for_launch("aws", region="eu-west-2")
    # A launcher that echoes its user data into its error must not leak the token.
    launcher.behave(launch={"exit": 3, "stderr": "boot failed\nno capacity for fsk1_abcDEF123\n"})
    with pytest.raises(ProviderError) as failed:
        await provider.launch(SPEC)
    assert "exit 3: no capacity for fsk1_***" in str(failed.value)
    assert "abcDEF123" not in str(failed.value)
    # Nothing can enrol with the script's token any more.
    assert all(row["revoked_at"] is not None for row in _tokens(store, "job-l1"))


@pytest.mark.parametrize(
    ("printed", "reason"),
    [
        ("", "did not print a JSON object"),
        ("booting...", "did not print a JSON object"),
        ('{"ref": "vm 1; rm -rf /", "address": "192.0.2.1"}', "unusable ref"),
        ('{"ref": "vm-1"}', "no address"),
        ('{"ref": "vm-1", "address": "0.0.0.0"}', "which no one can connect to"),
        ('{"ref": "vm-1", "address": "not a host!"}', "not an address"),
    ],
)
def test_what_the_launcher_prints_is_checked(printed: str, reason: str) -> None:
    with pytest.raises(ProviderError, match=reason):
        parse_launch_output(printed)


def test_a_host_name_is_an_address_too() -> None:
    machine = parse_launch_output('log line\n{"ref": "r/1", "address": "agg.dc1.example"}')
    assert machine == BootedMachine(ref="r/1", host="agg.dc1.example", is_ip=False, console=None)
    assert machine.address(9092) == "agg.dc1.example:9092"
    v6 = parse_launch_output('{"ref": "r/2", "address": "2001:db8::7", "console": "/log"}')
    assert v6 == BootedMachine(ref="r/2", host="2001:db8::7", is_ip=True, console="/log")
    assert v6.address(9092) == "[2001:db8::7]:9092"


async def test_a_machine_that_never_answers_is_ended(service: Any, launcher: Launcher) -> None:
    clouds, health, store = service
    health.ok = False
    provider = await clouds.provider_for_launch("aws", region="eu-west-2")
    with pytest.raises(ProviderError, match="/var/log/dc1/vm-7"):
        await provider.launch(SPEC)
    assert [c["argv"][0] for c in launcher.calls] == ["launch", "terminate"]
    assert all(row["revoked_at"] is not None for row in _tokens(store, "job-l1"))


async def test_the_orphan_sweep_ends_machines_of_jobs_no_longer_active(
    service: Any, launcher: Launcher
) -> None:
    clouds, _, _ = service
    launcher.behave(
        list=[{"job": "job-old", "ref": "dc1/vm-1"}, {"job": "job-now", "ref": "dc1/vm-2"}]
    )
    swept = await clouds.sweep_orphans(["job-now"])
    assert swept == ["dc1:dc1/vm-1"]
    assert launcher.calls[-1]["argv"] == ["terminate", "--job", "job-old", "--ref", "dc1/vm-1"]


async def test_an_account_cannot_take_the_launchers_name(service: Any) -> None:
    from fedsky.controller.clouds.errors import AccountExists

    clouds, _, _ = service
    with pytest.raises(AccountExists, match="launcher"):
        await clouds.add(cloud="aws", data=b"x", name="dc1")


def test_the_launcher_is_configured_with_an_absolute_program(launcher: Launcher) -> None:
    with pytest.raises(ValidationError, match="absolute path"):
        launcher.config(command=("boot-vm", "--pool", "a"))
    with pytest.raises(ValidationError):
        launcher.config(clouds=())
    with pytest.raises(ValidationError):
        launcher.config(name="Not A Name")
