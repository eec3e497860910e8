"""Launching: the provider starts the job's SuperLink and the job gets its bus identity.

The SuperLink runs with TLS from fedsky's CA and SuperNode authentication; the ServerApp
publishes its metrics as `agg-<job id>`, a certificate revoked when the job ends.
"""

from __future__ import annotations

import ipaddress
import json

from fedsky.controller.clouds.base import AggregatorProvider, AggregatorSpec, ProviderError
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import JobFailure, JobRun
from fedsky.controller.jobs.stages.place import Placement
from fedsky.controller.security.enrollment import record_certificate
from fedsky.controller.security.pki import write_private_key
from fedsky.shared.files import atomic_write
from fedsky.shared.ids import aggregator_id

AGGREGATOR_CERT_DAYS = 30


async def launch_aggregator(ctx: JobContext, run: JobRun, placement: Placement) -> None:
    """Start the aggregator where placement chose; JobFailure when the provider cannot."""
    provider: AggregatorProvider
    if placement.provider == ctx.local.name:  # the controller's own SuperLink
        provider = ctx.local
    else:
        if ctx.clouds is None:
            raise JobFailure(f"no linked {placement.provider} account can launch the aggregator")
        try:
            provider = await ctx.clouds.provider_for_launch(
                placement.provider, region=placement.region
            )
        except ProviderError as exc:
            raise JobFailure(str(exc)) from None
    run.provider = provider
    spec = AggregatorSpec(
        job_id=run.job_id,
        cloud=placement.cloud,
        region=placement.region,
        instance_type=placement.instance_type,
        allowed_sources=await allowed_sources(ctx, run, provider),
        labels={"fedsky-job": run.job_id},
    )
    try:
        handle = await provider.launch(spec)
    except ProviderError as exc:
        raise JobFailure(f"launching the aggregator: {exc}") from None
    run.handle = handle
    await ctx.store.run(
        jobstore.update_job,
        run.job_id,
        provider=provider.name,
        provider_ref=handle.ref,
        aggregator_json=json.dumps(
            {
                "provider": handle.provider,
                "ref": handle.ref,
                "region": handle.region,
                "address": handle.address,
                "account": getattr(provider, "account_name", None),
            }
        ),
    )
    address = handle.address or await provider.address(handle)
    await ctx.log(run.job_id, f"aggregator up at {address} ({provider.name})")
    run.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = run.directory / "superlink-ca.crt"
    atomic_write(ca, ctx.pki.ca_cert_pem, mode=0o644)
    run.superlink_ca_pem = ctx.pki.ca_cert_pem.decode()
    run.control = ctx.make_control(
        flwr_home=run.directory / "control",
        address=address,
        root_ca=ca,
        client_identity=ctx.pki.controller_identity,
    )
    if provider is ctx.local:
        # A cloud VM makes its own bus key and gets its certificate with its enrolment token.
        await issue_aggregator_identity(ctx, run)


async def allowed_sources(
    ctx: JobContext, run: JobRun, provider: AggregatorProvider
) -> tuple[str, ...]:
    """Who may reach the job's SuperLink: its sites and the controller.

    A cloud SuperLink is opened to the public addresses of the participants' VMs, the
    controller's (`broker.public_host` when it is a public IP address) and the networks in
    `clouds.allowed_sources`: where hospitals behind NAT and the controller reach the
    internet from, which the controller cannot see for itself.
    """
    if provider is ctx.local:
        # The controller's own SuperLink (local, onprem): no cloud network rule to write; the
        # operator's firewall opens its ports (docs/deployment.md).
        return ("127.0.0.1/32",)
    sources = list(ctx.config.clouds.allowed_sources)
    addresses = [ctx.config.broker_public_host]
    for participant in run.spec.participants:
        for vm in await ctx.store.run(inventory.list_vms, participant):
            addresses.extend(vm["addresses"])
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue  # a host name: list its addresses in clouds.allowed_sources
        if ip.is_global:
            sources.append(str(ipaddress.ip_network(ip)))
    if not sources:
        raise JobFailure(
            "no address is allowed to reach a cloud aggregator: none of the job's VMs has a "
            "public address; set clouds.allowed_sources to the networks the hospitals and "
            "the controller reach the internet from"
        )
    return tuple(dict.fromkeys(sources))


async def issue_aggregator_identity(ctx: JobContext, run: JobRun) -> None:
    """The ServerApp's own bus certificate (`agg-<job>`), revoked when the job ends."""
    issued = ctx.pki.issue(
        common_name=aggregator_id(run.job_id), kind="aggregator", days=AGGREGATOR_CERT_DAYS
    )
    assert issued.key_pem is not None
    bus_dir = ctx.local.paths(run.job_id).bus_dir
    bus_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_key(bus_dir / "agg.key", issued.key_pem, overwrite=True)
    atomic_write(bus_dir / "agg.crt", issued.cert_pem, mode=0o644)
    atomic_write(bus_dir / "ca.crt", ctx.pki.ca_cert_pem, mode=0o644)
    await ctx.store.run(record_certificate, issued)
