"""fedsky's SuperNode: Flower's own, refusing every app but fedsky's (pinned at the hospital).

A fedsky run's app bundle (FAB) holds only the app's pyproject.toml, whose components name
modules of the installed fedsky package (`pyproject.toml` here). This SuperNode builds that
bundle itself from the fedsky it has installed (Flower's build is deterministic) and pins its
SHA-256: a run whose bundle has another digest, whoever started it, gets Flower's
FAB-verification error as its reply, and its bundle is never stored, installed or loaded, so
none of its code runs here. The hospital's fedsky comes from the pinned artifacts, checked by
digest, so the pin is the hospital's own.

It hooks Flower 1.42's SuperNode where a run's bundle is fetched (`_pull_and_store_message`,
`get_fab`) and answers through Flower's own verification path (`trusted_entities`,
`_verify_fab`). A Flower whose SuperNode does not have that shape is refused at start: this
SuperNode never runs unpinned.

With `--fedsky-node-cert FILE` it also presents that certificate (issued by the controller over
its node key, `<agent>.node`) to the aggregator's front, which serves the Fleet API only to
such certificates: the TLS key is the node key given with `--auth-supernode-private-key`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import ssl
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fedsky.shared.supernode import NODE_CERT_FLAG

log = logging.getLogger("fedsky.supernode")

PIN_ID = "fedsky-pinned-app"
_KEY_FLAG = "--auth-supernode-private-key"
_HOOKED_PARAMETERS = {"get_fab", "trusted_entities"}


class PinError(RuntimeError):
    """This SuperNode cannot pin the app (the installed Flower is not one it knows)."""


def pinned_fab_digest() -> str:
    """SHA-256 of the bundle Flower builds from the installed fedsky app."""
    from flwr.cli.build import build_fab_from_disk

    source = Path(str(resources.files("fedsky.shared.flower"))) / "pyproject.toml"
    with tempfile.TemporaryDirectory(prefix="fedsky-app-") as tmp:
        shutil.copyfile(source, Path(tmp) / "pyproject.toml")
        fab = build_fab_from_disk(Path(tmp))
    return hashlib.sha256(fab).hexdigest()


def refusal(content: bytes, *, pinned: str) -> str | None:
    """Why a run's bundle is refused, or None when it is fedsky's own."""
    digest = hashlib.sha256(content).hexdigest()
    if digest == pinned:
        return None
    return f"its app bundle (sha256 {digest[:16]}...) is not fedsky's (pinned {pinned[:16]}...)"


def pin(pinned: str) -> None:
    """Hook Flower's SuperNode so that only bundles with digest `pinned` are accepted."""
    import flwr.supernode.start_client_internal as sci

    original: Callable[..., Any] = sci._pull_and_store_message
    parameters = set(inspect.signature(original).parameters)
    if not parameters >= _HOOKED_PARAMETERS or not hasattr(sci, "_verify_fab"):
        raise PinError(
            "the installed Flower's SuperNode does not fetch app bundles the way fedsky's pin "
            "expects (Flower 1.42); refusing to run without the pin"
        )

    def pull_and_store_message(**kwargs: Any) -> Any:
        get_fab = kwargs["get_fab"]

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            reason = refusal(fab.content, pinned=pinned)
            fab.verifications.clear()
            if reason is None:
                # What Flower's verification path asks of a bundle it accepts.
                fab.verifications["valid_license"] = PIN_ID
                fab.verifications[PIN_ID] = fab.hash_str
            else:
                log.error("refused run %s: %s; none of its code runs here", run_id, reason)
            return fab

        kwargs["get_fab"] = checked_get_fab
        kwargs["trusted_entities"] = {PIN_ID: "fedsky"}
        return original(**kwargs)

    def verify_fab(fab: Any, trusted_entities: Any) -> bool:
        return bool(fab.verifications.get(PIN_ID) == fab.hash_str)

    # Replaced by name: the SuperNode's loop looks both up in its module at each call.
    setattr(sci, "_pull_and_store_message", pull_and_store_message)  # noqa: B010
    setattr(sci, "_verify_fab", verify_fab)  # noqa: B010


def take_flag(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` from `argv` (Flower's parser does not know it); its value or None."""
    if flag not in argv:
        return None
    at = argv.index(flag)
    if at + 1 >= len(argv):
        raise PinError(f"{flag} needs a value")
    value = argv[at + 1]
    del argv[at : at + 2]
    return value


def node_tls_context(
    *, verify: ssl.SSLContext | bool | str, cert_file: Path, openssh_key_file: Path
) -> ssl.SSLContext:
    """The Fleet client's TLS context: Flower's own trust (`verify`), plus the node's certificate
    with the node key, which is OpenSSH-encoded on disk and handed to OpenSSL as PEM through a
    private temporary file that is gone before this returns."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(verify, ssl.SSLContext):
        ctx = verify
    else:
        ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    key = serialization.load_ssh_private_key(openssh_key_file.read_bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.TemporaryDirectory(prefix="fedsky-node-") as private_dir:
        key_path = Path(private_dir) / "node.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        ctx.load_cert_chain(str(cert_file), str(key_path))
    return ctx


def present_certificate(cert_file: Path, openssh_key_file: Path) -> None:
    """Make Flower's Fleet client present the node certificate."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    original: Callable[..., None] = FleetHttpClient.__init__
    if "verify" not in inspect.signature(original).parameters:
        raise PinError(
            "the installed Flower's Fleet client takes no TLS settings the way fedsky expects "
            "(Flower 1.42); refusing to run without the node certificate"
        )
    node_tls_context(verify=True, cert_file=cert_file, openssh_key_file=openssh_key_file)

    def init(self: Any, base_url: str, *args: Any, verify: Any = True, **kwargs: Any) -> None:
        ctx = node_tls_context(
            verify=verify, cert_file=cert_file, openssh_key_file=openssh_key_file
        )
        original(self, base_url, *args, verify=ctx, **kwargs)

    setattr(FleetHttpClient, "__init__", init)  # noqa: B010


def main() -> None:
    # Flower logs on its own; this logger's lines go beside them on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        digest = pinned_fab_digest()
        pin(digest)
    except Exception as exc:
        log.error("cannot pin fedsky's app: %s", exc)
        sys.exit(78)
    log.info("only fedsky's app runs here (bundle sha256 %s)", digest)
    try:
        cert = take_flag(sys.argv, NODE_CERT_FLAG)
        if cert is not None:
            key = sys.argv[sys.argv.index(_KEY_FLAG) + 1] if _KEY_FLAG in sys.argv[:-1] else None
            if key is None:
                raise PinError(f"{NODE_CERT_FLAG} needs the node key ({_KEY_FLAG})")
            present_certificate(Path(cert), Path(key))
            log.info("presenting the node certificate %s to the aggregator", Path(cert).name)
    except (PinError, OSError, ValueError, ssl.SSLError) as exc:
        log.error("cannot use the node certificate: %s", exc)
        sys.exit(78)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
