"""The `[clouds]` section of `controller.toml` (and its `[clouds.aws]`, `[clouds.gcp]`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fedsky.controller.settings import Port, Section
from pydantic import Field, field_validator, model_validator


class AwsCloudConfig(Section):
    # A test or private endpoint for every AWS service (moto's server, a VPC endpoint). Endpoints
    # come only from here, never from an uploaded credential file.
    endpoint_url: str | None = None
    # Where `clouds add aws` validates when neither `--region` nor the profile names a region.
    validation_region: str = "us-east-1"
    validation_instance_type: str = "t3.small"
    # The aggregator's image per region; elsewhere the newest image named `image_name` owned by
    # `image_owner` (default: Debian 12 from Debian's own account).
    images: dict[str, str] = {}
    image_owner: str = "136693071363"
    image_name: str = "debian-12-amd64-*"
    # Regions the orphan sweep looks in; empty: every region enabled for the account.
    sweep_regions: tuple[str, ...] = ()


class GcpCloudConfig(Section):
    # Test or private endpoints; a key file's own `token_uri` is used only when it is listed in
    # `allowed_token_uris` (an uploaded key must not send signed assertions anywhere else).
    compute_endpoint: str | None = None
    resource_manager_endpoint: str = "https://cloudresourcemanager.googleapis.com"
    token_uri: str | None = None
    allowed_token_uris: tuple[str, ...] = ("https://oauth2.googleapis.com/token",)
    image: str = "projects/debian-cloud/global/images/family/debian-12"
    network: str = "global/networks/default"
    disk_gb: Annotated[int, Field(ge=10, le=1000)] = 20


class CloudsConfig(Section):
    # The URL the aggregator VMs use to redeem their one-time token for a certificate (the
    # controller's enrolment listener, reachable from the cloud). Required to launch on a cloud.
    enroll_url: str | None = None
    # Where the daemon serves the enrolment route alone, over TLS with a certificate from
    # fedsky's CA for `enroll_url`'s host ("host:port", "[::]:8443"). Unset: no such listener.
    enroll_listen: (
        Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):\d{1,5}$")] | None
    ) = None
    # CIDRs the cloud aggregator's SuperLink port is opened to besides the job's VMs' public
    # addresses: where the hospitals' SuperNodes and the controller reach the internet from
    # (their NAT gateways), which the controller cannot see for itself.
    allowed_sources: tuple[str, ...] = ()
    superlink_port: Port = 9092
    # How the VM gets fedsky's `aggregator` extra: a pip requirement (a wheel URL the VM can
    # reach, or a name on `pip_index_url`), or nothing when the image has it (`preinstalled`).
    package: str = "fedsky[aggregator]"
    pip_index_url: str | None = None
    preinstalled: bool = False
    token_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 1800.0
    cert_days: Annotated[int, Field(ge=1, le=365)] = 30
    ready_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    poll_interval_s: Annotated[float, Field(gt=0)] = 5.0
    aws: AwsCloudConfig = AwsCloudConfig()
    gcp: GcpCloudConfig = GcpCloudConfig()

    @field_validator("allowed_sources")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for source in value:
            try:
                network = ipaddress.ip_network(source.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{source!r} is not an address or CIDR") from None
            if network.prefixlen == 0:
                raise ValueError(f"{source!r} would open the SuperLink to the whole internet")
            out.append(str(network))
        return tuple(out)

    @model_validator(mode="after")
    def _listener_needs_url(self) -> CloudsConfig:
        if self.enroll_listen and not self.enroll_url:
            raise ValueError(
                "enroll_listen is set but enroll_url is not: set enroll_url to the https URL "
                "the aggregator VMs reach this listener at"
            )
        return self
