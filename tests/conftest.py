"""Shared fixtures; the helpers behind them are in `tests/support`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fedsky.controller.security.pki import Pki

from tests.support import MqttBroker, broker_directory


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA in the test's own directory."""
    return Pki.init(tmp_path / "pki")


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory Mosquitto can read even after it drops root (tmp_path is 0700)."""
    with broker_directory() as path:
        yield path


@pytest.fixture
def mqtt_broker(pki: Pki, broker_dir: Path) -> Iterator[MqttBroker]:
    """A real Mosquitto with mutual TLS on a free loopback port, a unique topic prefix."""
    broker = MqttBroker.launch(pki=pki, directory=broker_dir)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned artifacts (aggregator and client) built once from this checkout, for the
    testbed's runs."""
    from benchmarks.testbed.smoke import ensure_wheelhouse

    directory = tmp_path_factory.mktemp("wheelhouse")
    ensure_wheelhouse(directory)
    return directory
