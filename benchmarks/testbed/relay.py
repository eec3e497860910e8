"""User-space delay for the testbed's links (this kernel has no netem).

A relay listens inside the source host's namespace on the destination's real address and port
(netns.py puts that address on the source's `lo`, so the connection stays inside the source and
reaches the relay), and forwards to the destination over the bridge, holding each direction's
bytes for half the pair's RTT. Certificates and advertised names stay true: the client dials the
real address. The destination sees the relay's address (the bridge's) as the peer.

All relays of a testbed run in one asyncio process inside the bridge namespace (`Relays` starts
it); its listening sockets are created in the source namespaces with setns. It reads route sets
as JSON lines on stdin, answers one JSON line each, and exits when stdin closes, so it never
outlives the process that started it.

The TCP handshake with the relay is local, so connect() itself is not delayed; every byte after
it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.testbed.netns import Testbed, TestbedError, socket_in
from benchmarks.testbed.topology import Host, Plan

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512  # per relay process; more are refused (closed at once)
CHUNK = 64 * 1024
# Chunks in flight per direction: bounds memory (4 MiB) and, like a real path's window, the
# throughput (buffer / one-way delay).
QUEUE_CHUNKS = 64
# The emulated TCP sender: IW10 (RFC 6928), Linux's default maximum send window (tcp_wmem),
# and its minimum retransmission timeout (the idle time after which the window starts over).
INITIAL_WINDOW = 10 * 1460
WINDOW = QUEUE_CHUNKS * CHUNK
MIN_RTO_S = 0.2
CONNECT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
# The event loop waits in whole milliseconds, rounded up, and waking takes time on a VM: a
# timer fires about a millisecond late. Releases aim early by a learnt amount, bounded by this.
MAX_EARLY_S = 0.005
_REPO_ROOT = Path(__file__).resolve().parents[2]


class RelayError(TestbedError):
    """The relay process failed to start or to add a route."""


@dataclass(frozen=True)
class Route:
    """One relay listener: in `netns`, on `address:port`, forwarding to the same address and
    port as seen from the bridge, each direction held `delay_ms`."""

    netns: str
    address: str
    port: int
    delay_ms: float
    source: str = ""  # the dialling host's address (for the byte counts; else its netns)


def routes_for(plan: Plan, services: Mapping[str, Iterable[int]]) -> list[Route]:
    """Routes for every link, both ways: for each host's service ports, a relay in each of
    the hosts it talks with. `services` maps host name to the TCP ports it serves."""
    for name in services:
        plan.host(name)  # a clear error for an unknown host
    routes = []
    for link in plan.links:
        half = link.rtt_target_ms / 2.0
        for src, dst in ((link.a, link.b), (link.b, link.a)):
            target = plan.host(dst)
            for port in services.get(dst, ()):
                origin = plan.host(src)
                routes.append(Route(origin.netns, target.address, int(port), half, origin.address))
    return routes


# -- the relay process -------------------------------------------------------------------------


class RelayServer:
    """Listeners and connections of one relay process."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._max = max_connections
        self._active = 0
        self._servers: list[tuple[Route, asyncio.Server]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # The two transports of every open relayed connection, by its route (for `cut`).
        self._open: dict[Route, set[asyncio.StreamWriter]] = {}
        self._timer = Timer()
        # Bytes each host has sent over the relays, by the host's address: what it wrote on
        # connections it dialled and what it answered on connections dialled to it.
        self.sent: dict[str, int] = {}

    async def add(self, route: Route) -> None:
        sock = await asyncio.to_thread(socket_in, route.netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((route.address, route.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise RelayError(
                f"relay in {route.netns} cannot listen on {route.address}:{route.port}: {exc}"
            ) from exc

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._connection(route, reader, writer)
            except asyncio.CancelledError:
                # Cancelled by close(); the stream machinery would log a cancelled handler
                # as an error.
                pass
            finally:
                self._tasks.discard(task)

        self._servers.append((route, await asyncio.start_server(handle, sock=sock)))
        log.debug(
            "relay %s -> %s:%d (%.1f ms each way)",
            route.netns,
            route.address,
            route.port,
            route.delay_ms,
        )

    async def _connection(
        self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._active >= self._max:
            log.warning(
                "relay full (%d connections): refusing one to %s:%d",
                self._max,
                route.address,
                route.port,
            )
            writer.transport.abort()
            return
        self._active += 1
        writers = [writer]
        open_here = self._open.setdefault(route, set())
        open_here.add(writer)
        try:
            # From this process's namespace (the bridge's), where the address is the real host.
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(route.address, route.port), CONNECT_TIMEOUT_S
            )
            writers.append(upstream)
            open_here.add(upstream)
            for w in writers:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    # Nagle would add its own delays to small messages on top of ours.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            delay = route.delay_ms / 1000.0
            source = route.source or route.netns
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    _pipe(reader, upstream, delay, self._timer, self._counter(source))
                )
                group.create_task(
                    _pipe(up_reader, writer, delay, self._timer, self._counter(route.address))
                )
        except (OSError, TimeoutError, ExceptionGroup) as exc:
            log.debug("relayed connection to %s:%d ended: %r", route.address, route.port, exc)
        finally:
            self._active -= 1
            for w in writers:
                open_here.discard(w)
                w.transport.abort()

    def _counter(self, host: str) -> Callable[[int], None]:
        def count(size: int) -> None:
            self.sent[host] = self.sent.get(host, 0) + size

        return count

    def cut(self, *, netns: str, address: str) -> int:
        """Take a host off the network: the relays listening in its namespace (what it dials)
        and those forwarding to its address (what dials it) stop listening, and every
        connection through them is reset. Returns the number of routes cut."""
        cut = 0
        for route, server in self._servers:
            if route.netns != netns and route.address != address:
                continue
            if server.is_serving():
                server.close()
                cut += 1
            for w in list(self._open.get(route, ())):
                w.transport.abort()
        log.info("cut %s (%s): %d routes", netns, address, cut)
        return cut

    async def close(self) -> None:
        for _, server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, server in self._servers:
            await server.wait_closed()


class Timer:
    """Sleeps until a due time, learning how late this machine's timers fire.

    Without this every RTT comes out 1-2 ms long; with it, releases centre on their due time.
    """

    def __init__(self) -> None:
        self.early = 0.0005

    async def until(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        wait = due - loop.time() - self.early
        if wait <= 0:
            return
        await asyncio.sleep(wait)
        late = loop.time() - due
        self.early = min(max(self.early + 0.1 * late, 0.0), MAX_EARLY_S)


class Window:
    """A TCP sender's congestion window over the relayed path, as Linux runs it without loss:
    it opens at the initial window, grows by what each ACK acknowledges (doubling every RTT,
    slow start) up to the socket's window, and starts over after an idle RTO. The relay's
    sender side is local, so without this every transfer would start at full rate."""

    def __init__(self, rtt: float, *, initial: int = INITIAL_WINDOW, limit: int = WINDOW) -> None:
        self.rtt = rtt
        self.initial = initial
        self.limit = limit
        self.cwnd = initial
        self.in_flight = 0
        self.last_send = -math.inf
        self._acked = asyncio.Event()

    async def room(self, now: float) -> int:
        """Bytes that may be sent now, waiting for ACKs while the window is full."""
        if self.in_flight == 0 and now - self.last_send > self.rtt + MIN_RTO_S:
            self.cwnd = self.initial  # RFC 5681 4.1: restart after an idle RTO
        while self.in_flight >= self.cwnd:
            self._acked.clear()
            await self._acked.wait()
        return self.cwnd - self.in_flight

    def sent(self, size: int, now: float) -> None:
        self.in_flight += size
        self.last_send = now
        asyncio.get_running_loop().call_later(self.rtt, self._ack, size)

    def _ack(self, size: int) -> None:
        self.in_flight -= size
        self.cwnd = min(self.limit, self.cwnd + size)
        self._acked.set()


async def _pipe(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    delay: float,
    timer: Timer,
    count: Callable[[int], None] | None = None,
) -> None:
    """Copy src to dst, each chunk released `delay` seconds after it arrived, no more in
    flight than the path's congestion window (`Window`, over an RTT of twice `delay`)."""
    loop = asyncio.get_running_loop()
    # Twice the window's chunks: a chunk may go out in two pieces where the window ends.
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=2 * QUEUE_CHUNKS)
    window = Window(2 * delay) if delay > 0 else None

    async def read() -> None:
        while True:
            data = await src.read(CHUNK)
            if not data:
                await queue.put((loop.time() + delay, b""))  # the sender's EOF
                return
            if window is None:
                await queue.put((loop.time() + delay, data))  # blocks when full: back-pressure
                continue
            # The window is asked once the data is here: only then is it known how long the
            # path was idle (an idle RTO starts slow start over).
            while data:
                room = await window.room(loop.time())
                piece, data = data[:room], data[room:]
                window.sent(len(piece), loop.time())
                await queue.put((loop.time() + delay, piece))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await timer.until(due)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()  # half-close, as the sender did
                return
            dst.write(data)
            await dst.drain()
            if count is not None:
                count(len(data))

    async with asyncio.TaskGroup() as group:
        group.create_task(read())
        group.create_task(write())


async def serve(lines: asyncio.StreamReader, out: Any) -> None:
    """The relay process: add route sets read as JSON lines until EOF, then close."""
    server = RelayServer()
    try:
        while line := await lines.readline():
            try:
                request = json.loads(line)
                reply: dict[str, Any]
                if "cut" in request:
                    reply = {"ok": True, "cut": server.cut(**request["cut"])}
                elif "sent" in request:
                    reply = {"ok": True, "sent": dict(server.sent)}
                else:
                    routes = [Route(**r) for r in request["routes"]]
                    for route in routes:
                        await server.add(route)
                    reply = {"ok": True, "added": len(routes)}
            except (RelayError, TestbedError, ValueError, TypeError, KeyError) as exc:
                reply = {"ok": False, "error": str(exc)}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        await server.close()


async def _main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    serving = asyncio.create_task(serve(reader, sys.stdout))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (serving, stopping):
        task.cancel()
    await asyncio.gather(serving, stopping, return_exceptions=True)


# -- the parent's handle on it -----------------------------------------------------------------


def module_command(module: str) -> list[str]:
    """argv running one of this package's modules with this interpreter."""
    return [sys.executable, "-m", module]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class Relays:
    """The relay process of a testbed. Stops with the testbed, or with `stop()`."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Relays:
        self._proc = self.testbed.popen(
            self.testbed.plan.bridge_netns,
            module_command("benchmarks.testbed.relay"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        return self

    def add(self, routes: Iterable[Route]) -> int:
        """Start relays for `routes`; returns how many. Raises RelayError."""
        return int(self._ask({"routes": [asdict(r) for r in routes]})["added"])

    def cut(self, host: Host) -> int:
        """Cut `host` off: nothing it dials and nothing dialling it gets through any more, open
        connections included (they are reset). Returns the number of relays stopped."""
        return int(self._ask({"cut": {"netns": host.netns, "address": host.address}})["cut"])

    def sent_bytes(self) -> dict[str, int]:
        """Bytes each host has sent over the relays so far, by its address (the host's
        outbound traffic on every link, whichever side dialled)."""
        return {k: int(v) for k, v in self._ask({"sent": True})["sent"].items()}

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RelayError("the relay process is not running")
        try:
            proc.stdin.write(json.dumps(payload) + "\n")
            proc.stdin.flush()
        except OSError as exc:
            raise RelayError(f"the relay process is gone (exit {proc.poll()})") from exc
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RelayError(f"the relay process did not answer (exit {proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RelayError(reply.get("error", "relay failed"))
        return reply

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the relay closes its listeners and exits
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> Relays:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TESTBED_LOG", "WARNING"), stream=sys.stderr)
    asyncio.run(_main())
