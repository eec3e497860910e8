"""fedsky's daemons on the testbed's hosts: the controller in `ctl`, each hospital's agent in
`h-<hospital>`, an sshd in each `vm-<hospital>-<vm>`, and the aggregator machines the
controller boots in `r-<cloud>-<region>`.

`TestbedBox` is the one-box harness (`fedsky.controller.onebox.Onebox`: the real daemons set up
through the real CLIs) with every process started under `ip netns exec` in its host's namespace,
the listeners bound to the hosts' testbed addresses, and the agents in hosts mode (the `ssh`
executor into their VMs, each VM's host key pinned with `agentctl vm register` before any job).

The aggregator: the controller's `[clouds.launcher]` is the testbed's cloud
(`benchmarks/testbed/cloudvm.py`), serving the catalog's `aws` offers: placement picks an AWS
region, and the launcher boots a machine in that region's host that runs the start-up script
the AWS provider would give EC2, which installs fedsky's aggregator from the controller's pinned
artifacts (`[artifacts] dir`, served on the enrolment listener in `ctl`).

The VMs: each VM host runs a real sshd on its own address, port 22, with a host key made for the
run and its hospital's agent key authorized for root. In the sshd's own mount namespace
`/root/.fedsky` (the executor's task files and copied wheels) and `/opt/fedsky` (where the agent
installs the client payload's venv) are bind mounts of that VM's own directories, so each VM
has its own. The agent installs the payload from the controller's pinned artifacts (`[payload]`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedsky.agent.testnode import NodeVm, write_test_node
from fedsky.controller.onebox import AgentProcess, Onebox

from benchmarks.testbed import cloudvm
from benchmarks.testbed.netns import Testbed, TestbedError, kill_namespace_processes
from benchmarks.testbed.topology import HospitalSpec, Host

BROKER_PORT = 8883
ENROLL_PORT = 8443
SUPERLINK_PORT = 9092
SSH_PORT = 22
_SSHD = "/usr/sbin/sshd"
# Each VM's own directories, bind-mounted over these paths in its sshd's mount namespace: the
# ssh executor's work and wheel directories (under the login's home) and the payload's venv.
VM_PATHS = ("/root/.fedsky", "/opt/fedsky")
_CLOUDVM = Path(cloudvm.__file__).resolve()
# The launcher is run by the controller with the system's Python (it needs no package).
_SYSTEM_PYTHON = "/usr/bin/python3"
# The VMs' shapes in the hospitals' libvirt test nodes: both meet the 2 vCPU / 4 GiB minimum.
_VM_SHAPES = ((4, 8, 40), (2, 4, 20))


def _keygen(path: Path, comment: str) -> str:
    """An ed25519 key pair made with ssh-keygen; returns the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in (path, path.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def _fingerprint(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()[1]


@dataclass
class VmHost:
    """A hospital VM on the testbed: its namespace and address, and the sshd serving it."""

    hospital: str
    vm: str
    host: Host
    directory: Path
    host_key_fingerprint: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "sshd.log"

    def own(self, path: str) -> Path:
        """Where this VM's own copy of `path` (one of VM_PATHS, or below one) is kept."""
        for top in VM_PATHS:
            if path == top or path.startswith(top + "/"):
                return cloudvm.mountpoint(top, self.directory) / path[len(top) :].lstrip("/")
        raise ValueError(f"{path} is not under one of the VM's own directories {VM_PATHS}")

    def start(
        self,
        testbed: Testbed,
        *,
        authorized_key: str,
        mountpoint_record: Path,
        timeout: float = 15,
    ) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        _keygen(d / "ssh_host_ed25519_key", self.host.name)
        self.host_key_fingerprint = _fingerprint(d / "ssh_host_ed25519_key.pub")
        (d / "authorized_keys").write_text(authorized_key + "\n")
        (d / "authorized_keys").chmod(0o600)
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {SSH_PORT}",
                    f"ListenAddress {self.host.address}",
                    f"HostKey {d / 'ssh_host_ed25519_key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "StrictModes no",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        # `ip netns exec` gives the command a mount namespace of its own (propagation slave):
        # the bind mounts of the VM's own directories are seen by this sshd and its sessions
        # only. The mount points are made on this machine if missing (and removed at the end).
        mounts = []
        for path in VM_PATHS:
            own = self.own(path)
            own.mkdir(parents=True, exist_ok=True, mode=0o755)
            cloudvm.ensure_mountpoint(Path(path), record=mountpoint_record)
            mounts.append(f"mount --bind {shlex.quote(str(own))} {shlex.quote(path)}")
        script = " && ".join([*mounts, f'exec {_SSHD} -D -e -f "$1"'])
        with self.log_path.open("wb") as log:
            self.proc = testbed.popen(
                self.host.netns,
                ["sh", "-c", script, "sshd", str(d / "sshd_config")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if "Server listening" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TestbedError(
            f"sshd in {self.host.netns} did not start: "
            f"{self.log_path.read_text(errors='replace')[-1500:]}"
        )


class TestbedBox(Onebox):
    """The one-box harness with every daemon in its testbed host's namespace (see the module)."""

    __test__ = False

    def __init__(
        self,
        *,
        root: Path,
        testbed: Testbed,
        controller_host: Host,
        region_hosts: Sequence[Host],
        wheelhouse: Path,
        launcher_clouds: Sequence[str] = ("aws",),
        report_interval_s: float = 5.0,
        placement: str = "",
    ) -> None:
        address = controller_host.address
        self.cloud_dir = root / "cloud"
        self.cloud_state = self.cloud_dir / "testbed.json"
        self.enroll_base = f"https://{address}:{ENROLL_PORT}/v1/"
        super().__init__(
            root=root,
            report_interval_s=report_interval_s,
            poll_interval_s=1.0,
            broker_port=BROKER_PORT,
            broker_host=address,
            controller_extra="\n".join(
                [
                    # The enrolment listener (aggregator machines, pinned artifacts) on ctl.
                    "[clouds]",
                    f'enroll_listen = "{address}:{ENROLL_PORT}"',
                    f'enroll_url = "{self.enroll_base}aggregators/enroll"',
                    # The testbed's machines have private addresses only: they are the sources.
                    f'allowed_sources = ["{testbed.plan.subnet}"]',
                    f"superlink_port = {SUPERLINK_PORT}",
                    "ready_timeout_s = 300",
                    "poll_interval_s = 1.0",
                    "[clouds.launcher]",
                    'name = "testbed"',
                    f"clouds = {json.dumps(list(launcher_clouds))}",
                    f"command = {json.dumps([_SYSTEM_PYTHON, str(_CLOUDVM), '--testbed', str(self.cloud_state)])}",
                    "timeout_s = 60",
                    "[artifacts]",
                    f'dir = "{wheelhouse}"',
                    # The optimizer's figures for this testbed (its links), if any.
                    *(["[placement]", placement] if placement else []),
                ]
            ),
        )
        self.testbed = testbed
        self.ctl = controller_host
        self.region_hosts = {h.location: h for h in region_hosts}
        self.vm_hosts: dict[tuple[str, str], VmHost] = {}
        self.agent_netns: dict[str, str] = {}
        self.cloud_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cloud_state.write_text(
            json.dumps(
                {
                    "root": str(self.cloud_dir),
                    "regions": {
                        h.location: {"netns": h.netns, "address": h.address} for h in region_hosts
                    },
                },
                indent=1,
            )
        )

    def machines(self) -> list[dict[str, object]]:
        """The aggregator machines the testbed's cloud booted, alive or ended, with their logs."""
        return cloudvm.machine_records(self.cloud_dir)

    # -- every process in its host's namespace ----------------------------------------------

    def netns_for(self, where: str) -> str:
        """The namespace of the controller's side ("controller") or of an agent (its name)."""
        return self.ctl.netns if where == "controller" else self.agent_netns[where]

    def command(self, where: str, argv: Sequence[str]) -> list[str]:
        return self.testbed.command(self.netns_for(where), super().command(where, argv))

    def spawn(self, where: str, argv: Sequence[str], *, log: IO[bytes]) -> subprocess.Popen[bytes]:
        # Through the testbed, which stops what it started when it goes down.
        return self.testbed.popen(
            self.netns_for(where),
            super().command(where, argv),
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # -- VMs and agents ------------------------------------------------------------------------

    def add_hospital(
        self, spec: HospitalSpec, *, agent_host: Host, vm_hosts: Sequence[Host], datasets: str
    ) -> AgentProcess:
        """Enrol the hospital's agent (in its host), start its VMs' sshds, pin their keys."""
        name = spec.name
        home = self.root / "agents" / name
        state = home / "state"
        state.mkdir(parents=True, exist_ok=True)
        vm_key = home / "vm_ssh_key"
        authorized = _keygen(vm_key, f"fedsky-agent@{name}")
        shapes = [_VM_SHAPES[i % len(_VM_SHAPES)] for i in range(len(spec.vms))]
        node_xml = home / "node.xml"
        uri = write_test_node(
            node_xml,
            hospital=name,
            vms=[
                NodeVm(vm, "running", vcpus, mem, disk)
                for vm, (vcpus, mem, disk) in zip(spec.vms, shapes, strict=True)
            ],
        )
        vm_sections = []
        for vm, host in zip(spec.vms, vm_hosts, strict=True):
            vm_host = VmHost(name, vm, host, self.root / "vms" / host.name)
            vm_host.start(
                self.testbed,
                authorized_key=authorized,
                mountpoint_record=self.root / cloudvm.CREATED,
            )
            self.vm_hosts[(name, vm)] = vm_host
            vm_sections += [f"[vms.{vm}]", f'address = "{host.address}"']
        config = home / "agent.toml"
        config.write_text(
            "\n".join(
                [
                    'state_dir = "state"',
                    f"report_interval_s = {self.report_interval_s}",
                    f"poll_interval_s = {self.poll_interval_s}",
                    "[libvirt]",
                    f'uri = "{uri}"',
                    "[executor]",
                    'kind = "ssh"',
                    'user = "root"',
                    f'identity_file = "{vm_key}"',
                    # The client payload: from the controller's pinned artifacts, checked with
                    # fedsky's CA from the enrolment bundle, installed into each VM.
                    "[payload]",
                    f'url = "{self.enroll_base}artifacts/"',
                    f'remote_python = "{_SYSTEM_PYTHON}"',
                    *vm_sections,
                    datasets,
                    "",
                ]
            )
        )
        self.agent_netns[name] = agent_host.netns
        agentctl = ("agentctl", "--config", str(config))
        csr = home / f"{name}.csr"
        self.run(*agentctl, "enroll", "request", name, "--out", str(csr), where=name)
        bundle = home / f"{name}.bundle.json"
        self.fedctl(
            "agents", "enroll", name, "--location", spec.location, "--csr", str(csr),
            "--out", str(bundle),
        )  # fmt: skip
        self.run(*agentctl, "enroll", str(bundle), where=name)
        # Each VM's host key, pinned the operator's way before any job: fetched over the
        # testbed from the agent's host, accepted only with the fingerprint the VM shows.
        for vm in spec.vms:
            fingerprint = self.vm_hosts[(name, vm)].host_key_fingerprint
            self.run(*agentctl, "vm", "register", vm, "--fingerprint", fingerprint, where=name)
        agent = AgentProcess(
            name=name, location=spec.location, config=config, state_dir=state, node_xml=node_xml
        )
        self.agents[name] = agent
        return agent

    def stop(self) -> None:
        super().stop()
        for vm in self.vm_hosts.values():
            if vm.proc is not None and vm.proc.poll() is None:
                try:
                    os.killpg(vm.proc.pid, signal.SIGTERM)
                    vm.proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    vm.proc.kill()
            # Power the VM off: its SSH sessions (an install the agent had under way) run in
            # sessions of their own. None may outlive the mount points removed below: a
            # removed mount point detaches their bind mounts, and they would write on the
            # host's own directory.
            kill_namespace_processes(vm.host.netns)
            if vm.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    vm.proc.wait(10)
        # Machines the controller did not end (it was stopped mid-job, or failed to).
        cloudvm.cleanup_run(self.cloud_dir)
        cloudvm.remove_mountpoints(self.root)
