"""The `aws` aggregator provider: one EC2 instance per job, behind its own security group.

Launch: a security group in the region's default VPC that opens only the SuperLink's port and
only to `spec.allowed_sources`; an instance of the chosen type from the aggregator image, with
the bootstrap script as user data (it installs fedsky's `aggregator` extra unless the image has
it, makes its own keys, redeems a one-time token for the SuperLink's certificate and the
ServerApp's bus certificate, fetches the job's model file and starts the SuperLink);
IMDSv2 only, no key pair, no SSH. Everything is tagged `fedsky:job`, `fedsky:controller` and
`fedsky:managed`, which is how `terminate` and `sweep_orphans` find it again.

boto3 is blocking: each call runs in a thread; waiting loops stay on the event loop so that a
cancelled launch stops waiting at once and cleans up what it made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from fedsky.controller.clouds.aws.credential import AwsCredential
from fedsky.controller.clouds.aws.validate import aws_client, aws_error_code, resolve_aws_image
from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.common import (
    check_job_id,
    check_sources,
    resource_name,
    wait_until,
)
from fedsky.controller.clouds.errors import scrub
from fedsky.controller.clouds.settings import AwsCloudConfig
from fedsky.controller.security.bootstrap_tokens import VmBootstrap
from fedsky.controller.security.startup_script import VM_FILES

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG_JOB = "fedsky:job"
TAG_CONTROLLER = "fedsky:controller"
TAG_MANAGED = "fedsky:managed"
_LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
_TERMINATE_WAIT_S = 600.0


class AwsProvider:
    name = "aws"

    def __init__(
        self,
        *,
        credential: AwsCredential,
        config: AwsCloudConfig,
        bootstrap: VmBootstrap,
        account_name: str = "aws",
    ) -> None:
        self._cred = credential
        self._config = config
        self._bootstrap = bootstrap
        self.account_name = account_name
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AwsProvider(account={self.account_name!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _ec2(self, region: str) -> Any:
        with self._lock:
            if region not in self._clients:
                self._clients[region] = aws_client(self._cred, "ec2", self._config, region)
            return self._clients[region]

    def _fail(self, what: str, exc: BaseException) -> ProviderError:
        code = aws_error_code(exc)
        detail = scrub(str(exc), self._cred.secrets())
        return ProviderError(f"AWS {what} failed ({code or type(exc).__name__}): {detail}")

    async def _call(self, what: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(what, exc) from None

    def _tags(self, job_id: str, extra: dict[str, str] | None = None) -> list[dict[str, str]]:
        tags = {
            TAG_JOB: job_id,
            TAG_CONTROLLER: self._bootstrap.controller_uid,
            TAG_MANAGED: "true",
            "Name": resource_name(job_id),
        }
        for key, value in (extra or {}).items():
            if not key.startswith(("aws:", "fedsky:")) and key != "Name":
                tags[key[:128]] = str(value)[:256]
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _owned_filters(self, job_id: str | None = None) -> list[dict[str, Any]]:
        filters: list[dict[str, Any]] = [
            {"Name": f"tag:{TAG_CONTROLLER}", "Values": [self._bootstrap.controller_uid]},
            {"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]},
        ]
        if job_id is not None:
            filters.append({"Name": f"tag:{TAG_JOB}", "Values": [job_id]})
        return filters

    async def _check_region(self, region: str) -> None:
        # Asked in a region we know exists: a client for an unknown region has no endpoint.
        ec2 = self._ec2(self._config.validation_region)
        regions = await self._call("DescribeRegions", ec2.describe_regions, AllRegions=True)
        known = {r["RegionName"]: r.get("OptInStatus", "") for r in regions.get("Regions", [])}
        if region not in known:
            raise ProviderError(f"unknown AWS region {region!r}")
        if known[region] == "not-opted-in":
            raise ProviderError(f"AWS region {region!r} is not enabled for this account")

    # -- the provider interface ------------------------------------------------------------------

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        """Start the job's aggregator VM and return once it runs and answers; clean up on failure."""
        if spec.cloud != "aws":
            raise ProviderError(f"the aws provider cannot launch on {spec.cloud!r}")
        job_id = check_job_id(spec.job_id)
        sources = check_sources(spec.allowed_sources)
        await self._check_region(spec.region)
        ec2 = self._ec2(spec.region)
        image = await self._call(
            "DescribeImages", resolve_aws_image, ec2=ec2, config=self._config, region=spec.region
        )
        if image is None:
            raise ProviderError(
                f"no aggregator image in {spec.region}: no image named {self._config.image_name!r} from owner "
                f"{self._config.image_owner}; set clouds.aws.images"
            )
        try:
            script = await self._bootstrap.startup_script(job_id)
        except ValueError as exc:
            raise ProviderError(str(exc)) from None
        try:
            group_id = await self._create_group(ec2, job_id, sources)
            reservation = await self._call(
                "RunInstances",
                ec2.run_instances,
                ImageId=image,
                InstanceType=spec.instance_type,
                MinCount=1,
                MaxCount=1,
                SecurityGroupIds=[group_id],
                UserData=script,
                InstanceInitiatedShutdownBehavior="terminate",
                MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
                ClientToken=f"fedsky-{job_id}-{uuid.uuid4().hex[:12]}",
                TagSpecifications=[
                    {"ResourceType": "instance", "Tags": self._tags(job_id, spec.labels)},
                    {"ResourceType": "volume", "Tags": self._tags(job_id)},
                ],
            )
            instance_id = str(reservation["Instances"][0]["InstanceId"])
            handle = AggregatorHandle(
                provider=self.name, job_id=job_id, ref=instance_id, region=spec.region
            )
            log.info(
                "job %s: launched %s (%s) in %s",
                job_id,
                instance_id,
                spec.instance_type,
                spec.region,
            )
            ip, dns = await self._wait_running(ec2, instance_id)
            await self._bootstrap.tokens.bind(
                job_id, ip_addresses=[ip], dns_names=[dns] if dns else []
            )
            handle = replace(handle, address=f"{ip}:{self._bootstrap.superlink_port}")
            await self._wait_healthy(handle)
            return handle
        except BaseException:
            # Failed or cancelled: leave nothing running, and nothing to enrol with.
            log.warning("job %s: launch on aws did not complete; cleaning up", job_id)
            await asyncio.shield(self._cleanup(spec.region, job_id))
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
        instance = await self._describe(self._ec2(handle.region), handle.ref)
        ip = instance.get("PublicIpAddress") if instance else None
        if not ip:
            raise ProviderError(
                f"aggregator {handle.ref} of job {handle.job_id} has no public address"
            )
        return f"{ip}:{self._bootstrap.superlink_port}"

    async def terminate(self, handle: AggregatorHandle) -> None:
        """Terminate the job's instance and delete its security group; safe to call again."""
        await self._cleanup(handle.region, handle.job_id, [handle.ref])

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        """Terminate instances tagged by this controller whose job is not in `active_job_ids`."""
        active = set(active_job_ids)
        if self._config.sweep_regions:
            regions = list(self._config.sweep_regions)
        else:
            ec2 = self._ec2(self._config.validation_region)
            listed = await self._call("DescribeRegions", ec2.describe_regions)
            regions = sorted(r["RegionName"] for r in listed.get("Regions", []))
        swept: list[str] = []
        for region in regions:
            ec2 = self._ec2(region)
            pages = await self._call(
                "DescribeInstances",
                ec2.describe_instances,
                Filters=[
                    *self._owned_filters(),
                    {"Name": "instance-state-name", "Values": _LIVE_STATES},
                ],
            )
            orphans: dict[str, list[str]] = {}
            for reservation in pages.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    job = tags.get(TAG_JOB, "")
                    if job not in active:
                        orphans.setdefault(job, []).append(instance["InstanceId"])
            groups = await self._call(
                "DescribeSecurityGroups",
                ec2.describe_security_groups,
                Filters=self._owned_filters(),
            )
            for group in groups.get("SecurityGroups", []):
                job = {t["Key"]: t["Value"] for t in group.get("Tags", [])}.get(TAG_JOB, "")
                if job not in active:
                    orphans.setdefault(job, [])
            for job, instance_ids in sorted(orphans.items()):
                log.warning(
                    "job %s is not active: terminating its aws aggregator %s in %s",
                    job,
                    instance_ids,
                    region,
                )
                await self._cleanup(region, job, instance_ids)
                swept.extend(f"aws:{region}/{i}" for i in instance_ids)
        return swept

    # -- steps -----------------------------------------------------------------------------------

    async def _create_group(
        self, ec2: Any, job_id: str, sources: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    ) -> str:
        vpcs = await self._call(
            "DescribeVpcs", ec2.describe_vpcs, Filters=[{"Name": "isDefault", "Values": ["true"]}]
        )
        if not vpcs.get("Vpcs"):
            raise ProviderError(
                "the region has no default VPC; create one (`aws ec2 create-default-vpc`)"
            )
        vpc_id = vpcs["Vpcs"][0]["VpcId"]
        group = await self._call(
            "CreateSecurityGroup",
            ec2.create_security_group,
            GroupName=resource_name(job_id),
            Description=f"fedsky aggregator of job {job_id}: SuperLink port from the job's sites only",
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": self._tags(job_id)}],
        )
        group_id = str(group["GroupId"])
        port = self._bootstrap.superlink_port
        permission: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
        v4 = [
            {"CidrIp": str(n), "Description": "fedsky job site"} for n in sources if n.version == 4
        ]
        v6 = [
            {"CidrIpv6": str(n), "Description": "fedsky job site"}
            for n in sources
            if n.version == 6
        ]
        if v4:
            permission["IpRanges"] = v4
        if v6:
            permission["Ipv6Ranges"] = v6
        await self._call(
            "AuthorizeSecurityGroupIngress",
            ec2.authorize_security_group_ingress,
            GroupId=group_id,
            IpPermissions=[permission],
        )
        return group_id

    async def _describe(self, ec2: Any, instance_id: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            result = await asyncio.to_thread(ec2.describe_instances, InstanceIds=[instance_id])
        except ClientError as exc:
            if aws_error_code(exc).startswith("InvalidInstanceID"):
                return None
            raise self._fail("DescribeInstances", exc) from None
        for reservation in result.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return dict(instance)
        return None

    async def _wait_running(self, ec2: Any, instance_id: str) -> tuple[str, str | None]:
        async def running() -> tuple[str, str | None] | None:
            instance = await self._describe(ec2, instance_id)
            state = (instance or {}).get("State", {}).get("Name")
            if instance is None or state in ("shutting-down", "terminated", "stopped"):
                reason = (instance or {}).get("StateReason", {}).get("Message", "gone")
                raise ProviderError(f"instance {instance_id} stopped while starting: {reason}")
            if state == "running" and instance.get("PublicIpAddress"):
                return str(instance["PublicIpAddress"]), instance.get("PublicDnsName") or None
            return None

        return await wait_until(
            running,
            timeout_s=self._bootstrap.ready_timeout_s,
            interval_s=self._bootstrap.poll_interval_s,
            what=f"instance {instance_id} to run with a public address",
        )

    async def _wait_healthy(self, handle: AggregatorHandle) -> None:
        assert handle.address is not None
        await self._bootstrap.wait_answers(
            handle.address,
            ref=handle.ref,
            console_hint=f"aws ec2 get-console-output --instance-id {handle.ref}",
        )

    async def _cleanup(self, region: str, job_id: str, instance_ids: Collection[str] = ()) -> None:
        """Terminate the job's instances, delete its security group, revoke its tokens."""
        from botocore.exceptions import ClientError

        await self._bootstrap.tokens.revoke(job_id)
        ec2 = self._ec2(region)
        found = await self._call(
            "DescribeInstances",
            ec2.describe_instances,
            Filters=[
                *self._owned_filters(job_id),
                {"Name": "instance-state-name", "Values": _LIVE_STATES},
            ],
        )
        ids = {i for i in instance_ids if i}
        for reservation in found.get("Reservations", []):
            ids.update(i["InstanceId"] for i in reservation.get("Instances", []))
        live: set[str] = set()
        for instance_id in sorted(ids):
            try:
                await asyncio.to_thread(ec2.terminate_instances, InstanceIds=[instance_id])
                live.add(instance_id)
            except ClientError as exc:
                if not aws_error_code(exc).startswith("InvalidInstanceID"):
                    raise self._fail("TerminateInstances", exc) from None
        if live:
            log.info("job %s: terminating %s in %s", job_id, sorted(live), region)

        async def all_terminated() -> bool | None:
            for instance_id in sorted(live):
                instance = await self._describe(ec2, instance_id)
                if instance is not None and instance.get("State", {}).get("Name") != "terminated":
                    return None
            return True

        await wait_until(
            all_terminated,
            timeout_s=_TERMINATE_WAIT_S,
            interval_s=self._bootstrap.poll_interval_s,
            what=f"{sorted(live)} to terminate",
        )
        groups = await self._call(
            "DescribeSecurityGroups",
            ec2.describe_security_groups,
            Filters=self._owned_filters(job_id),
        )
        for group in groups.get("SecurityGroups", []):
            await self._delete_group(ec2, group["GroupId"])

    async def _delete_group(self, ec2: Any, group_id: str) -> None:
        from botocore.exceptions import ClientError

        # A terminated instance's network interface lingers for a little while.
        deadline = time.monotonic() + _TERMINATE_WAIT_S
        while True:
            try:
                await asyncio.to_thread(ec2.delete_security_group, GroupId=group_id)
                return
            except ClientError as exc:
                code = aws_error_code(exc)
                if code.startswith("InvalidGroup"):
                    return
                if code != "DependencyViolation" or time.monotonic() > deadline:
                    raise self._fail("DeleteSecurityGroup", exc) from None
            await asyncio.sleep(max(self._bootstrap.poll_interval_s, 1.0))
