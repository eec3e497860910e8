"""Helpers shared by fedsky's tests: waiting for a condition, loopback ports (fedsky's own
`free_port`), certificate requests, a real Mosquitto with mutual TLS.

Fixtures (`pki`, `broker_dir`, `mqtt_broker`) live in `tests/conftest.py` and build on these.
"""

from fedsky.shared.net import free_port

from .csr import make_csr
from .mqtt import (
    ClientCredentials,
    MqttBroker,
    broker_directory,
    receive_until,
    unique_prefix,
    write_credentials,
)
from .wait import eventually, eventually_blocking

__all__ = [
    "ClientCredentials",
    "MqttBroker",
    "broker_directory",
    "eventually",
    "eventually_blocking",
    "free_port",
    "make_csr",
    "receive_until",
    "unique_prefix",
    "write_credentials",
]
