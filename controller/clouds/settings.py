"""The `[clouds]` section of `controller.toml` (and its `[clouds.aws]`, `[clouds.gcp]`), and the
`[aggregator]` section: the SuperLink the controller runs itself (`[aggregator.onprem]`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from fedsky.controller.settings import (
    Port,
    Section,
    advertised_for,
    check_advertised_host,
    check_bind_host,
    is_wildcard,
)
from pydantic import Field, ValidationInfo, field_validator, model_validator


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


class LauncherConfig(Section):
    """`[clouds.launcher]`: the operator's own way to boot an aggregator machine.

    `command` is run by the controller as `COMMAND launch --job J --cloud C --region R
    --instance-type T` with the start-up script (the same user data a cloud VM gets) on its
    stdin, and prints one JSON object `{"ref", "address"}`; `COMMAND terminate --job J --ref REF`
    ends the machine and `COMMAND list` prints the machines it runs (`[{"job", "ref"}]`). See
    `clouds/launcher.py` and docs/deployment.md. Placement treats `clouds` as linked.
    """

    # How placement, the job record and the log name it ("testbed", "proxmox-dc1").
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")] = "launcher"
    # The catalog's clouds whose offers this launcher boots (placement may pick them).
    clouds: Annotated[
        tuple[Annotated[str, Field(pattern=r"^[a-z0-9]+$")], ...], Field(min_length=1)
    ]
    command: Annotated[tuple[str, ...], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0

    @field_validator("command")
    @classmethod
    def _absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value[0].startswith("/"):
            raise ValueError(
                f"the command's program must be an absolute path, not {value[0]!r}: the "
                "controller does not search its PATH for what it runs with its user data"
            )
        return value


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
    # The VM installs fedsky's `aggregator` extra from the pinned artifacts (`[artifacts]`),
    # never from a package index; or not at all when the image has it (`preinstalled`).
    preinstalled: bool = False
    token_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 1800.0
    cert_days: Annotated[int, Field(ge=1, le=365)] = 30
    ready_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    poll_interval_s: Annotated[float, Field(gt=0)] = 5.0
    aws: AwsCloudConfig = AwsCloudConfig()
    gcp: GcpCloudConfig = GcpCloudConfig()
    launcher: LauncherConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_index(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("package", "pip_index_url"):
                if key in data:
                    raise ValueError(
                        f"clouds.{key} is no longer read: aggregator VMs install fedsky from the "
                        "pinned artifacts (`make artifacts`, [artifacts] dir or url), never from "
                        "a package index; remove it"
                    )
        return data

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

    @field_validator("enroll_url")
    @classmethod
    def _advertised_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("https", "http") or parts.hostname is None:
            raise ValueError("must be an https URL with the host the aggregator VMs reach")
        check_advertised_host(parts.hostname)
        return value

    @field_validator("enroll_listen")
    @classmethod
    def _bind(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        check_bind_host(host.strip("[]"))
        if not 0 < int(port) <= 65535:
            raise ValueError("the port must be between 1 and 65535")
        return value

    @model_validator(mode="after")
    def _listener_needs_url(self) -> CloudsConfig:
        if self.enroll_listen and not self.enroll_url:
            host = self.enroll_listen.rpartition(":")[0].strip("[]")
            why = " (it listens on every address)" if is_wildcard(host) else ""
            raise ValueError(
                f"clouds.enroll_listen is set{why} but enroll_url is not: set clouds.enroll_url "
                "to the https URL the aggregator VMs reach this listener at"
            )
        if self.enroll_listen and self.enroll_url and not self.enroll_url.startswith("https://"):
            raise ValueError(
                "clouds.enroll_url must be an https URL when clouds.enroll_listen is set "
                "(the VMs check the listener against fedsky's CA)"
            )
        return self


class OnPremConfig(Section):
    """`[aggregator.onprem]`: the controller's host is the operator's own aggregator host.

    Its SuperLinks listen on `[aggregator]`'s `bind_host`, at ports from `ports` (the range the
    operator's firewall opens to the hospitals' VMs), and are advertised as `advertise_host`.
    """

    # How placement and the job log name this host (e.g. the site or data centre).
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    # First and last SuperLink port, inclusive: one per running job.
    ports: tuple[Port, Port] = (9092, 9099)

    @field_validator("ports")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        first, last = value
        if first < 1 or last < first:
            raise ValueError("give [first, last] with 1 <= first <= last <= 65535")
        return value


class AggregatorConfig(Section):
    """`[aggregator]`: where the SuperLink the controller runs itself listens.

    Defaults: loopback (one machine). For hospitals on other machines, bind an address they
    reach (or `0.0.0.0`) and advertise it; the SuperLink's certificate names `advertise_host`.
    """

    bind_host: str = "127.0.0.1"
    # What the hospitals' VMs and the controller connect to; default: `bind_host`.
    advertise_host: str | None = Field(default=None, validate_default=True)
    # Set: the `onprem` provider (this host as the operator's aggregator host) replaces `local`.
    onprem: OnPremConfig | None = None

    @field_validator("bind_host")
    @classmethod
    def _bind(cls, value: str) -> str:
        return check_bind_host(value)

    @field_validator("advertise_host")
    @classmethod
    def _advertised(cls, value: str | None, info: ValidationInfo) -> str | None:
        bind = info.data.get("bind_host")
        if bind is None:
            return value
        return advertised_for("aggregator.bind_host", bind, value, "aggregator.advertise_host")

    @property
    def advertised(self) -> str:
        """The name the SuperLink is reached at (and its certificate carries)."""
        return self.advertise_host or self.bind_host
