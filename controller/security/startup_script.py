"""The cloud aggregator VM's start-up script, and where it puts things on the VM.

Rendered by `bootstrap_tokens.VmBootstrap` with a fresh one-time token: bash, run as root by
cloud-init (EC2 user data) or the GCE `startup-script` metadata. It installs fedsky from the
pinned artifacts unless the image has it, makes the VM's two keys, redeems the token for its
certificates at the enrolment listener, fetches and checks the job's model file, and starts the
SuperLink under systemd.

The install never names a package index: it fetches `requirements-aggregator.txt` from the
controller's enrolment listener (checked against the CA the script carries) or the operator's
mirror, refuses it unless it has the SHA-256 written into the script from the controller's
manifest, fetches the wheels that file names, and installs them with
`pip --no-index --require-hashes` (`fedsky.shared.artifacts`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from fedsky.controller.clouds.base import AggregatorFiles
from fedsky.shared.artifacts import ArtifactError, read_manifest, requirements_file
from fedsky.shared.ids import aggregator_id

# Where the startup script puts what the ServerApp needs on the VM. The bus key stays root's
# (0600) and reaches the SuperLink's service, a systemd DynamicUser, as a credential
# (`LoadCredential`), so the run config names it under the unit's credentials directory.
VM_DATA_DIR = "/var/lib/fedsky-aggregator"
VM_UNIT = "fedsky-superlink.service"
VM_BUS_KEY_CREDENTIAL = "agg-key"
VM_FILES = AggregatorFiles(
    model_file=Path(VM_DATA_DIR, "model.safetensors"),
    ca=Path(VM_DATA_DIR, "bus", "ca.crt"),
    cert=Path(VM_DATA_DIR, "bus", "agg.crt"),
    key=Path("/run/credentials", VM_UNIT, VM_BUS_KEY_CREDENTIAL),
)


def model_url(enroll_url: str) -> str:
    """Where a VM fetches its job's model file: beside the enrolment route, on the same listener."""
    return urljoin(enroll_url, "model")


def artifacts_url(enroll_url: str) -> str:
    """Where the enrolment listener serves the pinned artifacts: `.../v1/artifacts/`."""
    return urljoin(enroll_url, "../artifacts/")


REQUIREMENTS = requirements_file("aggregator")


@dataclass(frozen=True)
class AggregatorArtifacts:
    """Where the VM gets fedsky's aggregator wheels, and the digest that vouches for them."""

    url: str  # the directory of requirements-aggregator.txt and the wheels, ending in '/'
    requirements_sha256: str  # from the controller's manifest
    pinned_ca: bool  # the controller's listener (checked against fedsky's CA), or a mirror

    def __post_init__(self) -> None:
        if not self.url.startswith("https://") or not self.url.endswith("/"):
            raise ValueError(f"the artifacts URL must be https and end in '/', not {self.url!r}")
        if len(self.requirements_sha256) != 64 or not all(
            c in "0123456789abcdef" for c in self.requirements_sha256
        ):
            raise ValueError("the requirement file's digest must be 64 hex digits")


def aggregator_artifacts(
    *, directory: Path, enroll_url: str, mirror_url: str | None
) -> AggregatorArtifacts:
    """The artifacts of the wheelhouse in `directory` for a VM; ValueError saying what is missing."""
    try:
        entry = read_manifest(directory).requirements("aggregator")
    except ArtifactError as exc:
        raise ValueError(
            f"cannot pin the aggregator's install: {exc}. Build the wheelhouse with "
            f"`make artifacts` and copy dist/wheelhouse/ to {directory} (artifacts.dir), or set "
            "clouds.preinstalled for an image that has fedsky"
        ) from None
    return AggregatorArtifacts(
        url=mirror_url or artifacts_url(enroll_url),
        requirements_sha256=entry.sha256,
        pinned_ca=mirror_url is None,
    )


# fedsky's aggregator wheels from the pinned artifacts: the requirement file must have the
# digest written into the script; it pins every wheel's digest in turn (pip --require-hashes).
# The file names come from its `# file:` comments and must be plain names. No index is named.
_INSTALL = r"""
  if ! command -v curl >/dev/null || ! command -v openssl >/dev/null \
     || ! python3 -c 'import ensurepip' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv curl openssl
  fi
  WHEELS="$DIR/wheelhouse"
  install -d -m 755 "$WHEELS"
  fetch_artifact() {
    for attempt in $(seq 1 30); do
      if curl -fsS --proto =https @ARTIFACT_CA@-o "$WHEELS/$1.part" @ARTIFACTS@"$1"; then
        mv "$WHEELS/$1.part" "$WHEELS/$1"
        return 0
      fi
      sleep 5
    done
    echo "fedsky: could not fetch $1 from the pinned artifacts" >&2
    exit 1
  }
  fetch_artifact @REQ@
  if ! echo "@REQ_SHA@  $WHEELS/@REQ@" | sha256sum -c --status; then
    echo "fedsky: @REQ@ does not have the digest this script pins (@REQ_SHA@): refused" >&2
    exit 1
  fi
  for wheel in $(sed -n 's/^[^#].*  # file: \([A-Za-z0-9][A-Za-z0-9._+-]*\.whl\)$/\1/p' "$WHEELS/@REQ@"); do
    fetch_artifact "$wheel"
  done
  python3 -m venv "$VENV"
  for var in $(compgen -e); do case "$var" in PIP_*) unset "$var" ;; esac; done
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" install --quiet --no-index \
    --find-links "$WHEELS" --require-hashes -r "$WHEELS/@REQ@"
"""

_SCRIPT = r"""#!/bin/bash
# fedsky aggregator bootstrap, job @JOB@. This script holds a one-time enrolment token (single
# use, short-lived) and the CA's public certificate; the keys are made here and never leave.
set -euo pipefail
umask 022  # the venv, certificates and model file are read by the SuperLink's service user
DIR=@DIR@
DATA=@DATA@
VENV=@VENV@
install -d -m 755 "$DIR" "$DATA" "$DATA/bus"
cd "$DIR"
cat > ca.pem <<'FEDSKY_CA'
@CA@FEDSKY_CA
(umask 077; printf '%s' @TOKEN@ > token)

if [ ! -x "$VENV/bin/fedsky-aggregator" ]; then
  @INSTALL@
fi

# Two keys, both root's (0600), handed to the service by systemd (LoadCredential): the
# SuperLink's TLS key, and the ServerApp's bus identity (@CN@) for its metrics.
(umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out superlink.key)
(umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DATA/bus/agg.key")
openssl req -new -key superlink.key -subj "/CN=@CN@" -out superlink.csr
openssl req -new -key "$DATA/bus/agg.key" -subj "/CN=@CN@" -out bus.csr
(umask 077; python3 - <<'FEDSKY_PY'
import json
body = {
    "token": open("token").read(),
    "csr_pem": open("superlink.csr").read(),
    "bus_csr_pem": open("bus.csr").read(),
}
open("request.json", "w").write(json.dumps(body))
FEDSKY_PY
)

# 409: the controller has not recorded this VM's address yet; retry. Anything else is final.
for attempt in $(seq 1 120); do
  code=$(curl -sS --cacert ca.pem -o enroll.json -w '%{http_code}' \
         -H 'Content-Type: application/json' --data-binary @request.json @URL@) || code=000
  case "$code" in
    200) break ;;
    409|000|502|503|504) sleep 5 ;;
    *) echo "fedsky: enrolment refused (HTTP $code)" >&2; rm -f token request.json; exit 1 ;;
  esac
done
rm -f token request.json
[ "$code" = 200 ] || { echo "fedsky: enrolment did not succeed (HTTP $code)" >&2; exit 1; }
python3 - "$DATA" <<'FEDSKY_PY'
import json, sys
answer, data = json.load(open("enroll.json")), sys.argv[1]
open("superlink.crt", "w").write(answer["cert_pem"])
open(data + "/bus/agg.crt", "w").write(answer["bus_cert_pem"])
open(data + "/bus/ca.crt", "w").write(answer["ca_pem"])
open("model.sha256", "w").write(answer.get("model_sha256") or "")
FEDSKY_PY

# The job's model file, over mutual TLS with the new bus certificate, checked against the digest
# the enrolment named. 403/404 are final (a revoked certificate, an ended job); others retry.
sha=$(cat model.sha256)
[ -n "$sha" ] || { echo "fedsky: the controller named no model file for job @JOB@" >&2; exit 1; }
for attempt in $(seq 1 60); do
  code=$(curl -sS --cacert ca.pem --cert "$DATA/bus/agg.crt" --key "$DATA/bus/agg.key" \
         -o "$DATA/model.part" -w '%{http_code}' @MODEL_URL@) || code=000
  case "$code" in
    200)
      if echo "$sha  $DATA/model.part" | sha256sum -c --status; then break; fi
      echo "fedsky: the model file fetched does not have digest $sha; fetching again" >&2
      code=000; sleep 5 ;;
    403|404) echo "fedsky: the model file was refused (HTTP $code)" >&2; exit 1 ;;
    *) sleep 5 ;;
  esac
done
[ "$code" = 200 ] || { echo "fedsky: could not fetch the model file (HTTP $code)" >&2; exit 1; }
mv "$DATA/model.part" "$DATA/model.safetensors"

cat > @UNITDIR@/@UNIT@ <<'FEDSKY_UNIT'
[Unit]
Description=fedsky aggregator (Flower SuperLink behind fedsky's front), job @JOB@
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
DynamicUser=yes
StateDirectory=fedsky-superlink
LoadCredential=key:@DIR@/superlink.key
LoadCredential=@BUSKEY@:@DATA@/bus/agg.key
Environment=FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_HOME=/var/lib/fedsky-superlink/flwr PATH=@VENV@/bin:/usr/local/bin:/usr/bin:/bin
ExecStart=@VENV@/bin/fedsky-aggregator --listen 0.0.0.0:@PORT@ --ca @DIR@/ca.pem --cert @DIR@/superlink.crt --key ${CREDENTIALS_DIRECTORY}/key --database /var/lib/fedsky-superlink/state.db --work-dir /var/lib/fedsky-superlink
Restart=on-failure
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
FEDSKY_UNIT
systemctl daemon-reload
systemctl enable --now @UNIT@
"""


def render_startup_script(
    *,
    job_id: str,
    token: str,
    enroll_url: str,
    ca_pem: str,
    port: int,
    artifacts: AggregatorArtifacts | None,
    preinstalled: bool,
    directory: str = "/etc/fedsky/aggregator",
    data_dir: str = VM_DATA_DIR,
    venv: str = "/opt/fedsky/venv",
    unit_dir: str = "/etc/systemd/system",
) -> str:
    """The VM's startup script: install (unless preinstalled), make the keys, enrol, fetch the
    model file, start the SuperLink.

    The install takes fedsky's aggregator wheels from `artifacts` only (required unless
    `preinstalled`), checked by the digest of their requirement file and pip's
    `--require-hashes`. `directory`, `data_dir`, `venv` and `unit_dir` are where things go on
    the VM (tests run the script in a scratch directory); the run config names `data_dir`'s
    files (`VM_FILES`).
    """
    if preinstalled:
        install = (
            'echo "fedsky: $VENV has no fedsky-aggregator although the image should" >&2; exit 1'
        )
    elif artifacts is None:
        raise ValueError("the aggregator's install needs the pinned artifacts (or preinstalled)")
    else:
        install = _INSTALL.strip()
        for marker, value in {
            "@ARTIFACTS@": shlex.quote(artifacts.url),
            "@ARTIFACT_CA@": "--cacert ca.pem " if artifacts.pinned_ca else "",
            "@REQ_SHA@": artifacts.requirements_sha256,
            "@REQ@": REQUIREMENTS,
        }.items():
            install = install.replace(marker, value)
    if not ca_pem.endswith("\n"):
        ca_pem += "\n"
    replacements = {
        "@JOB@": job_id,
        "@CN@": aggregator_id(job_id),
        "@CA@": ca_pem,
        "@TOKEN@": shlex.quote(token),
        "@INSTALL@": install,
        "@URL@": shlex.quote(enroll_url),
        "@MODEL_URL@": shlex.quote(model_url(enroll_url)),
        "@PORT@": str(port),
        "@DIR@": shlex.quote(directory),
        "@DATA@": shlex.quote(data_dir),
        "@UNIT@": VM_UNIT,
        "@BUSKEY@": VM_BUS_KEY_CREDENTIAL,
        "@VENV@": shlex.quote(venv),
        "@UNITDIR@": shlex.quote(unit_dir),
    }
    script = _SCRIPT
    for marker, value in replacements.items():
        script = script.replace(marker, value)
    return script
