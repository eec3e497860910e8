"""A participant's SuperNode: its node keys and its command line.

Node keys are P-384 ECDSA in OpenSSH format, made where they are used (by the agent); only the
public key leaves the hospital, to be registered on the job's SuperLink. The command line is
the same on the agent's host (`local` executor) and inside a VM (`ssh` executor), with the
paths as seen where it runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedsky.shared.ids import check_agent_id

# fedsky's SuperNode: Flower's, refusing every app but fedsky's own, pinned by digest where it
# runs (`fedsky.shared.flower.pinned_supernode`). Its name keeps "flower-supernode" in it.
SUPERNODE_EXECUTABLE = "fedsky-flower-supernode"
# fedsky's SuperNode presents this certificate (the controller's, over the node key) to the
# aggregator's front, which serves the Fleet API only to such certificates.
NODE_CERT_FLAG = "--fedsky-node-cert"

# How long a SuperNode keeps trying to reach an aggregator that does not answer before it gives
# up (and its executor reports the task failed) instead of retrying for ever.
DEFAULT_MAX_WAIT_S = 120.0

_NODE_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SuperNodeConfigError(ValueError):
    """A SuperNode setting that cannot be put on its command line."""


@dataclass(frozen=True)
class NodeKeyPair:
    private_key: Path
    public_key: Path

    def public_text(self) -> str:
        return self.public_key.read_text().strip()


def generate_node_key(directory: Path, name: str = "node") -> NodeKeyPair:
    """Make a P-384 key pair: `<name>` (OpenSSH private key, 0600) and `<name>.pub`."""
    # Imported here: the agent daemon loads this module at start, and cryptography is several
    # MB of resident memory it otherwise needs only when a task arrives.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = directory / name
    pub = directory / f"{name}.pub"
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return NodeKeyPair(private_key=priv, public_key=pub)


def node_config_arg(config: Mapping[str, str | int | float | bool]) -> str:
    """`--node-config` text: `key="string" key=3 key=true`, checked so nothing can break out."""
    parts = []
    for key, value in config.items():
        if not _NODE_CONFIG_KEY.match(key):
            raise SuperNodeConfigError(f"node config key {key!r} is not a plain name")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if any(c in value for c in "\"'\n\r\\") or not value.strip() or value != value.strip():
                raise SuperNodeConfigError(
                    f"node config value for {key!r} has quotes, backslashes or edge spaces"
                )
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    # Strings are quoted, so the text never ends in ".toml" (which Flower would read as a file).
    return " ".join(parts)


@dataclass(frozen=True)
class SuperNodeCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the inherited environment


def supernode_command(
    *,
    superlink: str,
    root_ca: Path,
    private_key: Path,
    site: str,
    dataset_config: Path,
    runtime_port: int,
    flwr_home: Path,
    node_config: Mapping[str, str | int | float | bool] | None = None,
    executable: str = SUPERNODE_EXECUTABLE,
    max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
    bin_dir: str | None = None,
    node_cert: Path | None = None,
) -> SuperNodeCommand:
    """The command line and environment of one participant's SuperNode.

    `superlink` is the aggregator's host:port; `runtime_port` the SuperNode's local Runtime API
    port (distinct per SuperNode on one host); `dataset_config` the dataset catalog the
    ClientApp reads (fedsky.shared.datasets); `bin_dir` the directory of the Flower scripts
    where it runs, put first on PATH (the SuperNode starts `flower-superexec` by name);
    `node_cert` the node's TLS certificate for the aggregator's front (fedsky's SuperNode only).
    """
    check_agent_id(site)
    if not 0 < runtime_port < 65536:
        raise SuperNodeConfigError(f"runtime port {runtime_port} is out of range")
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SuperNodeConfigError(f"aggregator address {superlink!r} is not host:port")
    cfg: dict[str, str | int | float | bool] = {"site": site, "dataset-config": str(dataset_config)}
    cfg.update(node_config or {})
    argv = [
        executable,
        "--superlink",
        superlink,
        "--root-certificates",
        str(root_ca),
        "--auth-supernode-private-key",
        str(private_key),
        "--node-config",
        node_config_arg(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if max_wait_s is not None:
        argv += ["--max-wait-time", f"{max_wait_s:g}"]
    if node_cert is not None:
        argv += [NODE_CERT_FLAG, str(node_cert)]
    env = {
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        # The SuperNode's SuperExec polls for each message's ClientApp process to start every
        # second by default; 0.2 s takes about 0.4 s off every message on average.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
    }
    if bin_dir:
        env["PATH"] = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return SuperNodeCommand(argv=argv, env=env)
