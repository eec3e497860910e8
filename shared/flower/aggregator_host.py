"""fedsky's aggregator host: Flower's SuperLink behind a front that lets each caller reach only
its own part of it.

Flower 1.42's SuperLink serves Fleet (`/v1/fleet/`), Control (`/v1/control/`) and Runtime
(`/v1/runtime/`) on one port, and its Control API checks no caller (its authentication is the
Enterprise edition's): anyone holding fedsky's CA certificate, every hospital, could list, start
and stop runs there and register node keys of its own. So the SuperLink listens on loopback only
and this process is the aggregator's one public listener:

- `/v1/fleet/...`: only a hospital's SuperNode, by its node certificate (mutual TLS: a client
  certificate from fedsky's CA named `<agent>.node`, which the controller issues over the node
  key it registered for the task). Behind that, every Fleet call is signed with a node key the
  SuperLink knows (`--enable-supernode-auth`), and with that flag the SuperLink refuses a node's
  own registration: only keys the controller registered through Control get in.
- `/v1/control/...` and `/health`: only a client certificate from fedsky's CA naming the
  controller (mutual TLS); anyone else gets 403.
- everything else (the Runtime API, Flower's API docs): 404. The ServerApp and the SuperExec
  reach the Runtime API on loopback, and the SuperExec proves itself with a shared secret made
  here at start (`--superexec-auth-secret-file`, with the SuperLink in `process` isolation).

`fedsky-aggregator` starts the SuperLink and the SuperExec, waits until the SuperLink answers,
then opens the front; it exits when either child does (non-zero) and stops both on SIGTERM.
The `local`/`onprem` providers run it as a child; a cloud VM's start-up script as its service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fedsky.shared.ids import CONTROLLER_ID, is_node_name
from fedsky.shared.net import free_port, parse_listen

log = logging.getLogger("fedsky.aggregator")

CONTROLLER_NAME = CONTROLLER_ID
MAX_BODY_BYTES = 64 * 1024 * 1024  # Flower moves objects of at most 5 MiB; a bundle is small
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SECRET_FILE = "superexec.secret"  # noqa: S105 (a file name, not a secret)
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class Access(Enum):
    FORWARD = "forward"
    FORBIDDEN = "forbidden"  # 403: a part of the SuperLink the caller may not use
    NOT_FOUND = "not_found"  # 404: not served to anyone from outside


# Flower's paths are plain words: a path with dot segments, empty segments or escapes is
# refused before any check, so that the path checked is the path the SuperLink routes (an
# HTTP client or server that normalises `/v1/fleet/../control/...` would otherwise turn a
# Fleet path into a Control one).
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_-]+)+")


def access_for(path: str, *, peer_name: str | None, controller: str = CONTROLLER_NAME) -> Access:
    """Who may use which path, as sent (undecoded). `peer_name` is the verified client
    certificate's common name (None without a certificate)."""
    if not _PLAIN_PATH.fullmatch(path):
        return Access.NOT_FOUND
    if path.startswith("/v1/fleet/"):
        return Access.FORWARD if is_node_name(peer_name) else Access.FORBIDDEN
    if path.startswith("/v1/control/") or path == "/health":
        return Access.FORWARD if peer_name == controller else Access.FORBIDDEN
    return Access.NOT_FOUND


def peer_common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The common name of a verified peer certificate as `ssl` reports it (None if none)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass(frozen=True)
class HostTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def front_ssl_context(tls: HostTls) -> ssl.SSLContext:
    """The front's server context: its certificate, and a client certificate asked for and,
    when given, verified against fedsky's CA (Fleet callers need none)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_file))
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def upstream_ssl_context(tls: HostTls) -> ssl.SSLContext:
    """The front's client context towards the SuperLink on loopback (its certificate names
    127.0.0.1, checked)."""
    return ssl.create_default_context(cafile=str(tls.ca_file))


def make_front(*, upstream: str, upstream_ssl: ssl.SSLContext, controller: str) -> Any:
    """The front's aiohttp application, forwarding what `access_for` allows to `upstream`."""
    import aiohttp
    import yarl
    from aiohttp import web

    async def open_session(app: web.Application) -> Any:
        connector = aiohttp.TCPConnector(ssl=upstream_ssl, limit=256)
        timeout = aiohttp.ClientTimeout(total=None, connect=10)
        app["session"] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        peer = peer_common_name(peercert)
        raw_path = request.rel_url.raw_path
        decision = access_for(raw_path, peer_name=peer, controller=controller)
        if decision is not Access.FORWARD:
            log.warning(
                "refused %s %s from %s (certificate %s): %s",
                request.method,
                raw_path[:200],
                request.remote,
                peer or "none",
                decision.value,
            )
            if decision is Access.FORBIDDEN:
                whose = (
                    "hospitals' SuperNodes' (a node certificate from fedsky's CA)"
                    if raw_path.startswith("/v1/fleet/")
                    else "the fedsky controller's only"
                )
                return web.json_response({"error": f"this API is {whose}"}, status=403)
            return web.json_response({"error": "not found"}, status=404)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        session: aiohttp.ClientSession = request.app["session"]
        try:
            target = upstream + raw_path
            if request.rel_url.raw_query_string:
                target += "?" + request.rel_url.raw_query_string
            async with session.request(
                request.method,
                yarl.URL(target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                auto_decompress=False,
            ) as answer:
                response = web.StreamResponse(status=answer.status, reason=answer.reason)
                for key, value in answer.headers.items():
                    if key.lower() not in _NOT_FORWARDED:
                        response.headers.add(key, value)
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientError as exc:
            log.error("the SuperLink did not answer %s: %s", raw_path, exc)
            return web.json_response({"error": "the SuperLink did not answer"}, status=502)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.cleanup_ctx.append(open_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def superlink_command(
    *, bin_dir: Path, port: int, database: Path, tls: HostTls, secret_file: Path
) -> list[str]:
    """The SuperLink on loopback: TLS, node authentication, no dependency installs (they would
    reach for the internet), process isolation so the SuperExec is ours and holds the secret."""
    return [
        str(bin_dir / "flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile",
        str(tls.ca_file),
        "--ssl-certfile",
        str(tls.cert_file),
        "--ssl-keyfile",
        str(tls.key_file),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret_file),
    ]


def superexec_command(
    *, bin_dir: Path, port: int, tls: HostTls, secret_file: Path, parent_pid: int
) -> list[str]:
    return [
        str(bin_dir / "flower-superexec"),
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--root-certificates",
        str(tls.ca_file),
        "--superexec-auth-secret-file",
        str(secret_file),
        "--parent-pid",
        str(parent_pid),
    ]


def write_secret(directory: Path) -> Path:
    """A new SuperExec secret for this start (0600, never logged)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode())
    return path


async def _answers(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), timeout=2.0
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


async def _stop(procs: Sequence[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def serve(
    *,
    listen_host: str,
    listen_port: int,
    tls: HostTls,
    database: Path,
    work_dir: Path,
    bin_dir: Path,
    controller: str = CONTROLLER_NAME,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run the SuperLink, the SuperExec and the front until SIGTERM (0) or a child's exit (1)."""
    from aiohttp import web

    secret = write_secret(work_dir)
    port = free_port("127.0.0.1")
    child_env = dict(os.environ if env is None else env)
    superlink = await asyncio.create_subprocess_exec(
        *superlink_command(
            bin_dir=bin_dir, port=port, database=database, tls=tls, secret_file=secret
        ),
        stdin=subprocess.DEVNULL,
        env=child_env,
    )
    procs = [superlink]
    upstream_ssl = upstream_ssl_context(tls)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while not await _answers(port, upstream_ssl):
        if superlink.returncode is not None or loop.time() > deadline:
            log.error("the SuperLink did not start (exit code %s)", superlink.returncode)
            await _stop(procs)
            return 1
        await asyncio.sleep(0.2)
    superexec = await asyncio.create_subprocess_exec(
        *superexec_command(
            bin_dir=bin_dir, port=port, tls=tls, secret_file=secret, parent_pid=superlink.pid
        ),
        stdin=subprocess.DEVNULL,
        env=child_env,
    )
    procs.append(superexec)
    runner = web.AppRunner(
        make_front(
            upstream=f"https://127.0.0.1:{port}", upstream_ssl=upstream_ssl, controller=controller
        ),
        access_log=None,
    )
    await runner.setup()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        site = web.TCPSite(
            runner, listen_host, listen_port, ssl_context=front_ssl_context(tls), reuse_address=True
        )
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", listen_host, listen_port, exc.strerror)
        await runner.cleanup()
        await _stop(procs)
        return 1
    log.info(
        "aggregator front on %s:%s; SuperLink on 127.0.0.1:%s (pid %s), SuperExec pid %s",
        listen_host,
        listen_port,
        port,
        superlink.pid,
        superexec.pid,
    )
    waits = {asyncio.ensure_future(p.wait()): p for p in procs}
    stop_wait = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait([stop_wait, *waits], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stop_wait not in done:
        ended = next(waits[f] for f in done if f in waits)
        name = "SuperLink" if ended is superlink else "SuperExec"
        log.error("the %s exited with code %s; stopping the aggregator", name, ended.returncode)
        code = 1
    for fut in [stop_wait, *waits]:
        fut.cancel()
    await runner.cleanup()
    await _stop(procs)
    with contextlib.suppress(FileNotFoundError):
        secret.unlink()
    return code


def _host_port(value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedsky-aggregator",
        description="Flower's SuperLink on loopback behind fedsky's front (Fleet for nodes, "
        "Control for the controller's certificate only, Runtime never).",
    )
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to serve on")
    parser.add_argument("--ca", type=Path, required=True, help="fedsky's CA certificate")
    parser.add_argument("--cert", type=Path, required=True, help="this host's certificate")
    parser.add_argument("--key", type=Path, required=True, help="its key")
    parser.add_argument("--database", type=Path, required=True, help="the SuperLink's database")
    parser.add_argument(
        "--work-dir", type=Path, required=True, help="where the SuperExec secret is kept"
    )
    parser.add_argument("--controller-name", default=CONTROLLER_NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tls = HostTls(ca_file=args.ca, cert_file=args.cert, key_file=args.key)
    for label, path in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
        if not path.is_file():
            parser.error(f"{label} {path}: no such file")
    host, port = args.listen
    code = asyncio.run(
        serve(
            listen_host=host,
            listen_port=port,
            tls=tls,
            database=args.database,
            work_dir=args.work_dir,
            bin_dir=Path(sys.executable).parent,
            controller=args.controller_name,
        )
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
