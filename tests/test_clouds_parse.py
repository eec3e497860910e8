"""Reading the credential files people actually have, and refusing the rest clearly."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedsky.controller.clouds.aws.credential import parse_aws
from fedsky.controller.clouds.catalog import CLOUD_PLUGINS
from fedsky.controller.clouds.errors import CredentialFormatError
from fedsky.controller.clouds.gcp.credential import parse_gcp
from fedsky.controller.clouds.gcp.validate import gcp_token_uri
from fedsky.controller.clouds.settings import GcpCloudConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.aws import AwsKey
from tests.fakes.gcp_server import make_service_account_key

KEY_ID = "AKIAZ7QWERTYUIOP1234"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYz1EXAMPLEK"
KEY = AwsKey("alice", KEY_ID, SECRET)
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def _sa(**changes: object) -> dict[str, object]:
    info, _ = make_service_account_key(
        project="proj-1", email="fl@proj-1.iam.gserviceaccount.com", token_uri=GOOGLE_TOKEN_URI
    )
    info.update(changes)
    return info


# -- AWS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_user", [False, True])
def test_console_csv_both_layouts(with_user: bool) -> None:
    cred = parse_aws(KEY.console_csv(with_user=with_user))
    assert cred.access_key_id == KEY_ID
    assert cred.secret_access_key.reveal_str() == SECRET
    assert cred.source == "csv"
    # The new-user layout carries a console password: it is dropped, never kept.
    assert b"Hunter2" not in cred.seal_bytes().reveal()


@pytest.mark.parametrize(
    "doc",
    [
        {
            "AccessKey": {
                "UserName": "alice",
                "AccessKeyId": KEY_ID,
                "SecretAccessKey": SECRET,
                "Status": "Active",
            }
        },
        {"AccessKeyId": KEY_ID, "SecretAccessKey": SECRET},
        {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET},
    ],
)
def test_json_key_pairs(doc: dict[str, object]) -> None:
    cred = parse_aws(json.dumps(doc).encode())
    assert (cred.access_key_id, cred.secret_access_key.reveal_str(), cred.source) == (
        KEY_ID,
        SECRET,
        "json",
    )


INI = f"""
[default]
aws_access_key_id = AKIADEFAULTKEY000000
aws_secret_access_key = {"d" * 40}

[profile research]
aws_access_key_id = {KEY_ID}
aws_secret_access_key = {SECRET}
region = eu-west-1

[sso]
sso_start_url = https://example.awsapps.com/start
sso_role_name = Admin

[moto]
aws_access_key_id = {KEY_ID}
aws_secret_access_key = {SECRET}
endpoint_url = http://evil.example:4566
"""


def test_ini_profiles() -> None:
    assert parse_aws(INI.encode()).access_key_id == "AKIADEFAULTKEY000000"
    cred = parse_aws(INI.encode(), profile="research")
    assert (cred.access_key_id, cred.region, cred.source) == (
        KEY_ID,
        "eu-west-1",
        "profile research",
    )


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            "missing",
            r"no profile 'missing' in the credentials file \(it has: default, moto, research, sso\)",
        ),
        ("sso", "uses sso_start_url, which gives no access key"),
        ("moto", "sets endpoint_url; fedsky takes endpoints only from the controller's config"),
    ],
)
def test_ini_profiles_that_cannot_be_used(profile: str, message: str) -> None:
    with pytest.raises(CredentialFormatError, match=message):
        parse_aws(INI.encode(), profile=profile)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "file is empty"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"Access key ID,Secret access key\r\n", "header but no key: is it truncated"),
        (
            f"Access key ID,Secret access key\r\n{KEY_ID},{SECRET[:31]}".encode(),
            r"31 characters, AWS's are 40",
        ),
        (
            f"User name,Password,Access key ID,Secret access key\r\nalice,pw,{KEY_ID}".encode(),
            "looks truncated",
        ),
        (
            f"Access key ID,Secret access key\r\n{KEY_ID},{SECRET}\r\n{KEY_ID},{SECRET}\r\n".encode(),
            "holds 2 keys",
        ),
        (b"name,value\r\na,b\r\n", "not an AWS access-key file"),
        (
            f'{{"AccessKeyId": "{KEY_ID}", "SecretAccessKey": "{SECRET[:20]}'.encode(),
            "does not parse .*truncated",
        ),
        (
            json.dumps({"AccessKeyId": "not-a-key", "SecretAccessKey": SECRET}).encode(),
            "does not look like an AWS one",
        ),
        (json.dumps({"user": "alice"}).encode(), "has no key pair"),
        (
            json.dumps(_sa()).encode(),
            "Google Cloud credential file; link it with `fedctl clouds add gcp`",
        ),
        (
            b"[default]\naws_access_key_id = AKIA\n",
            "has no aws_access_key_id and aws_secret_access_key",
        ),
    ],
)
def test_bad_aws_files_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(CredentialFormatError, match=message) as caught:
        parse_aws(data)
    assert SECRET not in str(caught.value)
    assert SECRET[:20] not in str(caught.value)


def test_profile_only_applies_to_ini_files() -> None:
    with pytest.raises(CredentialFormatError, match="--profile applies to a credentials ini file"):
        parse_aws(KEY.console_csv(), profile="research")


def test_an_ini_parse_error_never_quotes_the_line() -> None:
    broken = f"[default]\naws_secret_access_key = {SECRET}\n[default]\n".encode()
    with pytest.raises(CredentialFormatError, match="does not parse as an ini file") as caught:
        parse_aws(broken)
    assert SECRET not in str(caught.value)


def test_credentials_never_show_in_repr() -> None:
    cred = parse_aws(KEY.console_csv())
    for text in (repr(cred), str(cred), repr(cred.secret_access_key), f"{cred.secret_access_key}"):
        assert SECRET not in text
        assert KEY_ID not in text
    assert "...1234" in repr(cred)


# -- GCP ----------------------------------------------------------------------------------------


def test_service_account_key() -> None:
    info = _sa()
    cred = parse_gcp(json.dumps(info).encode())
    assert (cred.project_id, cred.client_email) == ("proj-1", "fl@proj-1.iam.gserviceaccount.com")
    assert str(info["private_key"]) not in repr(cred)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {
                "type": "authorized_user",
                "client_id": "x",
                "client_secret": "y",
                "refresh_token": "z",
            },
            r"a user's credential \(from `gcloud auth application-default login`\), not a service-account key",
        ),
        ({"type": "external_account", "audience": "//iam"}, "workload identity federation"),
        ({"type": "oauth_client"}, "its type is 'oauth_client', expected 'service_account'"),
        ({"project_id": "p"}, "no 'type' field"),
        (["service_account"], "must hold a JSON object"),
    ],
)
def test_other_google_files_are_refused_saying_what_they_are(doc: object, message: str) -> None:
    with pytest.raises(CredentialFormatError, match=message):
        parse_gcp(json.dumps(doc).encode())


def test_broken_service_account_keys_are_refused() -> None:
    info = _sa()
    pem = str(info["private_key"])
    with pytest.raises(CredentialFormatError, match="private_key does not load") as caught:
        parse_gcp(json.dumps({**info, "private_key": pem[: len(pem) // 2]}).encode())
    assert pem[40:80] not in str(caught.value)
    with pytest.raises(CredentialFormatError, match="lacks client_email, token_uri"):
        parse_gcp(
            json.dumps(
                {k: v for k, v in info.items() if k not in ("client_email", "token_uri")}
            ).encode()
        )
    with pytest.raises(CredentialFormatError, match=r"does not parse as JSON .*truncated"):
        parse_gcp(json.dumps(info).encode()[:300])
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CredentialFormatError, match="not an RSA key"):
        parse_gcp(json.dumps({**info, "private_key": ec_pem.decode()}).encode())
    with pytest.raises(CredentialFormatError, match=r"universe 'example\.com'"):
        parse_gcp(json.dumps({**info, "universe_domain": "example.com"}).encode())


def test_a_key_file_does_not_choose_where_assertions_go() -> None:
    cred = parse_gcp(json.dumps(_sa(token_uri="https://collector.example/token")).encode())
    with pytest.raises(CredentialFormatError, match="token_uri is not a Google token endpoint"):
        gcp_token_uri(cred, GcpCloudConfig())
    assert gcp_token_uri(
        cred, GcpCloudConfig(allowed_token_uris=("https://collector.example/token",))
    ) == ("https://collector.example/token")
    google = parse_gcp(json.dumps(_sa()).encode())
    assert gcp_token_uri(google, GcpCloudConfig()) == GOOGLE_TOKEN_URI
    assert (
        gcp_token_uri(google, GcpCloudConfig(token_uri="http://127.0.0.1:1/token"))
        == "http://127.0.0.1:1/token"
    )


def test_wrong_cloud_and_profile_for_gcp() -> None:
    with pytest.raises(CredentialFormatError, match="--profile applies to AWS"):
        CLOUD_PLUGINS["gcp"].parse(json.dumps(_sa()).encode(), profile="x")


# -- anything at all ------------------------------------------------------------------------------

JSON_KEYS = [
    "type",
    "AccessKey",
    "Credentials",
    "AccessKeyId",
    "SecretAccessKey",
    "aws_access_key_id",
    "project_id",
    "private_key",
    "private_key_id",
    "client_email",
    "token_uri",
    "universe_domain",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(max_size=400).map(str.encode),
        st.builds(
            lambda cut: KEY.console_csv(with_user=True)[:cut],
            st.integers(min_value=0, max_value=200),
        ),
        st.builds(lambda cut: INI.encode()[:cut], st.integers(min_value=0, max_value=len(INI))),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.sampled_from(JSON_KEYS), inner, max_size=6)
            ),
            max_leaves=10,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_any_bytes_either_parse_or_fail_with_a_safe_message(data: bytes) -> None:
    messages = []
    for plugin in CLOUD_PLUGINS.values():
        try:
            plugin.parse(data)
        except CredentialFormatError as exc:  # any other exception fails the test
            messages.append(exc.message)
    assert not [m for m in messages if SECRET in m or "Hunter2" in m]
