"""Checking an AWS key by real calls, and the boto clients the aws provider shares.

STS GetCallerIdentity (the key is real; names account and identity), EC2 DescribeRegions (the
region exists and is enabled), then DryRun calls for every EC2 action the provider uses
(DryRunOperation means allowed, UnauthorizedOperation or AccessDenied means missing). The
endpoint comes only from `clouds.aws.endpoint_url`, never from an uploaded file.
"""

from __future__ import annotations

import threading
from typing import Any

from fedsky.controller.clouds.aws.credential import AwsCredential
from fedsky.controller.clouds.errors import scrub
from fedsky.controller.clouds.settings import AwsCloudConfig
from fedsky.controller.clouds.validation import (
    STATUS_INVALID,
    STATUS_MISSING,
    STATUS_OK,
    STATUS_REGION,
    STATUS_UNREACHABLE,
    ValidationResult,
    missing_message,
)

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
            message = missing_message(identity, account, "account", missing)
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
