"""Control-plane throughput, measured end to end through the real broker.

    python -m benchmarks.control_plane [--agents 2000] [--burst 20000] [--hold-s 60]

Prints, from one run:
1. Ingest: reports per second the controller stores (decoded, validated, written to SQLite),
   beside what a bare subscriber receives from the same broker in the same burst; the ratio is
   the figure. Publisher, bare subscriber and controller are separate processes.
2. Hold: N simulated agents, each with its own certificate and TLS connection and five VMs,
   sending one report per 10 s; the controller's backlog and how far storage lags behind.
3. The agent daemon's resident memory and idle CPU (a real `fedsky-agent` on a test node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
from fedsky.controller.onebox import Onebox
from fedsky.shared.messages import HostInfo, Report, VmInfo
from fedsky.shared.topics import Topics


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _report(agent_id: str, seq: int) -> bytes:
    vms = [
        VmInfo(
            name=f"vm-00{i}",
            uuid=f"{abs(hash((agent_id, i))) % (1 << 128):032x}",
            state="running" if i < 3 else "shutoff",
            vcpus=4,
            memory_mib=8192,
            disk_gib=40,
            addresses=[f"192.168.122.{10 + i}"],
        )
        for i in range(1, 6)
    ]
    host = HostInfo(
        hostname=agent_id,
        cpu_count=16,
        cpu_percent=12.5,
        load_1m=0.7,
        memory_total_mib=65536,
        memory_available_mib=32768,
        disk_total_gib=1000,
        disk_free_gib=500,
    )
    return Report(
        agent_id=agent_id, seq=seq, sent_at=datetime.now(UTC), host=host, vms=vms
    ).encode()


def _context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


# -- enrolment of simulated agents --------------------------------------------------------------


def enrol_simulated(box: Onebox, count: int, keys_dir: Path) -> list[dict[str, str]]:
    keys_dir.mkdir(parents=True, exist_ok=True)
    ca = keys_dir / "ca.crt"
    agents = []
    for i in range(count):
        name = f"sim-{i:05d}"
        result = box.api.post(
            "/v1/agents", {"name": name, "location": "aws:us-east-1", "with_key": True}
        )
        cert = keys_dir / f"{name}.crt"
        key = keys_dir / f"{name}.key"
        cert.write_text(result["bundle"]["cert_pem"])
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(result["key_pem"])
        if i == 0:
            ca.write_text(result["bundle"]["ca_pem"])
        agents.append({"id": name, "cert": str(cert), "key": str(key), "ca": str(ca)})
    return agents


# -- burst: publisher and bare subscriber processes --------------------------------------------


def _bare_subscriber(
    port: int, prefix: str, creds: dict[str, str], expect: int, out: Any, ready: Any
) -> None:
    async def main() -> None:
        ctx = _context(creds["ca"], creds["cert"], creds["key"])
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier="bare-sub",
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
            max_queued_incoming_messages=0,
        ) as client:
            await client.subscribe(f"{prefix}/agents/+/up/report", qos=1)
            ready.set()
            n = 0
            first = last = 0.0
            async for _ in client.messages:
                now = time.monotonic()
                if n == 0:
                    first = now
                n += 1
                last = now
                if n >= expect:
                    break
            out.put({"received": n, "first": first, "last": last})

    asyncio.run(main())


def _publisher(
    port: int, prefix: str, agents: list[dict[str, str]], per_agent: int, out: Any, go: Any
) -> None:
    async def one(agent: dict[str, str]) -> None:
        topics = Topics(prefix)
        ctx = _context(agent["ca"], agent["cert"], agent["key"])
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=agent["id"],
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            payloads = [_report(agent["id"], s) for s in range(per_agent)]
            go.wait()
            for payload in payloads:
                await client.publish(topics.report(agent["id"]), payload, qos=1)

    async def main() -> None:
        start = time.monotonic()
        await asyncio.gather(*(one(a) for a in agents))
        out.put({"published": len(agents) * per_agent, "elapsed": time.monotonic() - start})

    asyncio.run(main())


def measure_burst(box: Onebox, agents: list[dict[str, str]], per_agent: int) -> dict[str, float]:
    total = len(agents) * per_agent
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Event()
    go = ctx.Event()
    # The bare subscriber uses the controller's own identity: only it may read every `up`.
    pki = box.controller_dir / "state" / "pki"
    creds = {
        "ca": str(pki / "ca.crt"),
        "cert": str(pki / "controller.crt"),
        "key": str(pki / "controller.key"),
    }
    sub = ctx.Process(
        target=_bare_subscriber, args=(box.broker_port, box.topic_prefix, creds, total, out, ready)
    )
    sub.start()
    ready.wait(30)
    pub = ctx.Process(
        target=_publisher, args=(box.broker_port, box.topic_prefix, agents, per_agent, out, go)
    )
    before = box.api.get("/v1/health")["reports_stored"]
    pub.start()
    time.sleep(3.0)  # let every publisher connect and build its payloads
    t0 = time.monotonic()
    go.set()
    stored_first = stored_last = 0.0
    while True:
        stored = box.api.get("/v1/health")["reports_stored"] - before
        now = time.monotonic()
        if stored > 0 and not stored_first:
            stored_first = now
        if stored >= total:
            stored_last = now
            break
        if now - t0 > 300:
            stored_last = now
            break
        time.sleep(0.05)
    results = [out.get(timeout=60), out.get(timeout=60)]
    pub.join(30)
    sub.join(30)
    bare = next(r for r in results if "received" in r)
    published = next(r for r in results if "published" in r)
    bare_rate = bare["received"] / max(1e-9, bare["last"] - t0)
    ctl_rate = stored / max(1e-9, stored_last - t0)
    return {
        "reports": float(total),
        "publish_s": published["elapsed"],
        "bare_rate": bare_rate,
        "controller_rate": ctl_rate,
        "stored": float(stored),
        "ratio": ctl_rate / bare_rate,
    }


# -- hold: N agents, one report per 10 s each ---------------------------------------------------


def _holder(
    port: int, prefix: str, agents: list[dict[str, str]], interval: float, hold_s: float, out: Any
) -> None:
    _raise_nofile()

    async def one(agent: dict[str, str], stop_at: float, sent: list[int]) -> None:
        topics = Topics(prefix)
        ctx = _context(agent["ca"], agent["cert"], agent["key"])
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=agent["id"],
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=60,
        ) as client:
            await asyncio.sleep(random.uniform(0, interval))
            seq = 0
            while time.monotonic() < stop_at:
                await client.publish(topics.report(agent["id"]), _report(agent["id"], seq), qos=1)
                sent[0] += 1
                seq += 1
                await asyncio.sleep(interval)

    async def main() -> None:
        sent = [0]
        sem = asyncio.Semaphore(64)

        async def connect_then_run(agent: dict[str, str]) -> None:
            async with sem:
                pass
            await one(agent, stop_at, sent)

        stop_at = time.monotonic() + hold_s
        await asyncio.gather(*(connect_then_run(a) for a in agents))
        out.put({"sent": sent[0]})

    asyncio.run(main())


def measure_hold(box: Onebox, agents: list[dict[str, str]], hold_s: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    before = box.api.get("/v1/health")["reports_stored"]
    proc = ctx.Process(
        target=_holder, args=(box.broker_port, box.topic_prefix, agents, 10.0, hold_s, out)
    )
    t0 = time.monotonic()
    proc.start()
    max_backlog = 0
    samples = []
    while proc.is_alive():
        health = box.api.get("/v1/health")
        max_backlog = max(max_backlog, int(health["ingest_backlog"]))
        samples.append(health["reports_stored"] - before)
        time.sleep(1.0)
    sent = out.get(timeout=30)["sent"]
    time.sleep(2.0)
    stored = box.api.get("/v1/health")["reports_stored"] - before
    online = sum(1 for a in box.api.get("/v1/agents") if a["state"] == "online")
    return {
        "agents": float(len(agents)),
        "online": float(online),
        "seconds": time.monotonic() - t0,
        "sent": float(sent),
        "stored": float(stored),
        "max_backlog": float(max_backlog),
    }


# -- the agent daemon's footprint ---------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def measure_agent(box: Onebox, idle_s: float) -> dict[str, float]:
    box.report_interval_s = 30.0
    box.poll_interval_s = 5.0
    box.add_agent("bench-agent", "aws:us-east-1")
    box.start_agent("bench-agent")
    box.wait_agents_online(["bench-agent"], timeout=60)
    proc = box.agents["bench-agent"].proc
    assert proc is not None
    time.sleep(5.0)
    cpu0 = _cpu_s(proc.pid)
    time.sleep(idle_s)
    cpu1 = _cpu_s(proc.pid)
    return {
        "rss_mib": _rss_mib(proc.pid),
        "idle_cpu_percent": 100.0 * (cpu1 - cpu0) / idle_s,
        "idle_s": idle_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2000, help="simulated agents held")
    parser.add_argument("--burst-agents", type=int, default=50)
    parser.add_argument("--burst", type=int, default=20000, help="reports in the ingest burst")
    parser.add_argument("--hold-s", type=float, default=60.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="fedsky-bench-cp-"))
    # The burst measures what the bus and the store can ingest, from a few publishers: the
    # per-agent report quota (a hospital's own flood protection) is lifted for it.
    box = Onebox(
        root=root,
        topic_prefix="bench/v1",
        offline_after_s=60,
        inventory_extra="reports_per_minute = 6000\nreport_burst = 1000",
    )
    results: dict[str, Any] = {}
    try:
        box.init_ca()
        box.start_controller()
        t = time.monotonic()
        agents = enrol_simulated(box, max(args.agents, args.burst_agents), root / "sim")
        results["enrol_s"] = time.monotonic() - t
        results["burst"] = measure_burst(
            box, agents[: args.burst_agents], args.burst // args.burst_agents
        )
        results["hold"] = measure_hold(box, agents[: args.agents], args.hold_s)
        results["agent"] = measure_agent(box, args.idle_s)
    finally:
        box.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    b, h, a = results["burst"], results["hold"], results["agent"]
    print(
        f"enrolled {max(args.agents, args.burst_agents)} simulated agents through the API in {results['enrol_s']:.1f} s"
    )
    print("\ningest burst (same broker, same run)")
    print(f"  reports                 {b['reports']:>10.0f}")
    print(f"  bare subscriber         {b['bare_rate']:>10.0f} reports/s")
    print(f"  controller (stored)     {b['controller_rate']:>10.0f} reports/s")
    print(f"  ratio controller/bare   {b['ratio']:>10.2f}   (aim >= 0.5)")
    print(
        f"\nhold: {h['agents']:.0f} agents, each its own certificate and connection, 5 VMs, 1 report / 10 s"
    )
    print(f"  online at the end       {h['online']:>10.0f}")
    print(f"  reports sent / stored   {h['sent']:>10.0f} / {h['stored']:.0f}")
    print(f"  max ingest backlog      {h['max_backlog']:>10.0f}")
    print("\nagent daemon (test node, 5 VMs, report every 30 s)")
    print(f"  resident memory         {a['rss_mib']:>10.1f} MiB   (aim < 60)")
    print(f"  idle CPU                {a['idle_cpu_percent']:>10.2f} %  over {a['idle_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
