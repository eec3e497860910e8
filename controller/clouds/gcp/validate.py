"""Checking a GCP service-account key by real calls, and the clients the gcp provider shares.

The OAuth token exchange (the key is live), zones.list in the key's project (the project and the
Compute API answer; the region exists), then Cloud Resource Manager's
`projects.testIamPermissions` for the permissions the provider uses, led by
`compute.instances.create`, the permission behind instances.insert: the Compute API itself has
no project-level permission test.

A key's `token_uri` is used only if it is in `clouds.gcp.allowed_token_uris` (Google's own by
default) -- otherwise whoever wrote the key file would receive the controller's signed
assertions and could make it call any URL. `clouds.gcp.token_uri`, when set, replaces every
key's `token_uri` (the local fake, a private endpoint).
"""

from __future__ import annotations

import json
from typing import Any

from fedsky.controller.clouds.errors import CredentialFormatError, scrub
from fedsky.controller.clouds.gcp.credential import GcpCredential
from fedsky.controller.clouds.settings import GcpCloudConfig
from fedsky.controller.clouds.validation import (
    STATUS_INVALID,
    STATUS_MISSING,
    STATUS_OK,
    STATUS_REGION,
    STATUS_UNREACHABLE,
    ValidationResult,
    missing_message,
)

# IAM permissions the gcp provider uses; compute.instances.create is what instances.insert needs.
GCP_PERMISSIONS = (
    "compute.instances.create",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.delete",
    "compute.instances.setMetadata",
    "compute.instances.setLabels",
    "compute.instances.setTags",
    "compute.disks.create",
    "compute.subnetworks.use",
    "compute.subnetworks.useExternalIp",
    "compute.firewalls.create",
    "compute.firewalls.get",
    "compute.firewalls.list",
    "compute.firewalls.delete",
    "compute.networks.updatePolicy",
    "compute.zones.list",
    "compute.zoneOperations.get",
    "compute.globalOperations.get",
)
GCP_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def gcp_token_uri(cred: GcpCredential, config: GcpCloudConfig) -> str:
    """The token endpoint to use for `cred`: the config's, or the key's when the config allows it."""
    if config.token_uri:
        return config.token_uri
    if cred.token_uri in config.allowed_token_uris:
        return cred.token_uri
    raise CredentialFormatError(
        "the key's token_uri is not a Google token endpoint fedsky is allowed to use; a key file must "
        "not choose where the controller sends signed assertions (allow it in clouds.gcp.allowed_token_uris "
        "if it is really yours)"
    )


def gcp_credentials(cred: GcpCredential, config: GcpCloudConfig) -> Any:
    """google-auth service-account credentials with the endpoint chosen by `gcp_token_uri`."""
    from google.oauth2 import service_account

    info = json.loads(cred.info.reveal())
    info["token_uri"] = gcp_token_uri(cred, config)
    return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=list(GCP_SCOPES)
    )


def gcp_client_options(config: GcpCloudConfig) -> Any:
    from google.api_core.client_options import ClientOptions

    return ClientOptions(api_endpoint=config.compute_endpoint) if config.compute_endpoint else None


def _gcp_error(exc: BaseException, cred: GcpCredential) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return scrub(str(message), cred.secrets())


def validate_gcp(
    cred: GcpCredential, *, config: GcpCloudConfig, region: str | None = None
) -> ValidationResult:
    """Check a GCP service-account key by real calls (blocking: run it in a thread)."""
    import google.auth.exceptions
    from google.api_core import exceptions as gexc
    from google.auth.transport.requests import AuthorizedSession, Request
    from google.cloud import compute_v1

    project, identity = cred.project_id, cred.client_email
    missing: list[str] = []
    notes: list[str] = []

    def result(status: str, message: str = "") -> ValidationResult:
        if status == STATUS_MISSING:
            message = missing_message(identity, project, "project", missing)
        return ValidationResult(
            "gcp", status, project, identity, region, tuple(missing), tuple(notes), message
        )

    credentials = gcp_credentials(cred, config)
    try:
        credentials.refresh(Request())
    except google.auth.exceptions.RefreshError as exc:
        reason = _gcp_error(exc.args[0] if exc.args else exc, cred)
        return result(
            STATUS_INVALID,
            f"Google refused the key ({reason}): it was deleted or disabled, or the file was altered",
        )
    except google.auth.exceptions.TransportError as exc:
        return result(STATUS_UNREACHABLE, f"cannot reach the token endpoint: {type(exc).__name__}")
    zones = compute_v1.ZonesClient(
        credentials=credentials, client_options=gcp_client_options(config), transport="rest"
    )
    try:
        regions = {z.region.rsplit("/", 1)[-1] for z in zones.list(project=project)}
    except gexc.Forbidden as exc:
        text = _gcp_error(exc, cred)
        if "disabled" in text.lower() or "has not been used" in text.lower():
            return result(
                STATUS_INVALID,
                f"the Compute Engine API is not enabled in project {project}: {text}",
            )
        missing.append("compute.zones.list")
        regions = set()
    except gexc.NotFound:
        return result(STATUS_INVALID, f"project {project!r} does not exist")
    except (gexc.GoogleAPICallError, google.auth.exceptions.GoogleAuthError) as exc:
        return result(STATUS_UNREACHABLE, f"zones.list failed: {_gcp_error(exc, cred)}")
    except OSError as exc:
        return result(STATUS_UNREACHABLE, f"cannot reach Compute Engine: {type(exc).__name__}")
    if region is not None and regions and region not in regions:
        sample = ", ".join(sorted(regions)[:6])
        return result(
            STATUS_REGION,
            f"unknown GCP region {region!r} in project {project} (regions include {sample}, ...)",
        )
    session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    url = f"{config.resource_manager_endpoint.rstrip('/')}/v1/projects/{project}:testIamPermissions"
    try:
        response = session.post(url, json={"permissions": list(GCP_PERMISSIONS)}, timeout=30)
    except Exception as exc:  # requests' and google-auth's errors alike: the check is advisory
        notes.append(f"permissions not checked: {type(exc).__name__}")
    else:
        if response.status_code == 200:
            granted = set(response.json().get("permissions", []))
            missing.extend(p for p in GCP_PERMISSIONS if p not in granted and p not in missing)
        else:
            notes.append(
                f"permissions not checked: projects.testIamPermissions answered HTTP {response.status_code} "
                "(is the Cloud Resource Manager API enabled?)"
            )
    return result(STATUS_MISSING if missing else STATUS_OK)
