"""Jobs whose aggregator goes to AWS: the controller daemon, its agents and moto's server.

Everything runs as an operator would run it: the controller and the agents as processes
(Onebox), the AWS account linked with `fedctl clouds add aws FILE`, jobs submitted and
cancelled with `fedctl job`. moto's server (IAM authentication on) plays EC2; boto3 against it
checks what the controller made. moto's instances run nothing, so the SuperLink never answers
the controller's readiness probe unless a test plays the VM itself: it reads the user data,
redeems the one-time token at the controller's enrolment listener for the SuperLink's
certificate and the ServerApp's bus certificate, fetches the job's model file with the latter
(mutual TLS), publishes on the aggregator's metrics topic as `agg-<job>`, and serves TLS with
the SuperLink's certificate.

moto gives its instances public addresses from 54.214.0.0/16; here they get 127.0.0.1, so the
controller's real readiness probe (a TLS handshake with `address:clouds.superlink_port`) stays
on this machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from fedsky.controller.onebox import Onebox
from fedsky.controller.placement import load_catalog
from fedsky.shared.modelfile import make_example
from fedsky.shared.tls import client_context
from fedsky.shared.topics import Topics

from tests.fakes.aws import AwsKey, MotoAws, shared_moto
from tests.fakes.clouds import MOTO_IMAGE
from tests.support import eventually_blocking, free_port, make_csr
from tests.support.wheels import write_wheelhouse

pytestmark = pytest.mark.e2e

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-asia": "aws:ap-northeast-2"}
# The networks the operator lists as the hospitals' and the controller's internet egress.
EGRESS = ("198.51.100.0/24", "203.0.113.9")
READY_TIMEOUT_S = 8.0
AWS_REGIONS = sorted({o.region for o in load_catalog().offers if o.cloud == "aws"})


@dataclass
class AwsBox:
    box: Onebox
    moto: MotoAws
    superlink_port: int
    enroll_url: str
    root: Path


def _loopback_public_ip() -> str:
    return "127.0.0.1"


@pytest.fixture(scope="module")
def aws_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsBox]:
    moto = shared_moto()
    root = tmp_path_factory.mktemp("jobs-aws")
    superlink_port, enroll_port = free_port(), free_port()
    enroll_url = f"https://127.0.0.1:{enroll_port}/v1/aggregators/enroll"
    images = ", ".join(f'"{region}" = "{MOTO_IMAGE}"' for region in AWS_REGIONS)
    write_wheelhouse(root / "wheelhouse")  # the pinned artifacts the VMs install from
    controller_extra = "\n".join(
        [
            "[clouds]",
            f'enroll_url = "{enroll_url}"',
            f'enroll_listen = "127.0.0.1:{enroll_port}"',
            f"allowed_sources = {json.dumps(list(EGRESS))}",
            f"superlink_port = {superlink_port}",
            f"ready_timeout_s = {READY_TIMEOUT_S}",
            "poll_interval_s = 0.25",
            "[clouds.aws]",
            f'endpoint_url = "{moto.endpoint}"',
            f"images = {{ {images} }}",
            f"sweep_regions = {json.dumps(AWS_REGIONS)}",
            "[artifacts]",
            f'dir = "{root / "wheelhouse"}"',
        ]
    )
    datasets = {
        name: (
            "[datasets.digits]\n"
            'kind = "digits"\n'
            f'partition = {{ index = {i}, count = {len(HOSPITALS)}, scheme = "label-skew", seed = 7 }}\n'
        )
        for i, name in enumerate(HOSPITALS)
    }
    box = Onebox(
        root=root / "box",
        report_interval_s=3.0,
        poll_interval_s=0.5,
        agent_extra=datasets,
        controller_extra=controller_extra,
    )
    with pytest.MonkeyPatch.context() as patch:
        # moto runs in this process (ThreadedMotoServer): its instances' public addresses.
        patch.setattr(
            "moto.ec2.models.elastic_network_interfaces.random_public_ip", _loopback_public_ip
        )
        try:
            box.start(HOSPITALS)
            yield AwsBox(box, moto, superlink_port, enroll_url, root)
        finally:
            box.stop()
            moto.auth(False)


@pytest.fixture
def account(aws_box: AwsBox, tmp_path: Path) -> Iterator[tuple[str, AwsKey]]:
    """An IAM user with the provider's permissions, linked through `fedctl clouds add aws`."""
    aws_box.moto.auth(True)
    key = aws_box.moto.user("fedsky-jobs")
    csv = tmp_path / "credentials.csv"
    csv.write_bytes(key.console_csv())
    name = f"prod-{key.user[-8:]}"
    aws_box.box.fedctl("clouds", "add", "aws", str(csv), "--name", name)
    try:
        yield name, key
    finally:
        aws_box.box.fedctl("clouds", "remove", name, check=False)


# -- helpers ----------------------------------------------------------------------------------


def _job_spec(directory: Path, name: str) -> Path:
    model = directory / "digits.safetensors"
    if not model.exists():
        make_example("digits", model)
    spec = directory / f"{name}.toml"
    spec.write_text(
        f'name = "{name}"\n'
        f"participants = {json.dumps(list(HOSPITALS))}\n"
        f'model = "{model.name}"\n'
        'dataset = "digits"\n'
        'selection_metric = "f1"\n'
        "[hyperparameters]\n"
        "rounds = 1\n"
        "local_epochs = 1\n"
        "batch_size = 32\n"
        "learning_rate = 0.05\n"
        "[resources]\n"
        "vcpus = 2\n"
        "memory_gib = 4\n"
        "disk_gib = 20\n"
        "[placement]\n"
        'max_cost = "85000 KRW/month"\n'
        "max_latency_ms = 250\n"
        "cost_weight = 0.5\n"
    )
    return spec


def _submit(aws: AwsBox, directory: Path, name: str) -> str:
    done = aws.box.fedctl("job", "submit", str(_job_spec(directory, name)), "--json")
    return str(json.loads(done.stdout)["id"])


def _job(aws: AwsBox, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = aws.box.api.get(f"/v1/jobs/{job_id}")
    return job


def _logs(aws: AwsBox, job_id: str) -> str:
    return aws.box.fedctl("job", "logs", job_id, check=False).stdout


def _wait_job(
    aws: AwsBox, job_id: str, states: tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    return eventually_blocking(
        lambda: _job(aws, job_id),
        until=lambda job: job["state"] in states,
        timeout=timeout,
        interval=0.2,
        what=f"job {job_id} to be {' or '.join(states)}",
        details=lambda: _logs(aws, job_id),
    )


def _choice(aws: AwsBox, job_id: str) -> dict[str, Any]:
    """Where the optimizer put the aggregator (known once the job has left `placing`)."""
    job = _wait_job(aws, job_id, ("launching", "assigning", "training", "failed", "cancelled"))
    assert job["placement"] is not None, _logs(aws, job_id)
    assert job["placement"]["provider"] == "aws", job["placement"]
    assert job["placement"]["linked_clouds"] == ["aws"]
    choice: dict[str, Any] = job["placement"]["choice"]
    assert choice["cloud"] == "aws"
    return choice


def _instances(aws: AwsBox, job_id: str, region: str) -> list[dict[str, Any]]:
    found = aws.moto.client("ec2", region).describe_instances(
        Filters=[{"Name": "tag:fedsky:job", "Values": [job_id]}]
    )
    return [i for r in found["Reservations"] for i in r["Instances"]]


def _groups(aws: AwsBox, job_id: str, region: str) -> list[dict[str, Any]]:
    found = aws.moto.client("ec2", region).describe_security_groups(
        Filters=[{"Name": "tag:fedsky:job", "Values": [job_id]}]
    )
    return list(found["SecurityGroups"])


def _wait_instance(aws: AwsBox, job_id: str, region: str, timeout: float = 30) -> dict[str, Any]:
    """The job's instance once it runs (moto: at the first describe after the launch)."""
    (instance,) = eventually_blocking(
        lambda: [i for i in _instances(aws, job_id, region) if i["State"]["Name"] == "running"],
        timeout=timeout,
        interval=0.1,
        what=f"a running instance of {job_id} in {region}",
        details=lambda: _logs(aws, job_id),
    )
    return instance


def _user_data(aws: AwsBox, instance: dict[str, Any], region: str) -> str:
    ec2 = aws.moto.client("ec2", region)
    encoded = ec2.describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="userData"
    )["UserData"]["Value"]
    return base64.b64decode(encoded).decode()


def _assert_gone(aws: AwsBox, job_id: str, region: str) -> None:
    """Every instance of the job terminated and its security group deleted."""
    instances = _instances(aws, job_id, region)
    assert instances, f"no instance of {job_id} was ever launched"
    assert {i["State"]["Name"] for i in instances} == {"terminated"}
    # The provider deletes the group once it has seen every instance terminated (its next
    # poll): a moment after the instance's state changes.
    eventually_blocking(
        lambda: _groups(aws, job_id, region),
        until=lambda groups: groups == [],
        timeout=20,
        interval=0.2,
        what=f"the security group of {job_id} to be deleted",
    )


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


# -- the tests --------------------------------------------------------------------------------


def test_job_on_aws_launches_the_chosen_instance_and_terminates_it_when_the_launch_fails(
    aws_box: AwsBox, account: tuple[str, AwsKey], tmp_path: Path
) -> None:
    started = time.monotonic()
    job_id = _submit(aws_box, tmp_path, "digits-aws")
    choice = _choice(aws_box, job_id)
    region, instance_type = choice["region"], choice["instance_type"]

    instance = _wait_instance(aws_box, job_id, region)
    assert instance["InstanceType"] == instance_type
    assert instance["Placement"]["AvailabilityZone"].startswith(region)
    assert instance["ImageId"] == MOTO_IMAGE
    assert "KeyName" not in instance
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    tags = _tags(instance)
    assert tags["fedsky:job"] == job_id
    assert tags["fedsky:managed"] == "true"
    assert tags["Name"] == f"fedsky-agg-{job_id}"

    user_data = _user_data(aws_box, instance, region)
    assert user_data.startswith("#!/bin/bash")
    assert "PRIVATE KEY" not in user_data
    assert aws_box.enroll_url in user_data
    assert re.search(r"fsk1_[A-Za-z0-9_-]+", user_data)  # the one-time token
    assert f"--listen 0.0.0.0:{aws_box.superlink_port}" in user_data
    assert "/bin/fedsky-aggregator --listen" in user_data  # node auth behind the front
    # fedsky comes from the pinned artifacts on the enrolment listener, never from an index.
    assert "--no-index" in user_data
    assert "--require-hashes" in user_data
    assert "pypi" not in user_data.lower()
    assert "--index-url" not in user_data
    ca = (aws_box.box.controller_dir / "state" / "pki" / "ca.crt").read_text().strip()
    assert ca in user_data

    (group,) = _groups(aws_box, job_id, region)
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group["GroupId"]]
    (rule,) = group["IpPermissions"]
    port = aws_box.superlink_port
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", port, port)
    assert sorted(r["CidrIp"] for r in rule["IpRanges"]) == ["198.51.100.0/24", "203.0.113.9/32"]

    # Nothing answers on the instance's SuperLink port: the launch gives up after the timeout.
    job = _wait_job(aws_box, job_id, ("failed", "completed", "cancelled"), timeout=40)
    assert job["state"] == "failed", _logs(aws_box, job_id)
    assert job["error"].startswith("launching the aggregator: timed out after 8 s"), job["error"]
    assert f"the SuperLink of {instance['InstanceId']} to answer" in job["error"]
    _assert_gone(aws_box, job_id, region)
    assert time.monotonic() - started < 60


def test_cancelling_a_job_while_its_aws_aggregator_launches_terminates_it(
    aws_box: AwsBox, account: tuple[str, AwsKey], tmp_path: Path
) -> None:
    job_id = _submit(aws_box, tmp_path, "digits-aws-cancel")
    choice = _choice(aws_box, job_id)
    region = choice["region"]
    instance = _wait_instance(aws_box, job_id, region)
    assert _job(aws_box, job_id)["state"] == "launching"

    started = time.monotonic()
    out = aws_box.box.fedctl("job", "cancel", job_id)
    took = time.monotonic() - started
    assert f"job {job_id}: cancelled" in out.stdout
    # `cancel` returns once the aggregator is gone: no waiting here.
    _assert_gone(aws_box, job_id, region)
    assert took < READY_TIMEOUT_S, f"the cancel waited for the launch to time out ({took:.1f} s)"
    job = _job(aws_box, job_id)
    assert job["state"] == "cancelled"
    assert job["aggregator"] is None  # it never got as far as answering
    assert instance["InstanceType"] == choice["instance_type"]


class VmPlayer:
    """What the aggregator VM's startup script does, done by the test: enrol (two keys, two
    CSRs, one token), fetch the model file over mutual TLS, then serve TLS; and what its
    ServerApp does on the bus: publish metrics as `agg-<job>`."""

    def __init__(self, aws: AwsBox, directory: Path) -> None:
        self.aws = aws
        self.directory = directory
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def enrol(self, user_data: str, job_id: str) -> x509.Certificate:
        token = re.search(r"fsk1_[A-Za-z0-9_-]+", user_data)
        url = re.search(r"https://\S+/v1/aggregators/enroll", user_data)
        ca = re.search(
            r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", user_data, re.S
        )
        assert token
        assert url
        assert ca
        key_pem, csr_pem = make_csr(f"agg-{job_id}")
        bus_key_pem, bus_csr_pem = make_csr(f"agg-{job_id}")
        # As curl --cacert does: the listener must present a certificate from the CA in the script.
        ctx = ssl.create_default_context(cadata=ca.group(0))
        self._ca = ca.group(0)
        body = json.dumps(
            {
                "token": token.group(0),
                "csr_pem": csr_pem.decode(),
                "bus_csr_pem": bus_csr_pem.decode(),
            }
        ).encode()
        enroll_url = url.group(0)

        def redeem() -> dict[str, Any]:
            request = urllib.request.Request(  # noqa: S310
                enroll_url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                # The URL is the https one the controller wrote into the user data.
                with urllib.request.urlopen(request, context=ctx, timeout=5) as resp:  # noqa: S310
                    redeemed: dict[str, Any] = json.loads(resp.read())
                    return redeemed
            except urllib.error.HTTPError as exc:
                if (
                    exc.code == 409
                ):  # the controller has not bound the VM's address to the token yet
                    raise AssertionError(f"409 {exc.reason}") from exc
                raise

        answer = eventually_blocking(
            redeem, timeout=20, interval=0.1, what="the enrolment listener to redeem the token"
        )
        (self.directory / "superlink.key").write_bytes(key_pem)
        (self.directory / "superlink.crt").write_text(answer["cert_pem"])
        self.answer: dict[str, Any] = answer
        self.bus = self.directory / "bus"
        self.bus.mkdir()
        (self.bus / "agg.key").write_bytes(bus_key_pem)
        (self.bus / "agg.crt").write_text(answer["bus_cert_pem"])
        (self.bus / "ca.crt").write_text(answer["ca_pem"])
        model_url = re.search(r"https://\S+/v1/aggregators/model", user_data)
        assert model_url
        self.model_url = model_url.group(0)
        return x509.load_pem_x509_certificate(answer["cert_pem"].encode())

    def fetch_requirements(self, user_data: str) -> bytes:
        """The aggregator's requirement file from the listener's artifacts, as the script fetches
        it (checked against the CA it carries), with the digest the script pins."""
        base = re.search(r"(https://[^\s'\"]+/v1/artifacts/)", user_data)
        pinned = re.search(
            r'echo "([0-9a-f]{64})  \$WHEELS/requirements-aggregator.txt"', user_data
        )
        assert base
        assert pinned
        ctx = ssl.create_default_context(cadata=self._ca)
        url = base.group(1) + "requirements-aggregator.txt"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:  # noqa: S310
            data: bytes = resp.read()
        assert hashlib.sha256(data).hexdigest() == pinned.group(1)
        return data

    def fetch_model(self) -> bytes:
        """GET the job's model file with the bus certificate; check the digest enrolment named."""
        ctx = ssl.create_default_context(cadata=self._ca)
        ctx.load_cert_chain(self.bus / "agg.crt", self.bus / "agg.key")
        # The URL is the https one the controller wrote into the user data.
        with urllib.request.urlopen(self.model_url, context=ctx, timeout=10) as resp:  # noqa: S310
            data: bytes = resp.read()
        assert hashlib.sha256(data).hexdigest() == self.answer["model_sha256"]
        return data

    def publish_metrics(self, job_id: str) -> None:
        """Publish on `agg-<job>`'s metrics topic with the bus certificate; the controller's
        identity, subscribed beside the controller, sees it arrive."""
        broker = self.answer["broker"]
        topic = Topics(broker["topic_prefix"]).aggregator_metrics(f"agg-{job_id}")
        pki_dir = self.aws.box.controller_dir / "state" / "pki"
        watcher_tls = client_context(
            ca_file=pki_dir / "ca.crt",
            cert_file=pki_dir / "controller.crt",
            key_file=pki_dir / "controller.key",
        )
        agg_tls = client_context(
            ca_file=self.bus / "ca.crt",
            cert_file=self.bus / "agg.crt",
            key_file=self.bus / "agg.key",
        )

        def client(ctx: ssl.SSLContext, name: str) -> aiomqtt.Client:
            return aiomqtt.Client(
                broker["host"],
                int(broker["port"]),
                identifier=f"{name}-{job_id}",
                tls_context=ctx,
                protocol=aiomqtt.ProtocolVersion.V5,
                timeout=10,
            )

        async def publish() -> None:
            async with client(watcher_tls, "test-watcher") as watcher:
                await watcher.subscribe(topic, qos=1)
                async with client(agg_tls, "test-agg") as agg:
                    await agg.publish(topic, b"vm-player", qos=1)
                async with asyncio.timeout(10):
                    async for message in watcher.messages:
                        if message.payload == b"vm-player":
                            return

        asyncio.run(publish())

    def serve(self) -> None:
        """Answer TLS handshakes on the SuperLink port with the enrolled certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.directory / "superlink.crt", self.directory / "superlink.key")
        server = socket.create_server(("127.0.0.1", self.aws.superlink_port))
        server.settimeout(0.2)
        self._server = server

        def loop() -> None:
            while self._server is not None:
                try:
                    conn, _ = server.accept()
                except (TimeoutError, OSError):
                    continue
                with contextlib.suppress(OSError, ssl.SSLError):
                    conn.settimeout(5)
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                conn.close()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._thread is not None:
            self._thread.join(5)


@pytest.mark.parametrize("ending", ["cancel", "restart"])
def test_an_aws_aggregator_that_enrols_and_answers_is_terminated_when_the_job_ends(
    aws_box: AwsBox, account: tuple[str, AwsKey], tmp_path: Path, ending: str
) -> None:
    name, _ = account
    job_id = _submit(aws_box, tmp_path, f"digits-aws-vm-{ending}")
    region = _choice(aws_box, job_id)["region"]
    instance = _wait_instance(aws_box, job_id, region)
    vm = VmPlayer(aws_box, tmp_path)
    try:
        user_data = _user_data(aws_box, instance, region)
        cert = vm.enrol(user_data, job_id)
        assert b"--hash=sha256:" in vm.fetch_requirements(user_data)
        assert cert.subject.rfc4514_string() == f"CN=agg-{job_id}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert str(instance["PublicIpAddress"]) in {
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        }
        # The ServerApp's bus identity, the broker as the VM reaches it, and the job's model.
        bus_cert = x509.load_pem_x509_certificate(vm.answer["bus_cert_pem"].encode())
        assert bus_cert.subject.rfc4514_string() == f"CN=agg-{job_id}"
        assert vm.answer["broker"] == {
            "host": "127.0.0.1",
            "port": aws_box.box.broker_port,
            "topic_prefix": aws_box.box.topic_prefix,
        }
        uploaded = (tmp_path / "digits.safetensors").read_bytes()
        assert vm.answer["model_sha256"] == hashlib.sha256(uploaded).hexdigest()
        assert vm.fetch_model() == uploaded
        vm.publish_metrics(job_id)
        vm.serve()

        job = _wait_job(aws_box, job_id, ("assigning", "training", "failed", "cancelled"))
        assert job["state"] == "assigning", _logs(aws_box, job_id)
        address = f"127.0.0.1:{aws_box.superlink_port}"
        assert job["aggregator"] == {
            "provider": "aws",
            "ref": instance["InstanceId"],
            "region": region,
            "address": address,
            "account": name,
        }
        assert f"aggregator up at {address} (aws)" in _logs(aws_box, job_id)

        if ending == "cancel":
            # The running job's clean-up terminates through the handle the launch returned.
            out = aws_box.box.fedctl("job", "cancel", job_id)
            assert f"job {job_id}: cancelled" in out.stdout
            _assert_gone(aws_box, job_id, region)
        else:
            # A controller that dies mid-job fails the job at its next start and terminates the
            # aggregator through the stored handle and account.
            aws_box.box.stop_controller(signal.SIGKILL)
            assert _instances(aws_box, job_id, region)[0]["State"]["Name"] == "running"
            aws_box.box.start_controller()
            job = _wait_job(aws_box, job_id, ("failed",), timeout=30)
            assert job["error"] == "the controller restarted while the job was assigning"
            eventually_blocking(
                lambda: _instances(aws_box, job_id, region)[0]["State"]["Name"],
                until=lambda state: state == "terminated",
                timeout=20,
                interval=0.2,
                what=f"the instance of {job_id} to be terminated",
                details=lambda: _logs(aws_box, job_id),
            )
            _assert_gone(aws_box, job_id, region)
    finally:
        vm.stop()
    assert f"aggregator terminated (aws {instance['InstanceId']})" in _logs(aws_box, job_id)
    # The VM's bus certificate ends with the job, as a local aggregator's does.
    crl_file = aws_box.box.controller_dir / "state" / "pki" / "crl.pem"
    eventually_blocking(
        lambda: x509.load_pem_x509_crl(
            crl_file.read_bytes()
        ).get_revoked_certificate_by_serial_number(bus_cert.serial_number),
        timeout=10,
        interval=0.2,
        what=f"agg-{job_id}'s bus certificate on the CRL",
    )
    aws_box.box.wait_agents_online(list(HOSPITALS))


def test_a_job_is_refused_where_the_linked_credential_no_longer_validates(
    aws_box: AwsBox, account: tuple[str, AwsKey], tmp_path: Path
) -> None:
    name, key = account
    aws_box.moto.delete_key(key)  # e.g. rotated away in the console after linking
    job_id = _submit(aws_box, tmp_path, "digits-aws-revoked")
    job = _wait_job(aws_box, job_id, ("failed", "completed", "cancelled"))
    assert job["state"] == "failed"
    # Placed on aws (the account's last check passed), refused at launch after a fresh check.
    region = job["placement"]["choice"]["region"]
    assert job["placement"]["provider"] == "aws"
    assert job["error"].startswith(
        f"refusing to launch on aws in {region}: no linked credential validates now ({name}: invalid"
    ), job["error"]
    assert key.secret_access_key not in json.dumps(job)
    assert _instances(aws_box, job_id, region) == []
    assert _groups(aws_box, job_id, region) == []
    (record,) = [
        r
        for r in json.loads(aws_box.box.fedctl("clouds", "list", "--json").stdout)
        if r["name"] == name
    ]
    assert record["status"] == "invalid"
