"""Mosquitto's files for fedsky: its config, its ACL and its server certificate, from the PKI.

The broker's identity rules are the bus's security: every client shows a certificate from
fedsky's CA (`require_certificate`), its CN becomes its MQTT username
(`use_identity_as_username`), and the ACL lets each identity touch only its own topics (every
topic string comes from `fedsky.shared.topics`):

- an agent writes `<prefix>/agents/<its id>/up/{report,status,events}` and reads
  `<prefix>/agents/<its id>/down/#`;
- an aggregator (`agg-<job>`) writes `<prefix>/aggregators/<its id>/up/{metrics,status}`;
- the controller reads every `up` and writes every `down`.

Mosquitto's `pattern` lines apply to every user (the controller too), and a pattern cannot say
"only users whose name starts with agg-": so any identity may also write its own aggregator's
and agent's channels. No identity can ever write under another's name; the consumer must still
check that the sender's id fits the subtree (`check_agent_id` under `agents`,
`is_aggregator_id` under `aggregators`). The client id is the CN too
(`use_username_as_clientid`): a certificate cannot take over another client's session.

Mosquitto 2.0 loads its CRL at start. A reload (SIGHUP) applies a new CRL to new connections
only: a revoked client that is already connected stays connected. So the managed broker also
loads the dynamic-security plugin, through which the controller cuts one identity's sessions
(`DYNSEC_COMMANDS`; only the controller may write there); without the plugin it is restarted
(`ManagedBroker.restart`, which copies the current CRL in first) and every client reconnects,
the revoked one refused. See `fedsky.controller.security.revocation`. An external broker's
operator must reload and restart by hand (`external_revocation_instructions`).

Running as root: Mosquitto drops to the `mosquitto` user before it reads its key, ACL and CRL
(and writes its persistence). Rather than `user root` (a network daemon keeping root), the
broker directory is group `mosquitto` (0750), the key and ACL 0640 root:mosquitto, and the
persistence directory owned by `mosquitto`. Every directory above must let that user through;
when one does not (a 0700 state directory), the files go to a root-owned runtime directory
(`/run/fedsky/broker-<hash>`) rather than opening the state directory to the broker's user.
Run by another user, Mosquitto keeps that user and the files stay private to it (0700/0600).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fedsky.controller.security.pki import Pki, PkiError
from fedsky.shared.files import atomic_write
from fedsky.shared.ids import CONTROLLER_ID
from fedsky.shared.messages import MAX_PAYLOAD_BYTES
from fedsky.shared.topics import ACL_USERNAME, Topics

log = logging.getLogger(__name__)

MOSQUITTO_USER = "mosquitto"
SERVER_CN = "fedsky-broker"
# Renew the broker's certificate when less than this is left.
SERVER_RENEW_BEFORE = timedelta(days=30)

# Limits. One payload bound for the broker and every consumer (MAX_PAYLOAD_BYTES) plus room
# for the topic and MQTT 5 properties.
MAX_PACKET_SIZE = MAX_PAYLOAD_BYTES + 64 * 1024
# QoS 1 messages the broker has in flight to one client before it queues.
MAX_INFLIGHT_MESSAGES = 100
# Per client, while it is offline (persistent session) or slow. Only the controller's session
# can build a large backlog (every agent's reports while it restarts: 2,000 agents x 1 report
# per 10 s is 12,000 messages in a minute); agents only ever receive their own commands.
MAX_QUEUED_MESSAGES = 20_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Sessions of clients that never come back are dropped after this.
PERSISTENT_CLIENT_EXPIRATION = "7d"

_CONF = "mosquitto.conf"
_ACL = "acl"
_CA = "ca.crt"
_CRL = "crl.pem"
_CERT = "server.crt"
_KEY = "server.key"
_DATA = "data"
# Written and removed by the supervisor (`fedsky.controller.bus.supervisor`).
_PIDFILE = "mosquitto.pid"
# Where the broker's files go, as root, when Mosquitto's user cannot reach the broker_dir.
RUNTIME_ROOT = Path("/run/fedsky")


# Mosquitto's dynamic-security plugin, loaded only to cut a revoked client's live session
# (`deleteClient` closes every connection of that username at once, without a restart). The
# ACL file still decides what each identity may do: the plugin's own default access allows
# everything and it holds no clients, so it adds no rule of its own.
DYNSEC_PLUGIN_PATHS = (
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
)
DYNSEC_COMMANDS = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSES = "$CONTROL/dynamic-security/v1/response"
_DYNSEC_DIR = "dynsec"
_DYNSEC_FILE = "dynamic-security.json"
DYNSEC_NEUTRAL = {
    "defaultACLAccess": {
        "publishClientSend": True,
        "publishClientReceive": True,
        "subscribe": True,
        "unsubscribe": True,
    },
    "clients": [],
    "groups": [],
    "roles": [],
}


def find_dynsec_plugin() -> Path | None:
    """The dynamic-security plugin of the installed Mosquitto, or None."""
    return next((path for path in DYNSEC_PLUGIN_PATHS if path.is_file()), None)


class BrokerError(Exception):
    """The broker cannot be prepared or kept running; the message says why."""


# --- rendering ----------------------------------------------------------------------------


def render_acl(*, topic_prefix: str, controller_id: str = CONTROLLER_ID) -> str:
    """The ACL: each identity (certificate CN = username) touches only its own topics."""
    p = topic_prefix.rstrip("/")
    if not p or any(c in p for c in "+#%\n") or not controller_id.isprintable():
        raise BrokerError(f"topic prefix {topic_prefix!r} cannot be used in an ACL")
    topics = Topics(p)
    return "\n".join(
        [
            "# fedsky broker ACL: generated by the controller, edits are overwritten.",
            "# Certificate CN = username (%u). Agents and aggregators: own subtree only.",
            "",
            f"user {controller_id}",
            f"topic read {topics.all_agents_up}",
            f"topic read {topics.all_aggregators_up}",
            f"topic write {topics.all_agents_down}",
            "# The dynamic-security plugin's commands (a revoked session is cut with them).",
            f"topic write {DYNSEC_COMMANDS}",
            f"topic read {DYNSEC_RESPONSES}",
            "",
            "# Apply to every user, the controller too: it has no agent or aggregator subtree",
            "# of its own to use, and no one can take its name.",
            "# Only the channels the controller reads: nothing else to park retained messages on.",
            f"pattern write {topics.report(ACL_USERNAME)}",
            f"pattern write {topics.status(ACL_USERNAME)}",
            f"pattern write {topics.events(ACL_USERNAME)}",
            f"pattern read {topics.agent_down(ACL_USERNAME)}",
            f"pattern write {topics.aggregator_metrics(ACL_USERNAME)}",
            f"pattern write {topics.aggregator_status(ACL_USERNAME)}",
            "",
        ]
    )


def render_config(
    *,
    host: str,
    port: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    crl_file: Path,
    acl_file: Path,
    persistence_dir: Path | None = None,
    run_as: str | None = None,
    debug_log: bool = False,
    dynsec_plugin: Path | None = None,
    dynsec_config: Path | None = None,
) -> str:
    """`mosquitto.conf` for one mutual-TLS listener (TLS 1.2 at least) and nothing else."""
    lines = [
        "# fedsky broker: generated by the controller, edits are overwritten.",
        "per_listener_settings true",
        "",
        "# Logs go to stderr, where the controller reads them (stdout is block-buffered).",
        "log_dest stderr",
        "log_timestamp false",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if debug_log:
        lines.append("log_type debug")  # shows "Denied PUBLISH" lines
    lines += [
        "connection_messages true",
        "",
        f"max_packet_size {MAX_PACKET_SIZE}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        "set_tcp_nodelay true",
    ]
    if run_as is not None:
        lines.append(f"user {run_as}")
    if persistence_dir is not None:
        lines += [
            "persistence true",
            # Mosquitto wants the trailing slash.
            f"persistence_location {str(persistence_dir).rstrip('/')}/",
            "autosave_interval 60",
        ]
    else:
        lines.append("persistence false")
    lines += [
        "",
        f"listener {port} {host}",
        "protocol mqtt",
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        # The client id becomes the username (the certificate's CN), whatever the client asked
        # for: a certificate can only ever take over its own session, never another client's.
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        f"cafile {ca_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
        f"crlfile {crl_file}",
        f"acl_file {acl_file}",
    ]
    if dynsec_plugin is not None and dynsec_config is not None:
        lines += [f"plugin {dynsec_plugin}", f"plugin_opt_config_file {dynsec_config}"]
    lines.append("")
    paths = (ca_file, cert_file, key_file, crl_file, acl_file, persistence_dir, dynsec_plugin)
    for path in (*paths, dynsec_config):
        if path is not None and any(c in str(path) for c in "\n\r"):
            raise BrokerError(f"path {str(path)!r} cannot be written into mosquitto.conf")
    return "\n".join(lines)


def external_revocation_instructions(*, crl_path: Path) -> str:
    """What the operator of an external broker must do after a revocation."""
    return (
        f"The CRL was updated: {crl_path}. The external broker does not know yet. Copy this file "
        "to the broker, over the file its `crlfile` option names, then restart the broker "
        "(e.g. `systemctl restart mosquitto`). Mosquitto 2.0 loads its CRL at start; a reload "
        "(SIGHUP) checks new connections against it but leaves a revoked client that is already "
        "connected online, so restart. Until then the revoked certificate still works."
    )


# --- files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerFiles:
    """Everything Mosquitto reads, in one directory, as `prepare_broker_files` left it."""

    directory: Path
    conf_file: Path
    acl_file: Path
    # The dynamic-security plugin is loaded (a revoked session can be cut without a restart).
    dynsec: bool
    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    persistence_dir: Path | None
    host: str
    port: int
    topic_prefix: str
    server_not_after: datetime
    crl_source: Path  # the PKI's CRL, copied in before every start
    group_id: int | None  # the `mosquitto` group when run as root, else None
    # The files are a copy under the runtime root (the state directory was closed to the
    # broker's user): the broker's supervisor removes them, server key included, when it stops.
    runtime_copy: bool = False

    @property
    def pid_file(self) -> Path:
        return self.directory / _PIDFILE

    def install_crl(self) -> bool:
        """Copy the PKI's current CRL into the broker directory; True when it changed."""
        try:
            data = self.crl_source.read_bytes()
        except OSError as exc:
            raise BrokerError(f"cannot read the CRL {self.crl_source}: {exc.strerror}") from None
        try:
            if self.crl_file.read_bytes() == data:
                return False
        except OSError:
            pass
        atomic_write(self.crl_file, data, mode=0o644)
        return True


def _mosquitto_ids() -> tuple[int, int] | None:
    """(uid, gid) Mosquitto drops to when started as root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(MOSQUITTO_USER)
    except KeyError:
        raise BrokerError(
            f"running as root, Mosquitto drops to the user {MOSQUITTO_USER!r}, which does not "
            "exist: install the mosquitto package (it creates the user) or run the controller as "
            "an unprivileged user"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _can_traverse(path: Path, uid: int, gids: set[int]) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _blocker(directory: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to `directory` (itself included) the user cannot pass."""
    gids = {gid} | {g.gr_gid for g in grp.getgrall() if MOSQUITTO_USER in g.gr_mem}
    resolved = directory.resolve()
    for step in [*reversed(resolved.parents), resolved]:
        if not _can_traverse(step, uid, gids):
            return step
    return None


def _runtime_dir(root: Path, broker_dir: Path) -> Path:
    """A root-owned directory for the broker's files, one per broker_dir, under `root`."""
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    name = "broker-" + hashlib.sha256(str(broker_dir.resolve()).encode()).hexdigest()[:16]
    directory = root / name
    directory.mkdir(exist_ok=True, mode=0o700)
    for path in (root, directory):
        st = os.lstat(path)
        # Nobody else may have made or be able to change what Mosquitto will trust.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise BrokerError(f"{path} must be a directory owned by root and writable only by it")
    return directory


def _wanted_names(host: str, public_names: Sequence[str]) -> tuple[list[str], list[str]]:
    dns = ["localhost"]
    ips = ["127.0.0.1", "::1"]
    for name in (host, *public_names):
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if name and name not in dns:
                dns.append(name.lower())
            continue
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
    return dns, ips


def _server_certificate(
    pki: Pki,
    cert_file: Path,
    key_file: Path,
    names: tuple[list[str], list[str]],
    gid: int | None,
) -> tuple[datetime, bool]:
    """The broker's certificate for `names` (DNS, IPs): kept while valid for another 30 days,
    else issued; its not_after, and whether it was issued now."""
    dns, ips = names
    # 0600, or 0640 root:mosquitto as root, from the file's creation on.
    private_mode = 0o600 if gid is None else 0o640
    not_after = _reusable(pki, cert_file, key_file, dns, ips)
    if not_after is not None:
        if gid is not None:
            os.chown(key_file, -1, gid)
            os.chmod(key_file, private_mode)
        return not_after, False
    issued = pki.issue(common_name=SERVER_CN, kind="server", dns_names=dns, ip_addresses=ips)
    assert issued.key_pem is not None
    atomic_write(key_file, issued.key_pem, mode=private_mode, group=gid)
    atomic_write(cert_file, issued.cert_pem, mode=0o644)
    log.info("issued the broker's certificate for %s", ", ".join([*dns, *ips]))
    return issued.not_after, True


def refresh_server_certificate(
    files: BrokerFiles, pki: Pki, public_names: Sequence[str] = ()
) -> bool:
    """Reissue the running broker's certificate when due (written where it reads it); True when
    it was. The broker takes it on SIGHUP (`ManagedBroker.reload_certificates`)."""
    _, issued = _server_certificate(
        pki,
        files.cert_file,
        files.key_file,
        _wanted_names(files.host, public_names),
        files.group_id,
    )
    return issued


def _reusable(
    pki: Pki, cert_file: Path, key_file: Path, dns: Sequence[str], ips: Sequence[str]
) -> datetime | None:
    """The not_after of the broker's current certificate if it can stay, else None."""
    try:
        pem = cert_file.read_bytes()
        info = pki.verify(pem)
        cert = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, PkiError):
        return None
    if cert.public_key() != key.public_key():
        return None
    if info.not_after - datetime.now(UTC) < SERVER_RENEW_BEFORE:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    if not set(dns) <= have_dns or not set(ips) <= have_ips:
        return None
    return info.not_after


def prepare_broker_files(
    *,
    pki: Pki,
    broker_dir: Path,
    host: str,
    port: int,
    topic_prefix: str,
    public_names: Sequence[str] = (),
    controller_id: str = CONTROLLER_ID,
    persistence: bool = True,
    debug_log: bool = False,
    runtime_root: Path = RUNTIME_ROOT,
) -> BrokerFiles:
    """Write (or refresh) everything Mosquitto needs into `broker_dir`.

    The broker's server certificate (`localhost`, 127.0.0.1, ::1, `host` and `public_names`:
    every name agents may use to reach it) is issued once through `pki.issue` and reused while
    it is valid for another 30 days and covers those names. Idempotent: call it again after a
    revocation to copy the new CRL in (a `ManagedBroker` does that on each start).

    As root, when the `mosquitto` user cannot pass a directory above `broker_dir` (a 0700
    state directory, pytest's tmp_path), the files go to `runtime_root/broker-<hash of
    broker_dir>` instead (root-owned; `BrokerFiles.directory` says where).
    """
    broker_dir = Path(broker_dir)
    ids = _mosquitto_ids()
    gid = None if ids is None else ids[1]
    directory = broker_dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ids is not None:
        os.chown(directory, -1, ids[1])
        os.chmod(directory, 0o750)  # noqa: S103 - group mosquitto only, to read its files
        blocked = _blocker(directory, *ids)
        if blocked is not None:
            # Opening the state directory to the broker's user would also open whatever else
            # in it is world-readable: keep the broker's files in a runtime directory instead.
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if we left it empty
            directory = _runtime_dir(runtime_root, broker_dir)
            os.chown(directory, -1, ids[1])
            os.chmod(directory, 0o750)  # noqa: S103 - as above
            still = _blocker(directory, *ids)
            if still is not None:
                raise BrokerError(
                    f"Mosquitto runs as the user {MOSQUITTO_USER!r} and can reach neither "
                    f"{broker_dir} nor {directory}: {blocked} and {still} do not let it through. "
                    f"Run `chmod o+x {blocked}` (or `chgrp {MOSQUITTO_USER} {blocked} && "
                    f"chmod g+x {blocked}`)"
                )
            log.info(
                "Mosquitto (user %s) cannot pass %s: its files are in %s",
                MOSQUITTO_USER,
                blocked,
                directory,
            )
    else:
        os.chmod(directory, 0o700)
    private_mode = 0o600 if ids is None else 0o640

    ca_file, cert_file, key_file = directory / _CA, directory / _CERT, directory / _KEY
    crl_file, acl_file, conf_file = directory / _CRL, directory / _ACL, directory / _CONF
    not_after, _ = _server_certificate(
        pki, cert_file, key_file, _wanted_names(host, public_names), gid
    )
    atomic_write(ca_file, pki.ca_cert_pem, mode=0o644)

    persistence_dir: Path | None = None
    if persistence:
        persistence_dir = directory / _DATA
        persistence_dir.mkdir(exist_ok=True, mode=0o700)
        if ids is not None:
            os.chown(persistence_dir, ids[0], ids[1])
        os.chmod(persistence_dir, 0o700)

    plugin = find_dynsec_plugin()
    dynsec_config: Path | None = None
    if plugin is not None:
        # The plugin rewrites its file after each command: a directory of the broker's user.
        dynsec_dir = directory / _DYNSEC_DIR
        dynsec_dir.mkdir(exist_ok=True, mode=0o700)
        dynsec_config = dynsec_dir / _DYNSEC_FILE
        atomic_write(dynsec_config, json.dumps(DYNSEC_NEUTRAL).encode(), mode=0o600)
        if ids is not None:
            os.chown(dynsec_dir, ids[0], ids[1])
            os.chown(dynsec_config, ids[0], ids[1])
    else:
        log.warning(
            "Mosquitto's dynamic-security plugin is not installed: a revocation restarts the "
            "managed broker (every client reconnects) to cut the revoked session"
        )
    atomic_write(
        acl_file,
        render_acl(topic_prefix=topic_prefix, controller_id=controller_id).encode(),
        mode=private_mode,
        group=gid,
    )
    atomic_write(
        conf_file,
        render_config(
            host=host,
            port=port,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            crl_file=crl_file,
            acl_file=acl_file,
            persistence_dir=persistence_dir,
            run_as=MOSQUITTO_USER if ids is not None else None,
            debug_log=debug_log,
            dynsec_plugin=plugin,
            dynsec_config=dynsec_config,
        ).encode(),
        mode=private_mode,
        group=gid,
    )
    files = BrokerFiles(
        directory=directory,
        conf_file=conf_file,
        acl_file=acl_file,
        dynsec=dynsec_config is not None,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        crl_file=crl_file,
        persistence_dir=persistence_dir,
        host=host,
        port=port,
        topic_prefix=topic_prefix,
        server_not_after=not_after,
        crl_source=pki.crl_path,
        group_id=gid,
        runtime_copy=directory != broker_dir,
    )
    files.install_crl()
    return files
