"""The `gcp` aggregator provider: one Compute Engine VM per job, behind its own firewall rule.

Launch: a firewall rule `fedsky-agg-<job>` on the configured network that admits only the
SuperLink's port, only from `spec.allowed_sources`, only to instances carrying the same network
tag; a VM in the first zone of the region that is up, from the configured image, with the
bootstrap script as `startup-script` metadata (it installs fedsky's `aggregator` extra unless
the image has it, makes its own keys, redeems a one-time token for the SuperLink's certificate
and the ServerApp's bus certificate, fetches the job's model file and starts the SuperLink),
labelled `fedsky-job`, `fedsky-controller` and `fedsky-managed`.

Calls use `*_unary` and our own wait on zone or global operations: the long-running-operation
helper of google-cloud-compute polls through a client that ignores a custom endpoint. The SDK is
blocking: each call runs in a thread; waiting loops stay on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.common import (
    RESOURCE_PREFIX,
    check_job_id,
    check_sources,
    resource_name,
    wait_until,
)
from fedsky.controller.clouds.errors import scrub
from fedsky.controller.clouds.gcp.credential import GcpCredential
from fedsky.controller.clouds.gcp.validate import gcp_client_options, gcp_credentials
from fedsky.controller.clouds.settings import GcpCloudConfig
from fedsky.controller.security.bootstrap_tokens import VmBootstrap
from fedsky.controller.security.startup_script import VM_FILES

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_JOB = "fedsky-job"
LABEL_CONTROLLER = "fedsky-controller"
LABEL_MANAGED = "fedsky-managed"
_OP_WAIT_S = 600.0
_LABEL_RE = re.compile(r"[^a-z0-9_-]")


def _label(value: str) -> str:
    return _LABEL_RE.sub("-", value.lower())[:63]


class GcpProvider:
    name = "gcp"

    def __init__(
        self,
        *,
        credential: GcpCredential,
        config: GcpCloudConfig,
        bootstrap: VmBootstrap,
        account_name: str = "gcp",
    ) -> None:
        self._cred = credential
        self._config = config
        self._bootstrap = bootstrap
        self.account_name = account_name
        self.project = credential.project_id
        self._credentials = gcp_credentials(credential, config)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GcpProvider(account={self.account_name!r}, project={self.project!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _client(self, kind: str) -> Any:
        from google.cloud import compute_v1

        classes = {
            "instances": compute_v1.InstancesClient,
            "firewalls": compute_v1.FirewallsClient,
            "zones": compute_v1.ZonesClient,
            "zone_operations": compute_v1.ZoneOperationsClient,
            "global_operations": compute_v1.GlobalOperationsClient,
        }
        with self._lock:
            if kind not in self._clients:
                self._clients[kind] = classes[kind](
                    credentials=self._credentials,
                    client_options=gcp_client_options(self._config),
                    transport="rest",
                )
            return self._clients[kind]

    async def _call(self, what: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        import google.auth.exceptions
        from google.api_core import exceptions as gexc

        try:
            return await asyncio.to_thread(fn, **kwargs)
        except (gexc.GoogleAPICallError, google.auth.exceptions.GoogleAuthError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            code = getattr(exc, "code", None)
            raise ProviderError(
                f"GCP {what} failed ({code or type(exc).__name__}): {scrub(str(message), self._cred.secrets())}"
            ) from None

    async def _not_found_ok(self, what: str, fn: Callable[..., T], /, **kwargs: Any) -> T | None:
        from google.api_core import exceptions as gexc

        try:
            return await asyncio.to_thread(fn, **kwargs)
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as exc:
            message = scrub(str(getattr(exc, "message", exc)), self._cred.secrets())
            raise ProviderError(f"GCP {what} failed ({exc.code}): {message}") from None

    async def _wait_op(self, op: Any, *, zone: str | None, what: str) -> None:
        """Wait for a zone or global operation to finish; ProviderError if it failed."""
        from google.cloud import compute_v1

        deadline = time.monotonic() + _OP_WAIT_S
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"GCP {what}: operation {op.name} did not finish in {_OP_WAIT_S:.0f} s"
                )
            if zone is None:
                op = await self._call(
                    what,
                    self._client("global_operations").wait,
                    project=self.project,
                    operation=op.name,
                )
            else:
                op = await self._call(
                    what,
                    self._client("zone_operations").wait,
                    project=self.project,
                    zone=zone,
                    operation=op.name,
                )
            if op.status != compute_v1.Operation.Status.DONE:
                await asyncio.sleep(self._bootstrap.poll_interval_s)
        if op.error and op.error.errors:
            reasons = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
            raise ProviderError(f"GCP {what} failed: {scrub(reasons, self._cred.secrets())}")

    def _labels(self, job_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        labels = {
            _label(k): _label(v) for k, v in (extra or {}).items() if k and _label(k)[0].isalpha()
        }
        labels.update(
            {
                LABEL_JOB: job_id,
                LABEL_CONTROLLER: self._bootstrap.controller_uid,
                LABEL_MANAGED: "true",
            }
        )
        return labels

    def _firewall_description(self, job_id: str) -> str:
        return f"fedsky aggregator of job {job_id} (controller {self._bootstrap.controller_uid}): SuperLink port from the job's sites only"

    async def _pick_zone(self, region: str) -> str:
        zones = await self._call(
            "zones.list", lambda: list(self._client("zones").list(project=self.project))
        )
        candidates = sorted(
            str(z.name) for z in zones if z.region.rsplit("/", 1)[-1] == region and z.status == "UP"
        )
        if not candidates:
            known = sorted({z.region.rsplit("/", 1)[-1] for z in zones})
            if region not in known:
                raise ProviderError(
                    f"unknown GCP region {region!r} (project {self.project} has {', '.join(known[:8])}, ...)"
                )
            raise ProviderError(f"no zone of GCP region {region!r} is up")
        return candidates[0]

    # -- the provider interface ------------------------------------------------------------------

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        """Start the job's aggregator VM and return once it runs and answers; clean up on failure."""
        from google.cloud import compute_v1

        if spec.cloud != "gcp":
            raise ProviderError(f"the gcp provider cannot launch on {spec.cloud!r}")
        job_id = check_job_id(spec.job_id)
        sources = check_sources(spec.allowed_sources)
        zone = await self._pick_zone(spec.region)
        try:
            script = await self._bootstrap.startup_script(job_id)
        except ValueError as exc:
            raise ProviderError(str(exc)) from None
        name = resource_name(job_id)
        port = self._bootstrap.superlink_port
        try:
            firewall = compute_v1.Firewall(
                name=name,
                network=self._config.network,
                direction="INGRESS",
                description=self._firewall_description(job_id),
                allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=[str(port)])],
                source_ranges=[str(n) for n in sources],
                target_tags=[name],
            )
            op = await self._call(
                "firewalls.insert",
                self._client("firewalls").insert_unary,
                project=self.project,
                firewall_resource=firewall,
            )
            await self._wait_op(op, zone=None, what="firewalls.insert")
            instance = compute_v1.Instance(
                name=name,
                machine_type=f"zones/{zone}/machineTypes/{spec.instance_type}",
                description=f"fedsky aggregator of job {job_id}",
                labels=self._labels(job_id, spec.labels),
                tags=compute_v1.Tags(items=[name]),
                metadata=compute_v1.Metadata(
                    items=[compute_v1.Items(key="startup-script", value=script)]
                ),
                disks=[
                    compute_v1.AttachedDisk(
                        boot=True,
                        auto_delete=True,
                        initialize_params=compute_v1.AttachedDiskInitializeParams(
                            source_image=self._config.image, disk_size_gb=self._config.disk_gb
                        ),
                    )
                ],
                network_interfaces=[
                    compute_v1.NetworkInterface(
                        network=self._config.network,
                        access_configs=[
                            compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
                        ],
                    )
                ],
            )
            op = await self._call(
                "instances.insert",
                self._client("instances").insert_unary,
                project=self.project,
                zone=zone,
                instance_resource=instance,
            )
            handle = AggregatorHandle(
                provider=self.name, job_id=job_id, ref=f"{zone}/{name}", region=spec.region
            )
            log.info("job %s: launching %s (%s) in %s", job_id, name, spec.instance_type, zone)
            await self._wait_op(op, zone=zone, what="instances.insert")
            ip = await self._wait_running(zone, name)
            await self._bootstrap.tokens.bind(job_id, ip_addresses=[ip])
            handle = replace(handle, address=f"{ip}:{port}")
            await self._wait_healthy(handle)
            return handle
        except BaseException:
            log.warning("job %s: launch on gcp did not complete; cleaning up", job_id)
            await asyncio.shield(self._cleanup(job_id, [zone]))
            raise

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        """The ServerApp runs on the VM: the files its startup script fetched and made there."""
        return VM_FILES

    async def healthy(self, handle: AggregatorHandle) -> bool:
        try:
            address = await self.address(handle)
        except ProviderError:
            return False
        return await self._bootstrap.health_check(address)

    async def address(self, handle: AggregatorHandle) -> str:
        if handle.address:
            return handle.address
        zone, _, name = handle.ref.partition("/")
        instance = await self._not_found_ok(
            "instances.get",
            self._client("instances").get,
            project=self.project,
            zone=zone,
            instance=name,
        )
        ip = _nat_ip(instance) if instance is not None else None
        if not ip:
            raise ProviderError(
                f"aggregator {handle.ref} of job {handle.job_id} has no public address"
            )
        return f"{ip}:{self._bootstrap.superlink_port}"

    async def terminate(self, handle: AggregatorHandle) -> None:
        """Delete the job's VM and firewall rule; safe to call again."""
        zone = handle.ref.partition("/")[0]
        await self._cleanup(handle.job_id, [zone] if zone else [])

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        """Delete VMs and firewall rules of this controller whose job is not in `active_job_ids`."""
        active = set(active_job_ids)
        uid = self._bootstrap.controller_uid
        listed = await self._call(
            "instances.aggregatedList",
            lambda: list(
                self._client("instances").aggregated_list(
                    request={
                        "project": self.project,
                        "filter": f'labels.{LABEL_CONTROLLER} = "{uid}"',
                    }
                )
            ),
        )
        orphans: dict[str, list[str]] = {}
        swept: list[str] = []
        for _scope, scoped in listed:
            for instance in scoped.instances:
                labels = dict(instance.labels)
                if labels.get(LABEL_CONTROLLER) != uid or labels.get(LABEL_MANAGED) != "true":
                    continue
                job = labels.get(LABEL_JOB, "")
                if job not in active:
                    zone = instance.zone.rsplit("/", 1)[-1]
                    orphans.setdefault(job, []).append(zone)
                    swept.append(f"gcp:{zone}/{instance.name}")
        firewalls = await self._call(
            "firewalls.list", lambda: list(self._client("firewalls").list(project=self.project))
        )
        for rule in firewalls:
            if rule.name.startswith(RESOURCE_PREFIX) and f"(controller {uid})" in rule.description:
                job = rule.name[len(RESOURCE_PREFIX) :]
                if job not in active:
                    orphans.setdefault(job, [])
        for job, zones in sorted(orphans.items()):
            log.warning(
                "job %s is not active: deleting its gcp aggregator in %s",
                job,
                zones or "(firewall only)",
            )
            await self._cleanup(job, zones)
        return swept

    # -- steps -----------------------------------------------------------------------------------

    async def _wait_running(self, zone: str, name: str) -> str:
        async def running() -> str | None:
            instance = await self._not_found_ok(
                "instances.get",
                self._client("instances").get,
                project=self.project,
                zone=zone,
                instance=name,
            )
            if instance is None or instance.status in (
                "STOPPING",
                "STOPPED",
                "TERMINATED",
                "SUSPENDED",
            ):
                raise ProviderError(f"VM {zone}/{name} stopped while starting")
            ip = _nat_ip(instance)
            return ip if instance.status == "RUNNING" and ip else None

        return await wait_until(
            running,
            timeout_s=self._bootstrap.ready_timeout_s,
            interval_s=self._bootstrap.poll_interval_s,
            what=f"VM {zone}/{name} to run with a public address",
        )

    async def _wait_healthy(self, handle: AggregatorHandle) -> None:
        assert handle.address is not None
        await self._bootstrap.wait_answers(
            handle.address,
            ref=handle.ref,
            console_hint=f"gcloud compute instances get-serial-port-output {handle.ref.partition('/')[2]}",
        )

    async def _cleanup(self, job_id: str, zones: Collection[str]) -> None:
        """Delete the job's VM (in any of `zones`) and firewall rule, revoke its tokens."""
        await self._bootstrap.tokens.revoke(job_id)
        name = resource_name(job_id)
        for zone in sorted(set(zones)):
            op = await self._not_found_ok(
                "instances.delete",
                self._client("instances").delete_unary,
                project=self.project,
                zone=zone,
                instance=name,
            )
            if op is not None:
                log.info("job %s: deleting VM %s/%s", job_id, zone, name)
                await self._wait_op(op, zone=zone, what="instances.delete")
        op = await self._not_found_ok(
            "firewalls.delete",
            self._client("firewalls").delete_unary,
            project=self.project,
            firewall=name,
        )
        if op is not None:
            await self._wait_op(op, zone=None, what="firewalls.delete")


def _nat_ip(instance: Any) -> str | None:
    for nic in instance.network_interfaces:
        for config in nic.access_configs:
            if config.nat_i_p:
                return str(config.nat_i_p)
    return None
