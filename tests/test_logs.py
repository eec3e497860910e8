"""The daemons' log lines: text for people, or one JSON object per line on request."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fedsky.shared.logs import FORMAT_ENV, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_level_logger_message_and_exception(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FORMAT_ENV, raising=False)
    setup_logging("INFO", "json")
    log = logging.getLogger("fedsky.test")
    log.info("agent %s is %s", "hospital-a", "online")
    try:
        raise ValueError("bad report")
    except ValueError:
        log.exception("storing failed")
    log.debug("not shown at INFO")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["level"], x["logger"], x["message"]) for x in lines] == [
        ("INFO", "fedsky.test", "agent hospital-a is online"),
        ("ERROR", "fedsky.test", "storing failed"),
    ]
    assert "ValueError: bad report" in lines[1]["exception"]
    assert lines[0]["time"].endswith("+00:00")


def test_the_environment_chooses_the_format(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FORMAT_ENV, "json")
    setup_logging("INFO", "text")
    logging.getLogger("fedsky.test").warning('quoted "text"')
    assert json.loads(capsys.readouterr().err)["message"] == 'quoted "text"'
    monkeypatch.setenv(FORMAT_ENV, "text")
    setup_logging("INFO", "json")
    logging.getLogger("fedsky.test").warning("plain")
    assert capsys.readouterr().err.rstrip().endswith("WARNING fedsky.test: plain")
