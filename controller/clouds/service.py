"""The Cloud Authenticator: link AWS and GCP accounts by uploading the credential file one has.

A file is parsed here (never written anywhere as it came), checked by real calls to the cloud,
and only then sealed in the vault (`fedsky.controller.clouds.vault`). What is accepted:

- AWS: the access-key CSV the console downloads (`Access key ID,Secret access key`, or the
  new-user variant with `User name`, `Password`, ... columns: only the key pair is kept), a JSON
  with the key pair (`aws iam create-access-key` output, or flat `AccessKeyId`/`SecretAccessKey`
  or `aws_access_key_id`/`aws_secret_access_key`), or one profile of a credentials ini file.
- GCP: a service-account JSON key. Other Google credential files (`authorized_user`,
  `external_account`, ...) are refused with what to make instead.

Validation by real calls. AWS: STS GetCallerIdentity (the key is real; names account and
identity), EC2 DescribeRegions (the region exists and is enabled), then DryRun calls for every
EC2 action the provider uses (DryRunOperation means allowed, UnauthorizedOperation or
AccessDenied means missing). GCP: the OAuth token exchange (the key is live), zones.list in the
key's project (the project and the Compute API answer; the region exists), then Cloud Resource
Manager's `projects.testIamPermissions` for the permissions the provider uses, led by
`compute.instances.create`, the permission behind instances.insert: the Compute API itself has
no project-level permission test.

Endpoints come only from the controller's config, never from an uploaded file: an AWS profile
that sets `endpoint_url` is refused, and a GCP key's `token_uri` is used only if it is in
`clouds.gcp.allowed_token_uris` (Google's own by default) -- otherwise whoever wrote the key file
would receive the controller's signed assertions and could make it call any URL.
`clouds.gcp.token_uri`, when set, replaces every key's `token_uri` (the local fake, a private
endpoint).
"""

from __future__ import annotations

import asyncio
import configparser
import csv
import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedsky.controller.clouds.base import AggregatorProvider, ProviderError
from fedsky.controller.clouds.settings import AwsCloudConfig, CloudsConfig, GcpCloudConfig
from fedsky.controller.clouds.vault import (
    CloudRecord,
    Secret,
    Vault,
    VaultError,
    load_vault_key,
    now_iso,
)
from fedsky.controller.config import ControllerConfig
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.security import bootstrap_tokens
from fedsky.controller.security.bootstrap_tokens import (
    BrokerEndpoint,
    EnrolledAggregator,
    HealthCheck,
    TokenIssuer,
    VmBootstrap,
)
from fedsky.controller.security.pki import PkiError
from fedsky.controller.store import Store
from fedsky.shared import exitcodes
from fedsky.shared.ids import AGGREGATOR_PREFIX, is_aggregator_id

if TYPE_CHECKING:
    from fedsky.controller.clouds.aws.provider import AwsProvider
    from fedsky.controller.clouds.gcp.provider import GcpProvider

log = logging.getLogger(__name__)

CLOUDS = ("aws", "gcp")
MAX_FILE_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_AWS_KEY_ID_RE = re.compile(r"^A[A-Z0-9]{15,127}$")
_AWS_SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{40}$")
# Only a sanity check of the characters: whether a region exists is the cloud's answer.
_REGION_RE = re.compile(r"^[a-z][a-z0-9-]{1,40}$")

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_MISSING = "missing-permissions"
STATUS_REGION = "unknown-region"
STATUS_UNREACHABLE = "unreachable"

# EC2 actions the aws provider uses, each checked by a DryRun call (or a real read-only call).
AWS_ACTIONS = (
    "ec2:DescribeRegions",
    "ec2:DescribeImages",
    "ec2:DescribeVpcs",
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:DescribeInstances",
    "ec2:TerminateInstances",
    "ec2:CreateSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:DescribeSecurityGroups",
    "ec2:DeleteSecurityGroup",
)
_AWS_DENIED = {
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedAccess",
}
_AWS_BAD_KEY = {
    "InvalidClientTokenId": "AWS does not know this access key (InvalidClientTokenId): it was deleted, "
    "or it belongs to another partition",
    "SignatureDoesNotMatch": "AWS refused the secret access key (SignatureDoesNotMatch): it does not belong "
    "to this access key id; the file may be edited or truncated",
    "AuthFailure": "AWS could not validate the key (AuthFailure)",
    "ExpiredToken": "the session token has expired (ExpiredToken); upload a long-lived access key",
    "InvalidAccessKeyId": "AWS does not know this access key (InvalidAccessKeyId)",
}
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
GOOGLE_UNIVERSE = "googleapis.com"


class CloudError(Exception):
    """A cloud account that cannot be linked, verified or used as asked; safe to show."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int = 400,
        exit_code: int = exitcodes.FAILED,
        result: ValidationResult | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.exit_code = exit_code
        self.result = result


class CredentialFormatError(CloudError):
    """The uploaded file is not a credential we can read; nothing was sent anywhere."""


def scrub(text: str, secrets: Iterable[str | Secret | None]) -> str:
    """`text` with every secret value replaced: for messages built from SDK errors."""
    for item in secrets:
        value = item.reveal_str() if isinstance(item, Secret) else item
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text[:500]


# -- parsing: AWS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsCredential:
    access_key_id: str
    secret_access_key: Secret
    session_token: Secret | None
    region: str | None  # from a profile, if it named one
    source: str  # "csv", "json", "profile NAME", "vault"

    def __repr__(self) -> str:
        return f"AwsCredential(key={self.key_hint}, source={self.source!r})"

    @property
    def key_hint(self) -> str:
        return f"...{self.access_key_id[-4:]}"

    def secrets(self) -> tuple[str | Secret | None, ...]:
        return (self.secret_access_key, self.session_token, self.access_key_id)

    def seal_bytes(self) -> Secret:
        body = {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key.reveal_str(),
        }
        if self.session_token is not None:
            body["session_token"] = self.session_token.reveal_str()
        return Secret(json.dumps(body).encode())

    @classmethod
    def from_sealed(cls, secret: Secret) -> AwsCredential:
        body = json.loads(secret.reveal())
        token = body.get("session_token")
        return cls(
            access_key_id=body["access_key_id"],
            secret_access_key=Secret(body["secret_access_key"]),
            session_token=Secret(token) if token else None,
            region=None,
            source="vault",
        )


def _decode_text(data: bytes, what: str) -> str:
    if not data.strip():
        raise CredentialFormatError(f"the {what} file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise CredentialFormatError(
            f"the {what} file is {len(data)} bytes; credential files are under {MAX_FILE_BYTES // 1024} KiB"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialFormatError(f"the {what} file is not UTF-8 text") from None


def _check_aws_pair(key_id: str, secret: str, where: str) -> None:
    if not _AWS_KEY_ID_RE.fullmatch(key_id):
        raise CredentialFormatError(
            f"{where}: the access key id does not look like an AWS one (20 upper-case letters and "
            "digits starting with 'A'); the file may be truncated or edited"
        )
    if not _AWS_SECRET_RE.fullmatch(secret):
        detail = (
            f"{len(secret)} characters, AWS's are 40"
            if len(secret) != 40
            else "unexpected characters"
        )
        raise CredentialFormatError(
            f"{where}: the secret access key is malformed ({detail}); the file may be truncated or edited"
        )


def _norm(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


def _parse_aws_json(text: str) -> AwsCredential:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialFormatError(
            f"the JSON file does not parse (line {exc.lineno}, column {exc.colno}): {exc.msg}; "
            "is it truncated?"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialFormatError(
            "the JSON file must hold an object with AccessKeyId and SecretAccessKey"
        )
    if doc.get("type") in ("service_account", "authorized_user", "external_account"):
        raise CredentialFormatError(
            "this is a Google Cloud credential file; link it with `fedctl clouds add gcp`"
        )
    for wrapper in ("AccessKey", "Credentials"):
        if isinstance(doc.get(wrapper), dict):
            doc = doc[wrapper]
    fields = {_norm(k): v for k, v in doc.items() if isinstance(v, str)}
    key_id = fields.get("accesskeyid") or fields.get("awsaccesskeyid")
    secret = fields.get("secretaccesskey") or fields.get("awssecretaccesskey")
    token = fields.get("sessiontoken") or fields.get("awssessiontoken")
    if not key_id or not secret:
        raise CredentialFormatError(
            "the JSON file has no key pair: expected AccessKeyId and SecretAccessKey "
            "(or aws_access_key_id and aws_secret_access_key)"
        )
    key_id, secret = key_id.strip(), secret.strip()
    _check_aws_pair(key_id, secret, "JSON file")
    return AwsCredential(
        key_id, Secret(secret), Secret(token.strip()) if token else None, None, "json"
    )


def _parse_aws_ini(text: str, profile: str | None) -> AwsCredential:
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00fedsky-none")
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        # The message quotes the offending line, which may hold a secret: say where, not what.
        line = getattr(exc, "lineno", None)
        at = f" at line {line}" if line else ""
        raise CredentialFormatError(
            f"the credentials file does not parse as an ini file{at}"
        ) from None
    wanted = profile or "default"
    # The credentials file says `[name]`, the config file `[profile name]`: accept both.
    sections = {s.removeprefix("profile ").strip(): s for s in parser.sections()}
    if wanted not in sections:
        have = ", ".join(sorted(sections)) or "none"
        raise CredentialFormatError(
            f"no profile {wanted!r} in the credentials file (it has: {have}); use --profile"
        )
    section = parser[sections[wanted]]
    where = f"profile {wanted!r}"
    for option in ("endpoint_url", "ca_bundle"):
        if option in section:
            raise CredentialFormatError(
                f"{where} sets {option}; fedsky takes endpoints only from the controller's config "
                "(clouds.aws.endpoint_url), never from an uploaded file: remove it"
            )
    key_id = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    if not key_id or not secret:
        indirect = [
            o
            for o in (
                "role_arn",
                "source_profile",
                "credential_process",
                "sso_start_url",
                "sso_session",
            )
            if o in section
        ]
        if indirect:
            raise CredentialFormatError(
                f"{where} uses {', '.join(indirect)}, which gives no access key fedsky can keep; "
                "create an access key for an IAM user and upload it"
            )
        raise CredentialFormatError(f"{where} has no aws_access_key_id and aws_secret_access_key")
    _check_aws_pair(key_id, secret, where)
    token = section.get("aws_session_token", "").strip()
    region = section.get("region", "").strip() or None
    if region is not None and not _REGION_RE.fullmatch(region):
        raise CredentialFormatError(
            f"{where} names region {region!r}, which is not an AWS region name"
        )
    return AwsCredential(
        key_id, Secret(secret), Secret(token) if token else None, region, f"profile {wanted}"
    )


def _parse_aws_csv(text: str) -> AwsCredential:
    try:
        rows = [
            row
            for row in csv.reader(io.StringIO(text, newline=""))
            if any(cell.strip() for cell in row)
        ]
    except csv.Error:
        raise CredentialFormatError(
            "the file does not parse as CSV (nor as JSON or an ini file)"
        ) from None
    if not rows:
        raise CredentialFormatError("the CSV file has no rows")
    header = [_norm(cell) for cell in rows[0]]
    if "accesskeyid" not in header or "secretaccesskey" not in header:
        raise CredentialFormatError(
            "not an AWS access-key file: expected a CSV with 'Access key ID' and 'Secret access key' "
            "columns (as the console downloads it), a JSON key pair, or a credentials ini file"
        )
    data = rows[1:]
    if not data:
        raise CredentialFormatError("the CSV file has a header but no key: is it truncated?")
    if len(data) > 1:
        raise CredentialFormatError(f"the CSV file holds {len(data)} keys; upload a file with one")
    row = data[0]
    if len(row) < len(header):
        raise CredentialFormatError(
            f"the CSV row has {len(row)} of {len(header)} columns: the file looks truncated"
        )
    key_id = row[header.index("accesskeyid")].strip()
    secret = row[header.index("secretaccesskey")].strip()
    _check_aws_pair(key_id, secret, "CSV file")
    # Any other column (a console password, a login link) is dropped here, never stored.
    return AwsCredential(key_id, Secret(secret), None, None, "csv")


def parse_aws(data: bytes, *, profile: str | None = None) -> AwsCredential:
    """An AWS key pair from a console CSV, a JSON file or a credentials ini profile."""
    text = _decode_text(data, "AWS credential")
    stripped = text.lstrip()
    if stripped.startswith("{"):
        kind = "json"
    elif re.search(r"^\s*\[[^\]\n]+\]\s*$", text, re.MULTILINE):
        kind = "ini"
    else:
        kind = "csv"
    if profile is not None and kind != "ini":
        raise CredentialFormatError(
            "--profile applies to a credentials ini file; this file is " + kind.upper()
        )
    if kind == "json":
        return _parse_aws_json(text)
    if kind == "ini":
        return _parse_aws_ini(text, profile)
    return _parse_aws_csv(text)


# -- parsing: GCP --------------------------------------------------------------------------------

_GCP_OTHER_TYPES = {
    "authorized_user": "a user's credential (from `gcloud auth application-default login`), not a "
    "service-account key",
    "external_account": "a workload identity federation configuration, not a service-account key",
    "impersonated_service_account": "an impersonation configuration, not a service-account key",
    "external_account_authorized_user": "a workforce identity user credential, not a service-account key",
    "gdch_service_account": "a Google Distributed Cloud Hosted credential, not a service-account key",
}


@dataclass(frozen=True)
class GcpCredential:
    project_id: str
    client_email: str
    private_key_id: str
    token_uri: str
    info: Secret  # the key file's JSON (holds the private key)

    def __repr__(self) -> str:
        return f"GcpCredential(project={self.project_id!r}, email={self.client_email!r})"

    @property
    def key_hint(self) -> str:
        return f"...{self.private_key_id[-6:]}"

    def secrets(self) -> tuple[str | Secret | None, ...]:
        doc = json.loads(self.info.reveal())
        key = str(doc.get("private_key", ""))
        # The PEM's base64 lines each identify the key; scrub any that an error might quote.
        return (self.info, key, *[line for line in key.splitlines() if len(line) > 20])

    def seal_bytes(self) -> Secret:
        return self.info

    @classmethod
    def from_sealed(cls, secret: Secret) -> GcpCredential:
        return parse_gcp(secret.reveal())


def parse_gcp(data: bytes) -> GcpCredential:
    """A GCP service-account key; any other Google credential file is refused, saying what it is."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    text = _decode_text(data, "GCP key")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialFormatError(
            f"the GCP key file does not parse as JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}; "
            "is it truncated?"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialFormatError("the GCP key file must hold a JSON object")
    kind = doc.get("type")
    if kind is not None and not isinstance(kind, str):
        raise CredentialFormatError("not a GCP service-account key (its 'type' is not a string)")
    if kind in _GCP_OTHER_TYPES:
        raise CredentialFormatError(
            f"this file is {_GCP_OTHER_TYPES[kind]}; fedsky needs a service-account key: "
            "`gcloud iam service-accounts keys create key.json --iam-account NAME@PROJECT.iam.gserviceaccount.com`"
        )
    if kind != "service_account":
        raise CredentialFormatError(
            f"not a GCP service-account key (its type is {kind!r}, expected 'service_account')"
            if kind is not None
            else "not a GCP service-account key (no 'type' field)"
        )
    required = ("project_id", "private_key_id", "private_key", "client_email", "token_uri")
    missing = [f for f in required if not isinstance(doc.get(f), str) or not doc[f].strip()]
    if missing:
        raise CredentialFormatError(
            f"the service-account key lacks {', '.join(missing)}; the file may be truncated"
        )
    try:
        key = serialization.load_pem_private_key(doc["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise CredentialFormatError(
            "the service-account key's private_key does not load (truncated or edited?)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialFormatError("the service-account key's private_key is not an RSA key")
    universe = doc.get("universe_domain", GOOGLE_UNIVERSE)
    if universe != GOOGLE_UNIVERSE:
        raise CredentialFormatError(
            f"the key belongs to universe {universe!r}; fedsky links keys of {GOOGLE_UNIVERSE} only"
        )
    return GcpCredential(
        project_id=doc["project_id"].strip(),
        client_email=doc["client_email"].strip(),
        private_key_id=doc["private_key_id"].strip(),
        token_uri=doc["token_uri"].strip(),
        info=Secret(json.dumps(doc).encode()),
    )


# -- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationResult:
    """What the cloud said about a credential: names account and identity, and what is missing."""

    cloud: str
    status: str
    account: str | None
    identity: str | None
    region: str | None
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "cloud": self.cloud,
            "status": self.status,
            "account": self.account,
            "identity": self.identity,
            "region": self.region,
            "missing": list(self.missing),
            "notes": list(self.notes),
            "message": self.message,
        }


def _missing_message(
    identity: str | None, account: str | None, where: str, missing: Collection[str]
) -> str:
    return (
        f"{identity} in {where} {account} lacks {', '.join(missing)}; grant these (docs/clouds.md has a "
        "policy) and run `fedctl clouds verify`"
    )


# AWS ----------------------------------------------------------------------------------------------


_botocore_lock = threading.Lock()
_botocore_session: Any = None


def aws_client(cred: AwsCredential, service: str, config: AwsCloudConfig, region: str) -> Any:
    """A boto client signing with `cred`, on the configured endpoint.

    One botocore session serves every credential (each client gets its keys explicitly): the
    session caches the service models, which otherwise cost a quarter-second per client.
    """
    import botocore.session
    from botocore.config import Config

    global _botocore_session
    boto_config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        user_agent_extra="fedsky",
    )
    with _botocore_lock:
        if _botocore_session is None:
            _botocore_session = botocore.session.get_session()
        return _botocore_session.create_client(
            service,
            region_name=region,
            endpoint_url=config.endpoint_url,
            aws_access_key_id=cred.access_key_id,
            aws_secret_access_key=cred.secret_access_key.reveal_str(),
            aws_session_token=cred.session_token.reveal_str() if cred.session_token else None,
            config=boto_config,
        )


def aws_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def resolve_aws_image(ec2: Any, config: AwsCloudConfig, region: str) -> str | None:
    """The aggregator's AMI in `region`: configured, else the newest matching public image."""
    if region in config.images:
        return config.images[region]
    images = ec2.describe_images(
        Owners=[config.image_owner],
        Filters=[
            {"Name": "name", "Values": [config.image_name]},
            {"Name": "architecture", "Values": ["x86_64"]},
            {"Name": "state", "Values": ["available"]},
        ],
    )["Images"]
    if not images:
        return None
    # Newest first by date; the name (which carries version and build date) breaks ties.
    newest = max(
        images, key=lambda image: (str(image.get("CreationDate", "")), str(image.get("Name", "")))
    )
    return str(newest["ImageId"])


def validate_aws(
    cred: AwsCredential, *, config: AwsCloudConfig, region: str | None = None
) -> ValidationResult:
    """Check an AWS key by real calls (blocking: run it in a thread)."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = region or cred.region or config.validation_region
    account: str | None = None
    identity: str | None = None
    missing: list[str] = []
    notes: list[str] = []

    def result(status: str, message: str = "") -> ValidationResult:
        if status == STATUS_MISSING:
            message = _missing_message(identity, account, "account", missing)
        return ValidationResult(
            "aws", status, account, identity, where, tuple(missing), tuple(notes), message
        )

    def check(action: str, fn: Any, **kwargs: Any) -> Any:
        """Run one call; a denial records `action` as missing. Returns the response or None."""
        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = aws_error_code(exc)
            if code == "DryRunOperation":
                return {}
            if code in _AWS_BAD_KEY:
                raise
            if code in _AWS_DENIED:
                missing.append(action)
            else:
                notes.append(f"{action} not checked: AWS answered {code}")
            return None

    # Placeholders for the DryRun calls that need a resource id: permission is checked first.
    instance, group = "i-00000000000000000", "sg-00000000000000000"
    try:
        # STS and DescribeRegions go to a region known to exist: an unknown one has no endpoint.
        ident = aws_client(cred, "sts", config, config.validation_region).get_caller_identity()
        account, identity = str(ident["Account"]), str(ident["Arn"])
        ec2 = aws_client(cred, "ec2", config, config.validation_region)
        regions = check("ec2:DescribeRegions", ec2.describe_regions, AllRegions=True)
        if regions is not None:
            known = {r["RegionName"]: r.get("OptInStatus", "") for r in regions.get("Regions", [])}
            if where not in known:
                sample = ", ".join(sorted(known)[:6])
                return result(
                    STATUS_REGION, f"unknown AWS region {where!r} (regions include {sample}, ...)"
                )
            if known[where] == "not-opted-in":
                return result(
                    STATUS_REGION,
                    f"region {where!r} is not enabled for account {account}; enable it or choose another",
                )
        if where != config.validation_region:
            ec2 = aws_client(cred, "ec2", config, where)
        check("ec2:DescribeVpcs", ec2.describe_vpcs, DryRun=True)
        image: str | None = None
        if (
            where in config.images
            or check("ec2:DescribeImages", ec2.describe_images, DryRun=True) is not None
        ):
            image = resolve_aws_image(ec2, config, where)
            if image is None:
                notes.append(
                    f"no image named {config.image_name!r} from owner {config.image_owner} in {where}: "
                    "set clouds.aws.images"
                )
        if image is None:
            notes.append("ec2:RunInstances not checked: no image to try it with")
        else:
            check(
                "ec2:RunInstances",
                ec2.run_instances,
                DryRun=True,
                ImageId=image,
                InstanceType=config.validation_instance_type,
                MinCount=1,
                MaxCount=1,
            )
        tag = [{"Key": "fedsky:check", "Value": "1"}]
        rule = {
            "IpProtocol": "tcp",
            "FromPort": 9092,
            "ToPort": 9092,
            "IpRanges": [{"CidrIp": "192.0.2.1/32"}],
        }
        check("ec2:CreateTags", ec2.create_tags, DryRun=True, Resources=[instance], Tags=tag)
        check("ec2:DescribeInstances", ec2.describe_instances, DryRun=True)
        check(
            "ec2:TerminateInstances", ec2.terminate_instances, DryRun=True, InstanceIds=[instance]
        )
        check(
            "ec2:CreateSecurityGroup",
            ec2.create_security_group,
            DryRun=True,
            GroupName="fedsky-permission-check",
            Description="fedsky permission check (dry run)",
        )
        check(
            "ec2:AuthorizeSecurityGroupIngress",
            ec2.authorize_security_group_ingress,
            DryRun=True,
            GroupId=group,
            IpPermissions=[rule],
        )
        check("ec2:DescribeSecurityGroups", ec2.describe_security_groups, DryRun=True)
        check("ec2:DeleteSecurityGroup", ec2.delete_security_group, DryRun=True, GroupId=group)
    except ClientError as exc:
        code = aws_error_code(exc)
        message = _AWS_BAD_KEY.get(code) or scrub(f"AWS answered {code}: {exc}", cred.secrets())
        return result(STATUS_INVALID, message)
    except BotoCoreError as exc:
        detail = scrub(f"{type(exc).__name__}: {exc}", cred.secrets())
        return result(STATUS_UNREACHABLE, f"cannot reach AWS: {detail}")
    return result(STATUS_MISSING if missing else STATUS_OK)


# GCP ----------------------------------------------------------------------------------------------


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
            message = _missing_message(identity, project, "project", missing)
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


# -- the service the API and the job pipeline use ------------------------------------------------


def _default_name(cloud: str, account: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"{cloud}-{account}".lower()).strip("-")
    return name[:63].rstrip("-")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise CloudError(
            f"invalid name {name!r}: use 1-63 characters from a-z, 0-9 and '-', starting with a letter or digit",
            exit_code=exitcodes.USAGE,
        )
    return name


class CloudService:
    """Link, list, verify and remove cloud accounts; make providers for linked ones.

    The object the API finds at `services.parts["clouds"]`. Every method is async; cloud calls
    run in threads.
    """

    def __init__(
        self,
        *,
        config: CloudsConfig,
        store: Store,
        vault: Vault,
        pki: Any = None,
        health_check: HealthCheck | None = None,
        broker: BrokerEndpoint | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.vault = vault
        self.pki = pki
        # What an aggregator VM is told at enrolment, and where the jobs' model files are.
        self.broker = broker
        self.model_dir = model_dir
        self._health_check = health_check
        self._uid: str | None = None

    @classmethod
    def open(
        cls,
        *,
        config: ControllerConfig,
        store: Store,
        pki: Any = None,
        health_check: HealthCheck | None = None,
    ) -> CloudService:
        """Load the vault key, declare the tables; fails with VaultError on a bad key."""
        # Imported here: the job pipeline is heavy, and only its model files' place is needed.
        from fedsky.controller.jobs.manager import model_files_dir

        Vault.ensure_schema(store)
        bootstrap_tokens.ensure_schema(store)
        jobstore.ensure_schema(store)  # enrolment reads the job's model and state
        vault = Vault(store, load_vault_key(config.state_dir))
        return cls(
            config=config.clouds,
            store=store,
            vault=vault,
            pki=pki,
            health_check=health_check,
            broker=BrokerEndpoint(
                host=config.broker_public_host,
                port=config.broker.port,
                topic_prefix=config.bus.topic_prefix,
            ),
            model_dir=model_files_dir(config),
        )

    # -- parse and validate ---------------------------------------------------------------------

    @staticmethod
    def parse(
        cloud: str, data: bytes, *, profile: str | None = None
    ) -> AwsCredential | GcpCredential:
        if cloud == "aws":
            return parse_aws(data, profile=profile)
        if cloud == "gcp":
            if profile is not None:
                raise CredentialFormatError("--profile applies to AWS credentials ini files only")
            return parse_gcp(data)
        raise CloudError(
            f"unknown cloud {cloud!r}: fedsky links {' and '.join(CLOUDS)}", http_status=404
        )

    async def validate(
        self, cred: AwsCredential | GcpCredential, *, region: str | None = None
    ) -> ValidationResult:
        if region is not None and not _REGION_RE.fullmatch(region):
            raise CloudError(f"{region!r} is not a region name", exit_code=exitcodes.USAGE)
        if isinstance(cred, AwsCredential):
            result = await asyncio.to_thread(
                validate_aws, cred, config=self.config.aws, region=region
            )
        else:
            gcp_token_uri(cred, self.config.gcp)  # refuse before anything is sent
            result = await asyncio.to_thread(
                validate_gcp, cred, config=self.config.gcp, region=region
            )
        log.info(
            "validated %s credential %s: %s%s",
            result.cloud,
            cred.key_hint,
            result.status,
            f" (missing {', '.join(result.missing)})" if result.missing else "",
        )
        return result

    # -- the operator's commands ----------------------------------------------------------------

    async def add(
        self,
        *,
        cloud: str,
        data: bytes,
        name: str | None = None,
        profile: str | None = None,
        region: str | None = None,
    ) -> tuple[CloudRecord, ValidationResult]:
        """Parse, validate by real calls, then seal and store. Nothing is stored unless valid."""
        cred = self.parse(cloud, data, profile=profile)
        if name is not None:
            check_name(name)
            if await self.vault.exists(name):
                raise CloudError(
                    f"a cloud account named {name!r} is already linked", http_status=409
                )
        result = await self.validate(cred, region=region)
        if result.status == STATUS_UNREACHABLE:
            raise CloudError(
                result.message, http_status=502, exit_code=exitcodes.UNAVAILABLE, result=result
            )
        if not result.ok:
            raise CloudError(result.message, http_status=422, result=result)
        assert result.account is not None
        assert result.identity is not None
        name = name or _default_name(cloud, result.account)
        now = now_iso()
        record = CloudRecord(
            name=check_name(name),
            cloud=cloud,
            account=result.account,
            identity=result.identity,
            region=result.region,
            key_hint=cred.key_hint,
            status=result.status,
            missing=result.missing,
            message="; ".join(result.notes),
            created_at=now,
            validated_at=now,
        )
        try:
            await self.vault.add(record, cred.seal_bytes())
        except VaultError as exc:
            raise CloudError(str(exc), http_status=409) from None
        log.info(
            "linked %s account %s as %r (%s)", cloud, record.account, record.name, record.identity
        )
        return record, result

    async def records(self) -> list[CloudRecord]:
        """Every linked account, as `fedctl clouds list` shows it."""
        return await self.vault.list()

    async def _credential(self, name: str) -> tuple[CloudRecord, AwsCredential | GcpCredential]:
        try:
            record, secret = await self.vault.secret(name)
        except VaultError as exc:
            raise CloudError(
                str(exc), http_status=404 if "no cloud account" in str(exc) else 500
            ) from None
        cred: AwsCredential | GcpCredential
        cred = (
            AwsCredential.from_sealed(secret)
            if record.cloud == "aws"
            else GcpCredential.from_sealed(secret)
        )
        return record, cred

    async def verify(
        self, name: str, *, region: str | None = None
    ) -> tuple[CloudRecord, ValidationResult]:
        """Validate a linked account again and store the outcome (status, missing, when)."""
        record, cred = await self._credential(name)
        try:
            result = await self.validate(cred, region=region or record.region)
        except CredentialFormatError as exc:  # e.g. a token_uri no longer allowed by the config
            result = ValidationResult(
                record.cloud,
                STATUS_INVALID,
                record.account,
                record.identity,
                record.region,
                message=exc.message,
            )
        message = result.message or "; ".join(result.notes)
        updated = await self.vault.update_status(
            name,
            status=result.status,
            missing=result.missing,
            message=message,
            account=result.account,
            identity=result.identity,
        )
        return updated, result

    async def remove(self, name: str) -> None:
        try:
            await self.vault.remove(name)
        except VaultError as exc:
            raise CloudError(str(exc), http_status=404) from None
        log.info("removed linked cloud account %r", name)

    # -- what the job pipeline calls --------------------------------------------------------------

    async def linked_clouds(self) -> list[str]:
        """Clouds with at least one account whose last validation passed: where jobs may go."""
        return sorted({r.cloud for r in await self.vault.list() if r.status == STATUS_OK})

    async def controller_uid(self) -> str:
        """This controller's id in cloud tags: another controller's VMs are never swept."""
        if self._uid is None:
            self._uid = await self.vault.meta("controller_uid", uuid.uuid4().hex[:12])
        return self._uid

    async def _bootstrap(self) -> VmBootstrap:
        if self.pki is None:
            raise ProviderError("the controller has no CA loaded; cannot launch an aggregator VM")
        ca_pem: bytes = self.pki.ca_cert_pem
        return VmBootstrap(
            tokens=TokenIssuer(self.store, self.config.token_ttl_s),
            enroll_url=self.config.enroll_url,
            ca_pem=ca_pem,
            superlink_port=self.config.superlink_port,
            package=self.config.package,
            pip_index_url=self.config.pip_index_url,
            preinstalled=self.config.preinstalled,
            health_check=self._health_check or bootstrap_tokens.tls_probe(ca_pem),
            ready_timeout_s=self.config.ready_timeout_s,
            poll_interval_s=self.config.poll_interval_s,
            controller_uid=await self.controller_uid(),
        )

    async def provider(self, name: str) -> AwsProvider | GcpProvider:
        """The provider for the linked account `name`, as stored (no validation)."""
        record, cred = await self._credential(name)
        bootstrap = await self._bootstrap()
        if isinstance(cred, AwsCredential):
            from fedsky.controller.clouds.aws.provider import AwsProvider

            return AwsProvider(
                credential=cred,
                config=self.config.aws,
                bootstrap=bootstrap,
                account_name=record.name,
            )
        from fedsky.controller.clouds.gcp.provider import GcpProvider

        return GcpProvider(
            credential=cred, config=self.config.gcp, bootstrap=bootstrap, account_name=record.name
        )

    async def provider_for_launch(
        self, cloud: str, *, region: str, name: str | None = None
    ) -> AggregatorProvider:
        """A provider for `cloud` whose credential validates now, in `region`; ProviderError if none.

        Tries the named account, or every account linked for `cloud` (last known good first);
        each check updates the stored status, so `fedctl clouds list` shows why a launch was refused.
        """
        if cloud not in CLOUDS:
            raise ProviderError(
                f"fedsky cannot launch on {cloud!r}: its cloud providers are {', '.join(CLOUDS)}"
            )
        records = [r for r in await self.vault.list(cloud) if name is None or r.name == name]
        if not records:
            what = f"account {name!r}" if name else f"{cloud} account"
            raise ProviderError(
                f"no {what} is linked; link one with `fedctl clouds add {cloud} FILE`"
            )
        records.sort(key=lambda r: (r.status != STATUS_OK, r.name))
        refusals = []
        for record in records:
            try:
                updated, result = await self.verify(record.name, region=region)
            except CloudError as exc:
                refusals.append(f"{record.name}: {exc.message}")
                continue
            if result.ok:
                return await self.provider(updated.name)
            refusals.append(f"{record.name}: {result.status}: {result.message}")
        raise ProviderError(
            f"refusing to launch on {cloud} in {region}: no linked credential validates now ("
            + "; ".join(refusals)
            + ")"
        )

    async def sweep_orphans(self, active_job_ids: Collection[str]) -> list[str]:
        """Terminate fedsky's VMs (and firewall rules) on every linked account whose job is not active.

        Called once at start with the jobs that are still running. Returns the references of what
        was terminated ("aws:us-east-1/i-...", "gcp:europe-west1-b/fedsky-agg-..."). An account
        that cannot be reached is logged and skipped: the next start sweeps it again.
        """
        swept: list[str] = []
        for record in await self.vault.list():
            try:
                provider = await self.provider(record.name)
                swept.extend(await provider.sweep_orphans(active_job_ids))
            except (CloudError, ProviderError, VaultError) as exc:
                log.warning("orphan sweep skipped account %r: %s", record.name, exc)
        return swept

    async def enroll_aggregator(
        self, *, token: str, csr_pem: bytes, bus_csr_pem: bytes
    ) -> EnrolledAggregator:
        """Redeem a VM's one-time token for its two certificates (see `bootstrap_tokens`).

        Both are recorded, so the job's end revokes them by name with the rest of `agg-<job>`'s.
        """
        if self.pki is None or self.broker is None:
            raise CloudError("the controller has no CA loaded", http_status=503)
        from fedsky.controller.security.enrollment import record_certificate

        pki = self.pki
        days = self.config.cert_days

        def enroll(conn: Any) -> bootstrap_tokens.AggregatorCertificates:
            return bootstrap_tokens.enroll_aggregator(
                conn, pki, token=token, csr_pem=csr_pem, bus_csr_pem=bus_csr_pem, days=days
            )

        certs = await self.store.run(enroll)
        for issued in (certs.server, certs.bus):
            try:
                await self.store.run(record_certificate, issued)
            except Exception:  # issued already; a missing record only weakens revocation by name
                log.exception(
                    "could not record the %s certificate of job %s's aggregator",
                    issued.kind,
                    certs.job_id,
                )
        try:
            job = await self.store.run(jobstore.get_job, certs.job_id)
            model_sha256: str | None = str(job["model_digest"])
        except jobstore.JobNotFound:
            log.error("aggregator of job %s enrolled, but the job has no record", certs.job_id)
            model_sha256 = None
        return EnrolledAggregator(
            job_id=certs.job_id,
            cert_pem=certs.server.cert_pem,
            ca_pem=pki.ca_cert_pem,
            bus_cert_pem=certs.bus.cert_pem,
            broker=self.broker,
            model_sha256=model_sha256,
        )

    async def aggregator_model(self, peer_cert_der: bytes | None) -> tuple[Path, str]:
        """The model file (path, SHA-256) of the job whose aggregator presented `peer_cert_der`.

        Only to a bus certificate this CA issued to `agg-<job id>`, recorded as an `aggregator`
        certificate and not revoked (CloudError 403), of a job that is still active (404).
        """
        if self.pki is None or self.model_dir is None:
            raise CloudError("the controller has no CA loaded", http_status=503)
        refused = CloudError(
            "a valid aggregator bus certificate is required (mutual TLS)", http_status=403
        )
        if not peer_cert_der:
            raise refused
        try:
            cert = x509.load_der_x509_certificate(peer_cert_der)
            self.pki.verify(cert.public_bytes(serialization.Encoding.PEM))
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            common_name = str(names[0].value) if names else ""
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, PkiError, x509.ExtensionNotFound):
            raise refused from None
        if not is_aggregator_id(common_name) or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise refused
        job_id = common_name.removeprefix(AGGREGATOR_PREFIX)
        serial = str(cert.serial_number)

        def lookup(conn: Any) -> tuple[Any, dict[str, Any] | None]:
            row = conn.execute(
                "SELECT common_name, kind, revoked_at FROM certificates WHERE serial = ?",
                (serial,),
            ).fetchone()
            try:
                return row, jobstore.get_job(conn, job_id)
            except jobstore.JobNotFound:
                return row, None

        row, job = await self.store.run(lookup)
        if (
            row is None
            or row["common_name"] != common_name
            or row["kind"] != "aggregator"
            or row["revoked_at"] is not None
        ):
            raise refused
        if job is None or job["state"] not in jobstore.ACTIVE_STATES:
            raise CloudError(f"job {job_id} is not active", http_status=404)
        digest = str(job["model_digest"])
        path = self.model_dir / f"{digest}.safetensors"
        if not path.is_file():
            raise CloudError(f"the model file of job {job_id} is missing", http_status=404)
        return path, digest


def with_result(record: CloudRecord, result: ValidationResult) -> dict[str, Any]:
    """The API's view of a record together with the validation that produced it."""
    body = record.to_json()
    body["notes"] = list(result.notes)
    return body


__all__ = [
    "CLOUDS",
    "AwsCredential",
    "CloudError",
    "CloudService",
    "CredentialFormatError",
    "GcpCredential",
    "ValidationResult",
    "parse_aws",
    "parse_gcp",
    "validate_aws",
    "validate_gcp",
]
