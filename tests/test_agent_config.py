"""The agent's config file: defaults, relative paths, and errors naming the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedsky.agent.config import AgentConfig, load_agent_config, resolve_identity
from fedsky.controller.security.pki import Pki
from fedsky.shared.config import ConfigError

from tests.agent_support import enrol


def _cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_agent_config(
        _cfg(
            tmp_path,
            'state_dir = "st"\n[status]\nmode = "0640"\n'
            '[tls]\nkey_file = "keys/k.pem"\n[test]\nfault_socket = "f.sock"\n',
        )
    )
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.libvirt.uri == "qemu:///system"
    assert cfg.status_socket == tmp_path / "st" / "agent.sock"
    assert cfg.status_file == tmp_path / "st" / "status.json"
    assert cfg.status.mode == 0o640
    assert cfg.key_file == tmp_path / "keys" / "k.pem"
    assert cfg.cert_file == tmp_path / "st" / "agent.crt"
    assert cfg.test is not None
    assert cfg.test.fault_socket == tmp_path / "f.sock"
    assert AgentConfig().test is None  # the fault hook is off unless a test config asks for it


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("report_interval_s = -1\n", "report_interval_s", "greater than 0"),
        ("poll_interval_s = 'often'\n", "poll_interval_s", "valid number"),
        ("agent_id = 'controller'\n", "agent_id", "reserved"),
        ("agent_id = 'Bad_Id'\n", "agent_id", "invalid"),
        ("colour = 'blue'\n", "colour", "unknown key"),
        ("[broker]\nport = 70000\n", "broker.port", "less than or equal to 65535"),
        ("[broker]\nreconnect_base_s = 5\nreconnect_cap_s = 1\n", "broker", "reconnect_cap_s"),
        ("[status]\nmode = 660\n", "status.mode", "less than or equal to 511"),
        ("[status]\nmode = 'rw'\n", "status.mode", "octal"),
        ("[libvirt]\nurl = 'qemu:///system'\n", "libvirt.url", "unknown key"),
        ("[test]\nfault_socket = '" + "x" * 120 + "'\n", "test.fault_socket", "too long"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = _cfg(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"key '{key}'" in message
    assert what in message


def test_not_toml_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(_cfg(tmp_path, "state_dir = \n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_agent_config(tmp_path / "nope.toml")


def test_identity_needs_enrolment_and_agreement(tmp_path: Path) -> None:
    cfg = load_agent_config(_cfg(tmp_path, 'state_dir = "state"\nagent_id = "hospital-us"\n'))
    with pytest.raises(ConfigError, match="not enrolled"):
        resolve_identity(cfg)
    enrol(
        pki=Pki.init(tmp_path / "ca"),
        state_dir=tmp_path / "state",
        agent_id="hospital-eu",
        broker_port=1883,
        topic_prefix="t/x",
    )
    with pytest.raises(ConfigError, match="does not match the enrolled identity 'hospital-eu'"):
        resolve_identity(cfg)
    cfg = load_agent_config(_cfg(tmp_path, 'state_dir = "state"\n[broker]\nport = 9999\n'))
    ident = resolve_identity(cfg)
    assert (ident.agent_id, ident.broker_port, ident.topic_prefix) == ("hospital-eu", 9999, "t/x")


def test_daemon_exits_78_on_a_bad_config(tmp_path: Path) -> None:
    path = _cfg(tmp_path, "report_interval_s = 0\n")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "fedsky-agent"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert proc.returncode == 78, proc.stderr
    assert f"{path}: key 'report_interval_s'" in proc.stderr
    # Enrolment missing is a configuration problem too, with the next step named.
    path = _cfg(tmp_path, 'state_dir = "empty"\n')
    proc = subprocess.run(
        [str(bin_dir / "fedsky-agent"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert "agentctl enroll" in proc.stderr
