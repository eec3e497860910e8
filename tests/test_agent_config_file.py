"""`agentctl enroll BUNDLE` records the agent's identity in its config file: an existing file
(the package's conffile, one hospital IT edited) keeps its comments and keys, a missing one is
created, and a bundle for another name is refused unless forced."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from fedsky.agent import cli
from fedsky.agent.config import load_agent_config
from fedsky.agent.config_file import ConfigFileError, record, set_top_level
from fedsky.controller.security.pki import Pki

from tests.test_agent_enroll import _bundle

CONFFILE = """\
# fedsky agent, edited by hospital IT
state_dir = "STATE"   # where the certificates go

[libvirt]
uri = "test:///default"
# keep this comment
"""


def _signed_bundle(pki: Pki, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A bundle for `name` with the key made beside it (`fedctl agents enroll --with-key`)."""
    bundle, key_pem = _bundle(pki, name, None)
    assert key_pem is not None
    key = tmp_path / f"{name}.key"
    key.write_bytes(key_pem)
    path = tmp_path / f"{name}.bundle.json"
    path.write_text(bundle.dump())
    return path, key


def test_a_new_key_goes_before_the_first_table_and_everything_else_stays() -> None:
    edited = set_top_level(CONFFILE, {"agent_id": "hospital-x"})
    assert edited.splitlines()[:4] == [
        "# fedsky agent, edited by hospital IT",
        'state_dir = "STATE"   # where the certificates go',
        "",
        'agent_id = "hospital-x"',
    ]
    assert "# keep this comment" in edited
    assert tomllib.loads(edited) == {**tomllib.loads(CONFFILE), "agent_id": "hospital-x"}
    # Set again: the line is replaced, not added twice.
    again = set_top_level(edited, {"agent_id": "hospital-y"})
    assert again.count("agent_id") == 1
    assert tomllib.loads(again)["agent_id"] == "hospital-y"
    # A file with no table at all takes the key at its end.
    assert tomllib.loads(set_top_level('log_level = "INFO"\n', {"agent_id": "a-b"})) == {
        "log_level": "INFO",
        "agent_id": "a-b",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("state_dir = \n", "not valid TOML"),
        # A key that only looks top-level inside a multi-line string: the edit would change the
        # string, so nothing is written.
        ('note = """\nagent_id = "x"\n"""\n[libvirt]\n', "add `agent_id"),
    ],
)
def test_a_file_that_cannot_be_edited_safely_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigFileError, match=message):
        set_top_level(text, {"agent_id": "hospital-x"})


def test_record_creates_keeps_mode_and_says_unchanged(tmp_path: Path) -> None:
    created = record(tmp_path / "etc" / "agent.toml", {"agent_id": "hospital-x"})
    assert created.outcome == "created"
    assert stat.S_IMODE(created.path.stat().st_mode) == 0o640
    assert load_agent_config(created.path).agent_id == "hospital-x"

    existing = tmp_path / "agent.toml"
    existing.write_text(CONFFILE)
    existing.chmod(0o644)
    assert record(existing, {"agent_id": "hospital-x"}).outcome == "updated"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o644
    assert record(existing, {"agent_id": "hospital-x"}).outcome == "unchanged"


def test_agentctl_enroll_writes_the_config_and_refuses_another_name(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(CONFFILE.replace("STATE", str(state)))
    bundle, key = _signed_bundle(pki, tmp_path, "hospital-x")
    assert cli.main(["--config", str(config), "enroll", str(bundle), "--key", str(key)]) == 0
    assert f"config {config}: updated (agent_id = hospital-x)" in capsys.readouterr().out
    loaded = load_agent_config(config)
    assert loaded.agent_id == "hospital-x"
    assert loaded.state_dir == state
    assert "# keep this comment" in config.read_text()
    assert (state / "agent.crt").exists()

    # A bundle for another name: refused, nothing installed or written; --force re-enrols.
    other, other_key = _signed_bundle(pki, tmp_path, "hospital-z")
    cert_before = (state / "agent.crt").read_bytes()
    assert cli.main(["--config", str(config), "enroll", str(other), "--key", str(other_key)]) == 1
    assert "names agent 'hospital-x' but this bundle is for 'hospital-z'" in (
        capsys.readouterr().err
    )
    assert (state / "agent.crt").read_bytes() == cert_before
    assert load_agent_config(config).agent_id == "hospital-x"
    assert (
        cli.main(
            ["--config", str(config), "enroll", str(other), "--key", str(other_key), "--force"]
        )
        == 0
    )
    assert load_agent_config(config).agent_id == "hospital-z"

    # A config named but missing is created, with the state dir the enrolment used.
    fresh = tmp_path / "fresh" / "agent.toml"
    elsewhere = tmp_path / "elsewhere"
    args = ["--config", str(fresh), "enroll", str(bundle), "--key", str(key)]
    assert cli.main([*args, "--state-dir", str(elsewhere)]) == 0
    written = load_agent_config(fresh)
    assert (written.agent_id, written.state_dir) == ("hospital-x", elsewhere)


def test_an_edit_keeps_comments_line_endings_and_a_value_already_right() -> None:
    crlf = 'log_level = "INFO"\r\nagent_id = "hospital-x"  # ticket 42\r\n[libvirt]\r\n'
    edited = set_top_level(crlf, {"agent_id": "hospital-y"})
    assert edited == 'log_level = "INFO"\r\nagent_id = "hospital-y"  # ticket 42\r\n[libvirt]\r\n'
    # A `#` inside the value is not the comment.
    hashed = set_top_level('agent_id = "a#b"  # why\n', {"agent_id": "c"})
    assert hashed == 'agent_id = "c"  # why\n'
    # The same value, however it is written, leaves the line alone.
    single = "agent_id = 'hospital-x'  # set by hand\n"
    assert set_top_level(single, {"agent_id": "hospital-x"}) == single


def test_record_says_unchanged_for_the_same_value_and_writes_any_character(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("agent_id = 'hospital-x'  # set by hand\n")
    assert record(config, {"agent_id": "hospital-x"}).outcome == "unchanged"
    assert config.read_text() == "agent_id = 'hospital-x'  # set by hand\n"
    odd = tmp_path / "new.toml"
    value = '/srv/f\U0001f680 "quoted" \\ tab\t'
    record(odd, {"state_dir": value})
    assert tomllib.loads(odd.read_text())["state_dir"] == value
