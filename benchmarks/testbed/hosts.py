"""fedsky's daemons on the testbed's hosts: the controller in `ctl`, each hospital's agent in
`h-<hospital>`, an sshd in each `vm-<hospital>-<vm>`.

`TestbedBox` is the one-box harness (`fedsky.controller.onebox.Onebox`: the real daemons set up
through the real CLIs) with every process started under `ip netns exec` in its host's namespace,
the listeners bound to the hosts' testbed addresses, and the agents in hosts mode (the `ssh`
executor into their VMs, each VM's host key pinned with `agentctl vm register` before any job).

The VMs: each VM host runs a real sshd on its own address, port 22, with a host key made for the
run and its hospital's agent key authorized for root; `/root/.fedsky` is bind-mounted, in the
sshd's own mount namespace, onto a directory of that VM, so each VM keeps its own task files. The
client payload in the VMs is this checkout's venv (`[executor] remote_bin_dir`): installing it
from the pinned artifacts is the agent's job and is not exercised here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsky.agent.testnode import NodeVm, write_test_node
from fedsky.controller.onebox import AgentProcess, Onebox, OneboxError, _bin

from benchmarks.testbed.netns import Testbed, TestbedError
from benchmarks.testbed.topology import HospitalSpec, Host

BROKER_PORT = 8883
SUPERLINK_PORT = 9092
SSH_PORT = 22
_SSHD = "/usr/sbin/sshd"
# The ssh executor's default remote_work_dir is `.fedsky/tasks` under the login's home.
_HOST_FEDSKY_DIR = Path("/root/.fedsky")
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

    def start(self, testbed: Testbed, *, authorized_key: str, timeout: float = 15) -> None:
        d = self.directory
        home = d / "fedsky"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        # the bind mount of the VM's own directory onto root's ~/.fedsky (where the executor
        # keeps its task files) is seen by this sshd and its sessions only. Root's home itself
        # stays shared: the interpreter of this machine's venv lives under it.
        _HOST_FEDSKY_DIR.mkdir(mode=0o700, exist_ok=True)
        script = f'mount --bind "$1" {_HOST_FEDSKY_DIR} && exec {_SSHD} -D -e -f "$2"'
        with self.log_path.open("wb") as log:
            self.proc = testbed.popen(
                self.host.netns,
                ["sh", "-c", script, "sshd", str(home), str(d / "sshd_config")],
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
        onprem_name: str = "ctl",
        report_interval_s: float = 5.0,
    ) -> None:
        address = controller_host.address
        super().__init__(
            root=root,
            report_interval_s=report_interval_s,
            poll_interval_s=1.0,
            broker_port=BROKER_PORT,
            broker_host=address,
            # The controller's SuperLink is the operator's aggregator host, on ctl's address.
            controller_extra="\n".join(
                [
                    "[aggregator]",
                    f'bind_host = "{address}"',
                    f'advertise_host = "{address}"',
                    "[aggregator.onprem]",
                    f'name = "{onprem_name}"',
                    f"ports = [{SUPERLINK_PORT}, {SUPERLINK_PORT}]",
                ]
            ),
        )
        self.testbed = testbed
        self.ctl = controller_host
        self.onprem_name = onprem_name
        self.vm_hosts: dict[tuple[str, str], VmHost] = {}
        self.agent_netns: dict[str, str] = {}

    # -- commands, each in its host's namespace ------------------------------------------------

    def run_in(
        self, netns: str, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.testbed.command(netns, [_bin(argv[0]), *argv[1:]])
        done = subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise OneboxError(
                f"`{' '.join(argv[:4])} ...` in {netns} exited {done.returncode}: "
                f"{(done.stderr.strip() or done.stdout.strip())[-1500:]}"
            )
        return done

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`fedctl` and the operator's commands: on the controller's host."""
        return self.run_in(self.ctl.netns, *argv, check=check, timeout=timeout)

    # -- controller ----------------------------------------------------------------------------

    def start_controller(self, *, timeout: float = 60) -> None:
        log = (self.controller_dir / "controller.log").open("ab")
        self.controller = self.testbed.popen(
            self.ctl.netns,
            [_bin("fedsky-controller"), "--config", str(self.controller_config)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_controller(timeout=timeout)

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
            vm_host.start(self.testbed, authorized_key=authorized)
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
                    # The VMs' client payload: this checkout's venv (see the module docstring).
                    f'remote_bin_dir = "{Path(sys.executable).parent}"',
                    *vm_sections,
                    datasets,
                    "",
                ]
            )
        )
        self.agent_netns[name] = agent_host.netns
        agentctl = ("agentctl", "--config", str(config))
        csr = home / f"{name}.csr"
        self.run_in(agent_host.netns, *agentctl, "enroll", "request", name, "--out", str(csr))
        bundle = home / f"{name}.bundle.json"
        self.fedctl(
            "agents", "enroll", name, "--location", spec.location, "--csr", str(csr),
            "--out", str(bundle),
        )  # fmt: skip
        self.run_in(agent_host.netns, *agentctl, "enroll", str(bundle))
        # Each VM's host key, pinned the operator's way before any job: fetched over the
        # testbed from the agent's host, accepted only with the fingerprint the VM shows.
        for vm in spec.vms:
            self.run_in(
                agent_host.netns,
                *agentctl,
                "vm",
                "register",
                vm,
                "--fingerprint",
                self.vm_hosts[(name, vm)].host_key_fingerprint,
            )
        agent = AgentProcess(
            name=name, location=spec.location, config=config, state_dir=state, node_xml=node_xml
        )
        self.agents[name] = agent
        return agent

    def start_agent(self, name: str) -> None:
        agent = self.agents[name]
        agent.log_path = agent.config.parent / "agent.log"
        log = agent.log_path.open("ab")
        agent.proc = self.testbed.popen(
            self.agent_netns[name],
            [_bin("fedsky-agent"), "--config", str(agent.config)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        super().stop()
        for vm in self.vm_hosts.values():
            if vm.proc is not None and vm.proc.poll() is None:
                try:
                    os.killpg(vm.proc.pid, signal.SIGTERM)
                    vm.proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    vm.proc.kill()
