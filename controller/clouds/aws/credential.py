"""AWS credentials: the files people have, read into a key pair (nothing else is kept).

Accepted: the access-key CSV the console downloads (`Access key ID,Secret access key`, or the
new-user variant with `User name`, `Password`, ... columns: only the key pair is kept), a JSON
with the key pair (`aws iam create-access-key` output, or flat `AccessKeyId`/`SecretAccessKey`
or `aws_access_key_id`/`aws_secret_access_key`), or one profile of a credentials ini file. A
profile that sets `endpoint_url` is refused: endpoints come only from the controller's config.
"""

from __future__ import annotations

import configparser
import csv
import io
import json
import re
from dataclasses import dataclass

from fedsky.controller.clouds.errors import CredentialFormatError
from fedsky.controller.clouds.plugin import decode_credential_file
from fedsky.controller.clouds.validation import REGION_RE
from fedsky.controller.clouds.vault import Secret

_AWS_KEY_ID_RE = re.compile(r"^A[A-Z0-9]{15,127}$")
_AWS_SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{40}$")


@dataclass(frozen=True)
class AwsCredential:
    """An AWS access key pair, with its session token when the file had one."""

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
    if region is not None and not REGION_RE.fullmatch(region):
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
    text = decode_credential_file(data, "AWS credential")
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
