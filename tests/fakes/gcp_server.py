"""A small local server speaking enough of GCP's REST for fedsky, on 127.0.0.1.

Driven through the real google-auth and google-cloud-compute clients:

- the OAuth token endpoint (`POST /token`, RFC 7523 JWT bearer grant): the assertion's RS256
  signature is verified against the public key the service account was registered with, its
  `aud` must be Google's token endpoint (what google-auth always writes) and it must not have
  expired; otherwise `invalid_grant`, as Google answers;
- Compute Engine v1: zones and regions (list, get), instances (insert, get, delete, list,
  aggregatedList), firewalls (insert, get, delete, list), zone and global operations (get,
  wait). Every call needs a bearer token: one this server issued, or a self-signed JWT (what
  google-cloud-compute sends for service accounts) that verifies against a registered key.
  Each call needs its IAM permission, so a key without `compute.instances.create` is refused
  as GCP refuses it;
- Cloud Resource Manager v1 `projects/{p}:testIamPermissions`.

Operations finish after `op_polls` reads, so callers must really wait for them.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ALL_PERMISSIONS = frozenset(
    {
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
        "compute.zones.get",
        "compute.regions.list",
        "compute.regions.get",
        "compute.zoneOperations.get",
        "compute.globalOperations.get",
    }
)
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
DEFAULT_REGIONS = {
    "europe-west1": ("europe-west1-b", "europe-west1-c", "europe-west1-d"),
    "us-central1": ("us-central1-a", "us-central1-b"),
    "asia-northeast3": ("asia-northeast3-a",),
}
_MACHINE_TYPE_RE = re.compile(
    r"^(e2|n1|n2|n2d|c2|c3|t2d)-(standard|highmem|highcpu)-\d{1,3}$|^e2-(micro|small|medium)$"
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class ServiceAccount:
    email: str
    project: str
    public_key: rsa.RSAPublicKey
    permissions: set[str] = field(default_factory=lambda: set(ALL_PERMISSIONS))


def make_service_account_key(
    *, project: str, email: str, token_uri: str, key: rsa.RSAPrivateKey | None = None
) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    """A service-account key file (as `gcloud iam service-accounts keys create` writes) and its key."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    return info, key


class _Forbidden(Exception):
    pass


class FakeGcp:
    """The server; `add_account` registers a service account's public key and permissions."""

    def __init__(
        self,
        *,
        project: str = "fedsky-test",
        regions: dict[str, tuple[str, ...]] | None = None,
        op_polls: int = 2,
    ) -> None:
        self.project = project
        self.regions = dict(regions or DEFAULT_REGIONS)
        self.op_polls = op_polls
        self.accounts: dict[str, ServiceAccount] = {}
        self.tokens: dict[str, str] = {}  # access token -> email
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> resource
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.token_requests = 0
        self.fail_next_insert: str | None = (
            None  # an operation error code for the next instance insert
        )
        self._lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def add_account(
        self,
        email: str,
        public_key: rsa.RSAPublicKey,
        *,
        permissions: set[str] | frozenset[str] | None = None,
    ) -> ServiceAccount:
        account = ServiceAccount(
            email,
            self.project,
            public_key,
            set(ALL_PERMISSIONS if permissions is None else permissions),
        )
        with self._lock:
            self.accounts[email] = account
        return account

    def new_key(
        self, name: str = "fedsky", *, permissions: set[str] | frozenset[str] | None = None
    ) -> dict[str, Any]:
        """A key file for a new registered service account of this project."""
        email = f"{name}@{self.project}.iam.gserviceaccount.com"
        info, key = make_service_account_key(
            project=self.project, email=email, token_uri=self.token_uri
        )
        self.add_account(email, key.public_key(), permissions=permissions)
        return info

    def start(self) -> FakeGcp:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-gcp",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- auth ------------------------------------------------------------------------------------

    def _verify_jwt(self, token: str, *, audience: str | None) -> ServiceAccount:
        try:
            head_b64, body_b64, sig_b64 = token.split(".")
            header = json.loads(_unb64url(head_b64))
            claims = json.loads(_unb64url(body_b64))
            signature = _unb64url(sig_b64)
        except (ValueError, json.JSONDecodeError):
            raise _Forbidden("Invalid JWT: malformed") from None
        if header.get("alg") != "RS256":
            raise _Forbidden("Invalid JWT: unsupported algorithm")
        account = self.accounts.get(str(claims.get("iss")))
        if account is None:
            raise _Forbidden("Invalid grant: account not found")
        try:
            account.public_key.verify(
                signature, f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise _Forbidden("Invalid JWT Signature.") from None
        now = time.time()
        if float(claims.get("exp", 0)) < now:
            raise _Forbidden(
                "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
            )
        if float(claims.get("iat", 0)) > now + 300:
            raise _Forbidden("Invalid JWT: issued in the future")
        if audience is not None and claims.get("aud") != audience:
            raise _Forbidden("Invalid JWT: Failed audience check")
        return account

    def _token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        self.token_requests += 1
        if form.get("grant_type", [""])[0] != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": "Invalid grant_type",
            }
        try:
            # google-auth always addresses the assertion to Google's endpoint, whatever token_uri
            # it posts it to (which is why a foreign token_uri could replay it at Google).
            account = self._verify_jwt(
                form.get("assertion", [""])[0], audience=GOOGLE_TOKEN_AUDIENCE
            )
        except _Forbidden as exc:
            return 400, {"error": "invalid_grant", "error_description": str(exc)}
        access = "ya29.fake-" + secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[access] = account.email
        return 200, {"access_token": access, "expires_in": 3599, "token_type": "Bearer"}

    def _caller(self, authorization: str | None) -> ServiceAccount | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer ") :]
        with self._lock:
            email = self.tokens.get(token)
        if email is not None:
            return self.accounts.get(email)
        try:
            return self._verify_jwt(token, audience=None)
        except _Forbidden:
            return None

    # -- resources -------------------------------------------------------------------------------

    def _zone_url(self, zone: str) -> str:
        return f"{self.url}/compute/v1/projects/{self.project}/zones/{zone}"

    def _region_of(self, zone: str) -> str | None:
        return next((r for r, zones in self.regions.items() if zone in zones), None)

    def _new_op(
        self, kind: str, target: str, *, zone: str | None, error: str | None = None
    ) -> dict[str, Any]:
        name = f"operation-{next(self._ids)}-{secrets.token_hex(4)}"
        scope = f"zones/{zone}" if zone else "global"
        op = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "selfLink": f"{self.url}/compute/v1/projects/{self.project}/{scope}/operations/{name}",
            "_polls": 0,
            "_error": error,
        }
        if zone:
            op["zone"] = self._zone_url(zone)
        self.operations[name] = op
        return self._op_view(op, advance=False)

    def _op_view(self, op: dict[str, Any], *, advance: bool = True) -> dict[str, Any]:
        if advance and op["status"] != "DONE":
            op["_polls"] += 1
            if op["_polls"] >= self.op_polls:
                op["status"] = "DONE"
                op["progress"] = 100
                if op["_error"]:
                    op["error"] = {
                        "errors": [
                            {
                                "code": op["_error"],
                                "message": f"The operation failed: {op['_error']}",
                            }
                        ]
                    }
                    op["httpErrorStatusCode"] = 503
                    op["httpErrorMessage"] = "SERVICE UNAVAILABLE"
                    # A failed insert leaves no instance behind.
                    for key, inst in list(self.instances.items()):
                        if inst["selfLink"] == op["targetLink"]:
                            del self.instances[key]
                elif op["operationType"] == "insert":
                    for inst in self.instances.values():
                        if inst["selfLink"] == op["targetLink"]:
                            inst["status"] = "RUNNING"
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _instance_from(self, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("name", ""))
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise _BadRequest(f"Invalid value for field 'resource.name': '{name}'")
        machine = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        if not _MACHINE_TYPE_RE.fullmatch(machine):
            raise _BadRequest(
                f"Invalid value for field 'resource.machineType': '{body.get('machineType')}'. Machine type does not exist."
            )
        n = next(self._ids)
        nics = []
        for nic in body.get("networkInterfaces", []) or [{}]:
            configs = [
                {**ac, "natIP": f"203.0.113.{n % 250 + 1}", "kind": "compute#accessConfig"}
                for ac in nic.get("accessConfigs", [])
            ]
            nics.append({**nic, "networkIP": f"10.128.0.{n % 250 + 2}", "accessConfigs": configs})
        return {
            **body,
            "kind": "compute#instance",
            "id": str(n),
            "zone": self._zone_url(zone),
            "machineType": f"{self._zone_url(zone)}/machineTypes/{machine}",
            "status": "PROVISIONING",
            "networkInterfaces": nics,
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S-00:00", time.gmtime()),
            "selfLink": f"{self._zone_url(zone)}/instances/{name}",
        }

    # -- dispatch --------------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, auth: str | None
    ) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            if path == "/token" and method == "POST":
                return self._token(body if isinstance(body, dict) else {})
            caller = self._caller(auth)
            if caller is None:
                return _error(
                    401, "Request is missing required authentication credential.", "UNAUTHENTICATED"
                )
            try:
                return self._route(method, path, query, body, caller)
            except _Forbidden as exc:
                return _error(403, str(exc), "forbidden")
            except _BadRequest as exc:
                return _error(400, str(exc), "invalid")

    def _need(self, caller: ServiceAccount, permission: str, resource: str) -> None:
        if permission not in caller.permissions:
            raise _Forbidden(f"Required '{permission}' permission for '{resource}'")

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, caller: ServiceAccount
    ) -> tuple[int, Any]:
        m = re.fullmatch(r"/v1/projects/([^/:]+):testIamPermissions", path)
        if m and method == "POST":
            if m.group(1) != caller.project:
                return _error(403, "The caller does not have permission", "forbidden")
            asked = body.get("permissions", []) if isinstance(body, dict) else []
            return 200, {"permissions": [p for p in asked if p in caller.permissions]}
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)(/.*)", path)
        if not m:
            return _error(
                404, f"The requested URL {path} was not found on this server.", "notFound"
            )
        project, rest = m.group(1), m.group(2)
        if project != self.project or caller.project != project:
            return _error(404, f"The resource 'projects/{project}' was not found", "notFound")
        res = f"projects/{project}"

        if rest == "/zones" and method == "GET":
            self._need(caller, "compute.zones.list", res)
            items = [
                {
                    "kind": "compute#zone",
                    "name": z,
                    "region": f"{self.url}/compute/v1/{res}/regions/{r}",
                    "status": "UP",
                    "selfLink": self._zone_url(z),
                }
                for r, zones in sorted(self.regions.items())
                for z in zones
            ]
            return 200, {"kind": "compute#zoneList", "items": items}
        if rest == "/regions" and method == "GET":
            self._need(caller, "compute.regions.list", res)
            items = [
                {
                    "kind": "compute#region",
                    "name": r,
                    "status": "UP",
                    "zones": [self._zone_url(z) for z in zones],
                }
                for r, zones in sorted(self.regions.items())
            ]
            return 200, {"kind": "compute#regionList", "items": items}
        m = re.fullmatch(r"/regions/([^/]+)", rest)
        if m and method == "GET":
            self._need(caller, "compute.regions.get", res)
            region = m.group(1)
            if region not in self.regions:
                return _error(
                    404, f"The resource '{res}/regions/{region}' was not found", "notFound"
                )
            return 200, {
                "kind": "compute#region",
                "name": region,
                "status": "UP",
                "zones": [self._zone_url(z) for z in self.regions[region]],
            }
        m = re.fullmatch(r"/zones/([^/]+)", rest)
        if m and method == "GET":
            self._need(caller, "compute.zones.get", res)
            zone = m.group(1)
            region = self._region_of(zone)
            if region is None:
                return _error(404, f"The resource '{res}/zones/{zone}' was not found", "notFound")
            return 200, {
                "kind": "compute#zone",
                "name": zone,
                "status": "UP",
                "region": f"{self.url}/compute/v1/{res}/regions/{region}",
            }

        if rest == "/aggregated/instances" and method == "GET":
            self._need(caller, "compute.instances.list", res)
            matches = _label_filter(query.get("filter", [""])[0])
            items: dict[str, Any] = {}
            for (zone, _), inst in sorted(self.instances.items()):
                if matches(inst):
                    items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(inst)
            return 200, {"kind": "compute#instanceAggregatedList", "items": items}
        m = re.fullmatch(r"/zones/([^/]+)/instances", rest)
        if m:
            zone = m.group(1)
            if self._region_of(zone) is None:
                return _error(404, f"The resource '{res}/zones/{zone}' was not found", "notFound")
            if method == "GET":
                self._need(caller, "compute.instances.list", res)
                matches = _label_filter(query.get("filter", [""])[0])
                return 200, {
                    "kind": "compute#instanceList",
                    "items": [
                        i
                        for (z, _), i in sorted(self.instances.items())
                        if z == zone and matches(i)
                    ],
                }
            if method == "POST":
                self._need(
                    caller,
                    "compute.instances.create",
                    f"{res}/zones/{zone}/instances/{body.get('name')}",
                )
                if body.get("metadata", {}).get("items"):
                    self._need(
                        caller,
                        "compute.instances.setMetadata",
                        f"{res}/zones/{zone}/instances/{body.get('name')}",
                    )
                if body.get("labels"):
                    self._need(
                        caller,
                        "compute.instances.setLabels",
                        f"{res}/zones/{zone}/instances/{body.get('name')}",
                    )
                inst = self._instance_from(zone, body)
                if (zone, inst["name"]) in self.instances:
                    return _error(
                        409,
                        f"The resource '{res}/zones/{zone}/instances/{inst['name']}' already exists",
                        "alreadyExists",
                    )
                self.instances[(zone, inst["name"])] = inst
                error, self.fail_next_insert = self.fail_next_insert, None
                return 200, self._new_op("insert", inst["selfLink"], zone=zone, error=error)
        m = re.fullmatch(r"/zones/([^/]+)/instances/([^/]+)", rest)
        if m:
            zone, name = m.groups()
            inst = self.instances.get((zone, name))
            if method == "GET":
                self._need(caller, "compute.instances.get", f"{res}/zones/{zone}/instances/{name}")
                if inst is None:
                    return _error(
                        404,
                        f"The resource '{res}/zones/{zone}/instances/{name}' was not found",
                        "notFound",
                    )
                return 200, inst
            if method == "DELETE":
                self._need(
                    caller, "compute.instances.delete", f"{res}/zones/{zone}/instances/{name}"
                )
                if inst is None:
                    return _error(
                        404,
                        f"The resource '{res}/zones/{zone}/instances/{name}' was not found",
                        "notFound",
                    )
                del self.instances[(zone, name)]
                return 200, self._new_op("delete", inst["selfLink"], zone=zone)

        if rest == "/global/firewalls":
            if method == "GET":
                self._need(caller, "compute.firewalls.list", res)
                return 200, {
                    "kind": "compute#firewallList",
                    "items": [f for _, f in sorted(self.firewalls.items())],
                }
            if method == "POST":
                self._need(
                    caller, "compute.firewalls.create", f"{res}/global/firewalls/{body.get('name')}"
                )
                self._need(
                    caller, "compute.networks.updatePolicy", f"{res}/global/networks/default"
                )
                name = str(body.get("name", ""))
                if name in self.firewalls:
                    return _error(
                        409,
                        f"The resource '{res}/global/firewalls/{name}' already exists",
                        "alreadyExists",
                    )
                if not body.get("sourceRanges") and not body.get("sourceTags"):
                    return _error(400, "Invalid value for field 'resource.sourceRanges'", "invalid")
                link = f"{self.url}/compute/v1/{res}/global/firewalls/{name}"
                self.firewalls[name] = {
                    **body,
                    "kind": "compute#firewall",
                    "id": str(next(self._ids)),
                    "selfLink": link,
                }
                return 200, self._new_op("insert", link, zone=None)
        m = re.fullmatch(r"/global/firewalls/([^/]+)", rest)
        if m:
            name = m.group(1)
            fw = self.firewalls.get(name)
            if method == "GET":
                self._need(caller, "compute.firewalls.get", f"{res}/global/firewalls/{name}")
                if fw is None:
                    return _error(
                        404,
                        f"The resource '{res}/global/firewalls/{name}' was not found",
                        "notFound",
                    )
                return 200, fw
            if method == "DELETE":
                self._need(caller, "compute.firewalls.delete", f"{res}/global/firewalls/{name}")
                if fw is None:
                    return _error(
                        404,
                        f"The resource '{res}/global/firewalls/{name}' was not found",
                        "notFound",
                    )
                del self.firewalls[name]
                return 200, self._new_op("delete", fw["selfLink"], zone=None)

        m = re.fullmatch(r"/(zones/[^/]+|global)/operations/([^/]+?)(/wait)?", rest)
        if m and ((method == "GET" and not m.group(3)) or (method == "POST" and m.group(3))):
            scope, name = m.group(1), m.group(2)
            self._need(
                caller,
                "compute.globalOperations.get"
                if scope == "global"
                else "compute.zoneOperations.get",
                res,
            )
            op = self.operations.get(name)
            if op is None:
                return _error(
                    404, f"The resource '{res}/{scope}/operations/{name}' was not found", "notFound"
                )
            return 200, self._op_view(op)
        return _error(404, f"The requested URL {path} was not found on this server.", "notFound")


class _BadRequest(Exception):
    pass


def _error(status: int, message: str, reason: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }


def _label_filter(expression: str) -> Any:
    """The part of GCE's filter syntax fedsky uses: `labels.KEY = "VALUE"` clauses joined by AND."""
    clauses = re.findall(r'labels\.([a-z0-9_-]+)\s*=\s*"?([a-z0-9_-]*)"?', expression)

    def matches(resource: dict[str, Any]) -> bool:
        labels = resource.get("labels", {})
        return all(labels.get(k) == v for k, v in clauses)

    return matches


class _Handler(BaseHTTPRequestHandler):
    fake: FakeGcp
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        content_type = self.headers.get("Content-Type", "")
        if raw:
            if "x-www-form-urlencoded" in content_type:
                body = parse_qs(raw.decode())
            else:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = None
        status, payload = self.fake.handle(
            method, parts.path, parse_qs(parts.query), body, self.headers.get("Authorization")
        )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


@contextmanager
def running_fake(**kwargs: Any) -> Iterator[FakeGcp]:
    fake = FakeGcp(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()
