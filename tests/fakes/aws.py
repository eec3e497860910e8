"""moto's AWS server on loopback, with IAM authentication switched on.

`POST /moto-api/reset-auth` with a count N lets the next N requests through unauthenticated;
after that every request must be signed by a key IAM knows, and IAM policies decide what it may
do (a wrong secret gives SignatureDoesNotMatch, an unknown key InvalidClientTokenId). The first
three requests make an admin user, its policy and its key; the admin then makes everything else.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Every aws test wants instance types checked as AWS does (read by moto at import, and again
# below in case moto was imported first).
os.environ["MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION"] = "true"

import boto3
from moto import settings as moto_settings
from moto.server import ThreadedMotoServer

moto_settings.EC2_ENABLE_INSTANCE_TYPE_VALIDATION = True

REGION = "us-east-1"
# The EC2 actions fedsky's provider uses (see fedsky.controller.clouds.aws.validate.AWS_ACTIONS).
PROVIDER_ACTIONS = (
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


@dataclass(frozen=True)
class AwsKey:
    user: str
    access_key_id: str
    secret_access_key: str

    def console_csv(self, *, with_user: bool = False) -> bytes:
        """The file the console's "Download .csv file" button gives."""
        if with_user:
            return (
                "\ufeffUser name,Password,Access key ID,Secret access key,Console login link\r\n"
                f"{self.user},Hunter2-console-pw,{self.access_key_id},{self.secret_access_key},"
                "https://123456789012.signin.aws.amazon.com/console\r\n"
            ).encode()
        return (
            "\ufeffAccess key ID,Secret access key\r\n"
            f"{self.access_key_id},{self.secret_access_key}\r\n"
        ).encode()


def _policy(actions: Sequence[str]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}],
        }
    )


class MotoAws:
    """A moto server with auth on; `user()` makes IAM users with exactly the given actions."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._post("/moto-api/reset", b"")
        self._post("/moto-api/reset-auth", b"3")
        iam = self._iam(None)
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=_policy(["*"]))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        self.admin = AwsKey("admin", key["AccessKeyId"], key["SecretAccessKey"])
        self.account = boto3.client(
            "sts",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.admin.access_key_id,
            aws_secret_access_key=self.admin.secret_access_key,
        ).get_caller_identity()["Account"]

    def _post(self, path: str, body: bytes) -> None:
        host, port = self.server.get_host_and_port()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, f"moto {path}: HTTP {resp.status}"
        finally:
            conn.close()

    def _iam(self, key: AwsKey | None) -> Any:
        creds = (
            {"aws_access_key_id": key.access_key_id, "aws_secret_access_key": key.secret_access_key}
            if key
            else {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key": "x" * 40}
        )
        return boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, **creds)

    def client(self, service: str, region: str = REGION, key: AwsKey | None = None) -> Any:
        key = key or self.admin
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=region,
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
        )

    def user(self, name: str, actions: Sequence[str] = PROVIDER_ACTIONS) -> AwsKey:
        """A new IAM user (name made unique: the server outlives a test) with a key."""
        name = f"{name}-{uuid.uuid4().hex[:8]}"
        iam = self._iam(self.admin)
        iam.create_user(UserName=name)
        if actions:
            iam.put_user_policy(UserName=name, PolicyName="fedsky", PolicyDocument=_policy(actions))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return AwsKey(name, key["AccessKeyId"], key["SecretAccessKey"])

    def set_actions(self, user: str, actions: Sequence[str]) -> None:
        self._iam(self.admin).put_user_policy(
            UserName=user, PolicyName="fedsky", PolicyDocument=_policy(actions)
        )

    def delete_key(self, key: AwsKey) -> None:
        self._iam(self.admin).delete_access_key(UserName=key.user, AccessKeyId=key.access_key_id)

    def auth(self, on: bool) -> None:
        """Authentication is process-wide in moto: on for a test of ours, off after it."""
        self._post("/moto-api/reset-auth", b"0" if on else b"inf")

    def close(self) -> None:
        self.auth(False)
        self._post("/moto-api/reset", b"")
        self.server.stop()


_shared: MotoAws | None = None


def shared_moto() -> MotoAws:
    """One server per test process: moto loads each region's EC2 data once (seconds), not per test."""
    global _shared
    if _shared is None:
        _shared = MotoAws()
        atexit.register(_shared.close)
    _shared.auth(True)
    return _shared
