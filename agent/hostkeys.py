"""The VMs' SSH host keys, pinned when a VM is registered (`agentctl vm register`).

The agent's known-hosts file (default `state_dir/ssh/known_hosts`) holds one pinned key per VM,
recorded under the VM's name, not its address: SSH is run with `HostKeyAlias=<vm name>`, so a VM
whose DHCP address changes keeps its pin, and another machine answering at the VM's old address
is refused. A job only ever checks against this file (`StrictHostKeyChecking=yes`); it never
adds a key to it. Registration fetches the key with `ssh-keyscan` and pins it only once the
operator has compared its fingerprint with the one the VM shows on its console.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedsky.agent.executors.base import VM_NAME_PATTERN
from fedsky.shared.files import atomic_write

# The key types a registration pins, best first (one key per VM).
_PREFERRED = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)
_KEY_TYPE = re.compile(r"^[a-z0-9@.-]{3,64}$")
_VM_NAME = re.compile(VM_NAME_PATTERN)
_FINGERPRINT = re.compile(r"^(?:SHA256:)?([A-Za-z0-9+/]{43})=?$")


class HostKeyError(Exception):
    """A host key could not be fetched, read or pinned; the message says why."""


@dataclass(frozen=True)
class HostKey:
    key_type: str
    blob: str  # base64, as in known_hosts

    @property
    def fingerprint(self) -> str:
        """`SHA256:...`, the form `ssh-keygen -lf` prints on the VM's console."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self, name: str) -> str:
        return f"{name} {self.key_type} {self.blob}"


def check_vm_name(name: str) -> str:
    """A VM name that can be a known-hosts entry's name; ValueError otherwise."""
    if not _VM_NAME.match(name):
        raise ValueError(
            f"VM name {name[:80]!r} cannot carry a pinned host key: use 1-64 letters, digits "
            "and . _ + - (starting with a letter or digit)"
        )
    return name


def normalise_fingerprint(text: str) -> str:
    """`SHA256:<43 base64 chars>`, from what an operator pastes; ValueError if not one."""
    m = _FINGERPRINT.match(text.strip())
    if not m:
        raise ValueError(
            "expected a SHA-256 fingerprint such as SHA256:uNiVztksCsDhcc0u9e8BujQX..."
        )
    return f"SHA256:{m.group(1)}"


def _parse_key(key_type: str, blob: str) -> HostKey | None:
    if not _KEY_TYPE.match(key_type):
        return None
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    # The blob starts with its own type, length-prefixed: a key of one type cannot pose as another.
    if len(raw) < 4 or raw[4 : 4 + int.from_bytes(raw[:4], "big")] != key_type.encode():
        return None
    return HostKey(key_type, blob)


def parse_known_hosts(text: str) -> dict[str, list[HostKey]]:
    """Name -> keys of the plain entries (markers, hashed names and bad lines are skipped)."""
    out: dict[str, list[HostKey]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "@", "|")):
            continue
        parts = line.split()
        if len(parts) < 3:
            continue
        key = _parse_key(parts[1], parts[2])
        if key is None:
            continue
        for name in parts[0].split(","):
            out.setdefault(name, []).append(key)
    return out


def pinned_keys(known_hosts: Path, vm_name: str) -> list[HostKey]:
    """The keys pinned for `vm_name` (none if the file does not exist)."""
    try:
        text = known_hosts.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read the pinned host keys: {exc.strerror}") from None
    return parse_known_hosts(text).get(vm_name, [])


def scan(host: str, port: int, *, timeout_s: float = 10.0) -> list[HostKey]:
    """The host keys the SSH server at host:port offers (`ssh-keyscan`), best first."""
    argv = ["ssh-keyscan", "-T", str(max(1, int(timeout_s))), "-p", str(port)]
    argv += ["-t", "ed25519,ecdsa,rsa", "--", host]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s * 3 + 5, check=False
        )
    except FileNotFoundError:
        raise HostKeyError("ssh-keyscan is not installed (Debian: openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise HostKeyError(f"{host}:{port} did not answer ssh-keyscan in time") from None
    keys = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            key = _parse_key(parts[1], parts[2])
            if key is not None and key not in keys:
                keys.append(key)
    if not keys:
        raise HostKeyError(f"no SSH host key from {host}:{port} (is sshd running there?)")
    rank = {t: i for i, t in enumerate(_PREFERRED)}
    return sorted(keys, key=lambda k: rank.get(k.key_type, len(rank)))


def pin(known_hosts: Path, vm_name: str, key: HostKey, *, state_dir: Path | None = None) -> None:
    """Make `key` the one key pinned for `vm_name`; other VMs' entries are kept as they are.

    Run as root, the file goes to the owner of `state_dir` (the agent's service user)."""
    check_vm_name(vm_name)
    try:
        lines = known_hosts.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        raise HostKeyError(f"cannot read {known_hosts}: {exc.strerror}") from None
    kept = [
        line
        for line in lines
        if not line.strip() or vm_name not in line.split(maxsplit=1)[0].split(",")
    ]
    kept.append(key.line(vm_name))
    owner = None
    if os.geteuid() == 0 and state_dir is not None and state_dir.exists():
        st = state_dir.stat()  # installed by root for the agent's service user
        owner = (st.st_uid, st.st_gid)
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None:
        os.chown(known_hosts.parent, *owner)
    atomic_write(known_hosts, ("\n".join(kept) + "\n").encode(), mode=0o600, owner=owner)
