"""The testbed's cloud: boots an aggregator "VM" in a region host with the controller's user data.

The controller's `[clouds.launcher]` runs this file (`controller/clouds/launcher.py` has the
protocol): `launch` gets the very start-up script the AWS provider would give EC2 as user data
on stdin and boots a machine in the region's host (`r-<cloud>-<region>`), which runs it as
cloud-init would: as root, with a plain environment. The script's steps are the product's: it
fetches the pinned aggregator artifacts from the controller's enrolment listener and installs
them with `pip --no-index --require-hashes`, makes its keys, redeems its one-time token, fetches
the model file and starts the SuperLink with `systemctl enable --now`.

What makes a namespace a machine here:

- the region host's network namespace (its one address on the testbed subnet; every link
  delayed by the relays);
- a mount namespace of its own (`ip netns exec` makes one) where the directories the script
  writes to (`/etc/fedsky/aggregator`, `/var/lib/fedsky-aggregator`, `/opt/fedsky`,
  `/etc/systemd/system`, the service's state directory, `/run/credentials`) are bind mounts
  of this machine's own directories under the testbed's run directory;
- a `systemctl` stand-in first on its PATH (`systemctl` subcommand below): no systemd runs
  here, so it reads the unit the script wrote and starts its `ExecStart` the way systemd would
  for what the unit asks (`DynamicUser` as `nobody`, `StateDirectory`, `LoadCredential` under
  `/run/credentials/<unit>/`, `Environment`). Sandboxing directives (`ProtectSystem`, ...) are
  not enforced and are listed in the machine's journal as such.

`terminate` stops every process in the region host's namespace (the machine is the namespace)
and removes the machine's directory. Only standard library: the controller runs this file with
the system's Python, outside any virtual environment.

State: `--testbed FILE`, written by the harness, maps `cloud:region` to the region host's
namespace and address and names the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The machine's directories, bind-mounted over these paths inside its mount namespace.
MACHINE_PATHS = (
    "/etc/fedsky/aggregator",
    "/var/lib/fedsky-aggregator",
    "/var/lib/fedsky-superlink",
    "/opt/fedsky",
    "/etc/systemd/system",
    "/run/credentials",
)
CREATED = "created-mountpoints"  # in the run directory: what `remove_mountpoints` may remove
_JOB = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_USER_DATA = 1024 * 1024
_SERVICE_USER = "nobody"
_SERVICE_GROUP = "nogroup"
_SANDBOXING = {
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictAddressFamilies",
    "SystemCallFilter", "CapabilityBoundingSet", "ReadWritePaths", "LockPersonality",
    "MemoryDenyWriteExecute", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
}  # fmt: skip
_HANDLED = {
    "Type", "DynamicUser", "StateDirectory", "LoadCredential", "Environment", "ExecStart",
    "Restart", "User", "Group", "WorkingDirectory",
}  # fmt: skip


class VmError(Exception):
    """What the launcher reports to the controller (the last line of stderr)."""


def mountpoint(path: str, vm_dir: Path) -> Path:
    """Where a machine's own copy of `path` is kept under its directory."""
    return vm_dir / "fs" / path.strip("/").replace("/", "__")


def _load(testbed_file: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(testbed_file.read_text())
    except (OSError, ValueError) as exc:
        raise VmError(f"cannot read the testbed's state {testbed_file}: {exc}") from None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie is gone for our purposes.
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _machines(root: Path) -> list[dict[str, Any]]:
    out = []
    for record in sorted(root.glob("*/machine.json")):
        try:
            machine = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        machine["alive"] = _alive(int(machine.get("pid", 0) or 0))
        out.append(machine)
    return out


# -- the controller's side: launch, terminate, list ------------------------------------------


def launch(args: argparse.Namespace) -> dict[str, Any]:
    state = _load(args.testbed)
    location = f"{args.cloud}:{args.region}"
    region = state["regions"].get(location)
    if region is None:
        raise VmError(
            f"the testbed has no host for {location} (its regions: "
            f"{', '.join(sorted(state['regions'])) or 'none'})"
        )
    if not _JOB.match(args.job):
        raise VmError(f"job id {args.job!r} is not one the testbed names machines after")
    root = Path(state["root"])
    for machine in _machines(root):
        if machine["alive"] and machine["netns"] == region["netns"]:
            raise VmError(
                f"{region['netns']} already runs the aggregator of job {machine['job']}: one "
                "machine per region host (its SuperLink port is taken)"
            )
    user_data = sys.stdin.buffer.read(_MAX_USER_DATA + 1)
    if len(user_data) > _MAX_USER_DATA:
        raise VmError("the user data is larger than 1 MiB")
    if not user_data.startswith(b"#!"):
        raise VmError("the user data is not a script (no #! line)")
    vm_dir = root / args.job
    if vm_dir.exists():
        shutil.rmtree(vm_dir)
    vm_dir.mkdir(parents=True, mode=0o700)
    (vm_dir / "user-data").write_bytes(user_data)
    (vm_dir / "user-data").chmod(0o700)
    for path in MACHINE_PATHS:
        mountpoint(path, vm_dir).mkdir(parents=True, mode=0o755)
    bin_dir = vm_dir / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "systemctl"
    standin.write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
        f' systemctl --vm {shlex.quote(str(vm_dir))} "$@"\n'
    )
    standin.chmod(0o755)
    console = vm_dir / "console.log"
    with console.open("ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", region["netns"], sys.executable, str(Path(__file__).resolve()),
             "boot", "--vm", str(vm_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )  # fmt: skip
    machine = {
        "job": args.job,
        "ref": f"{location}/{args.job}",
        "location": location,
        "netns": region["netns"],
        "address": region["address"],
        "instance_type": args.instance_type,
        "allowed_sources": args.allow or [],
        "pid": proc.pid,
        "booted_at": time.time(),
    }
    (vm_dir / "machine.json").write_text(json.dumps(machine, indent=1))
    return {"ref": machine["ref"], "address": region["address"], "console": str(console)}


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def terminate(args: argparse.Namespace) -> dict[str, Any]:
    state = _load(args.testbed)
    root = Path(state["root"])
    found = [m for m in _machines(root) if m["ref"] == args.ref and m["job"] == args.job]
    if not found or "terminated_at" in found[0]:
        return {"ref": args.ref, "state": "gone"}
    _end(root, found[0])
    if not any(m["alive"] for m in _machines(root)):
        remove_mountpoints(root)
    return {"ref": args.ref, "state": "terminated"}


def _end(root: Path, machine: dict[str, Any]) -> None:
    # The machine is its namespace: power off is every process in it ending.
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _netns_pids(machine["netns"])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not _netns_pids(machine["netns"]):
            break
    left = _netns_pids(machine["netns"])
    if left:
        raise VmError(f"processes {left} in {machine['netns']} did not end")
    # The machine's disk goes (the user data held its spent token); its logs stay, as a
    # cloud keeps a terminated instance's console output for a while.
    vm_dir = root / machine["job"]
    shutil.rmtree(vm_dir / "fs", ignore_errors=True)
    (vm_dir / "user-data").unlink(missing_ok=True)
    machine["terminated_at"] = time.time()
    machine.pop("alive", None)
    (vm_dir / "machine.json").write_text(json.dumps(machine, indent=1))


def ensure_mountpoint(path: Path, *, record: Path) -> None:
    """Make `path` (and missing parents) for a bind mount, writing each directory made to
    `record` so that `remove_mountpoints` can take it away again."""
    new = []
    while not path.exists():
        new.append(path)
        path = path.parent
    for directory in reversed(new):
        directory.mkdir(mode=0o755, exist_ok=True)
        with record.open("a") as created:
            created.write(f"{directory}\n")


def remove_mountpoints(root: Path) -> list[str]:
    """Remove the empty mount points made on this host (`ensure_mountpoint` with `root`'s
    record), deepest first; a directory that holds anything is left alone."""
    record = root / CREATED
    try:
        created = sorted(set(record.read_text().split()), key=len, reverse=True)
    except FileNotFoundError:
        return []
    removed = []
    for directory in created:
        try:
            os.rmdir(directory)
            removed.append(directory)
        except OSError:
            pass
    record.unlink(missing_ok=True)
    return removed


def cleanup(args: argparse.Namespace) -> dict[str, Any]:
    """Terminate every machine of the run, then remove the mount points (the harness's teardown)."""
    return cleanup_run(Path(_load(args.testbed)["root"]))


def cleanup_run(root: Path) -> dict[str, Any]:
    ended = []
    for machine in _machines(root):
        if "terminated_at" not in machine:
            _end(root, machine)
            ended.append(machine["ref"])
    return {"terminated": ended, "mountpoints_removed": remove_mountpoints(root)}


def machine_records(root: Path) -> list[dict[str, Any]]:
    """Every machine of the run, alive or ended, with what its boot and services logged."""
    out = []
    for machine in _machines(root):
        vm_dir = root / machine["job"]
        exit_file = vm_dir / "user-data.exit"
        if exit_file.exists():
            code, took = exit_file.read_text().split()
            machine["user_data_exit"], machine["user_data_s"] = int(code), float(took)
        for pid_file in vm_dir.glob("*.service.pid"):
            machine.setdefault("services", {})[pid_file.name.removesuffix(".pid")] = int(
                pid_file.read_text()
            )
        machine["console"] = str(vm_dir / "console.log")
        out.append(machine)
    return out


def list_machines(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {"job": m["job"], "ref": m["ref"]}
        for m in _machines(Path(_load(args.testbed)["root"]))
        if m["alive"]
    ]


# -- inside the machine ----------------------------------------------------------------------


def boot(args: argparse.Namespace) -> None:
    """In the region host's namespaces: mount the machine's directories, run the user data as
    cloud-init does, then stay up (the machine) until terminated."""
    vm_dir: Path = args.vm
    for path in MACHINE_PATHS:
        # The mount points must exist on this machine's file system; an empty directory is left
        # behind only where none was before and is removed when the last machine ends.
        ensure_mountpoint(Path(path), record=vm_dir.parent / CREATED)
        subprocess.run(
            ["mount", "--bind", str(mountpoint(path, vm_dir)), path], check=True, timeout=30
        )
    env = {
        "PATH": f"{vm_dir / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "FEDSKY_TESTBED_VM": str(vm_dir),
    }
    print(f"[testbed] {vm_dir.name}: running user data", flush=True)
    started = time.monotonic()
    code = subprocess.run(
        [str(vm_dir / "user-data")], cwd="/", env=env, stdin=subprocess.DEVNULL, check=False
    ).returncode
    took = time.monotonic() - started
    print(f"[testbed] user data exited {code} after {took:.1f} s", flush=True)
    (vm_dir / "user-data.exit").write_text(f"{code} {took:.1f}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def _mount_points() -> set[str]:
    """This mount namespace's mount points (a bind mount on the same file system is one,
    though `os.path.ismount` cannot tell)."""
    with open("/proc/self/mountinfo") as mounts:
        return {line.split()[4] for line in mounts if len(line.split()) > 4}


def _read_unit(path: Path) -> dict[str, list[str]]:
    """A unit file's [Service] keys (a key may repeat, as systemd allows)."""
    section, keys = "", {}  # type: ignore[var-annotated]
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), value)


def start_unit(unit: str, vm_dir: Path, journal: Any) -> None:
    """What `systemctl start` does for the directives fedsky's units use."""
    if "/" in unit or not unit.endswith(".service"):
        raise VmError(f"not a service unit: {unit!r}")
    keys = _read_unit(Path("/etc/systemd/system", unit))
    unknown = sorted(set(keys) - _HANDLED - _SANDBOXING)
    if unknown:
        raise VmError(f"{unit}: the testbed's systemctl does not know {', '.join(unknown)}")
    ignored = sorted(set(keys) & _SANDBOXING)
    if ignored:
        print(f"[testbed] {unit}: not enforced here: {', '.join(ignored)}", file=journal)
    import grp
    import pwd

    dynamic = keys.get("DynamicUser", ["no"])[-1] in ("yes", "true", "1")
    user = keys.get("User", [_SERVICE_USER if dynamic else "root"])[-1]
    uid = pwd.getpwnam(user).pw_uid
    gid = grp.getgrnam(keys.get("Group", [_SERVICE_GROUP if dynamic else "root"])[-1]).gr_gid
    env: dict[str, str] = {"LANG": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    for line in keys.get("Environment", []):
        for item in shlex.split(line):
            name, _, value = item.partition("=")
            env[name] = value
    for name in keys.get("StateDirectory", []):
        state = Path("/var/lib", name)
        if str(state) not in _mount_points():
            raise VmError(f"{unit}: StateDirectory {state} is not one of this machine's own")
        os.chown(state, uid, gid)
        state.chmod(0o755)
        env["STATE_DIRECTORY"] = str(state)
    credentials = keys.get("LoadCredential", [])
    if credentials:
        cred_dir = Path("/run/credentials", unit)
        cred_dir.mkdir(mode=0o500, exist_ok=True)
        for item in credentials:
            name, _, source = item.partition(":")
            target = cred_dir / name
            shutil.copyfile(source, target)
            os.chown(target, uid, gid)
            target.chmod(0o400)
        os.chown(cred_dir, uid, gid)
        env["CREDENTIALS_DIRECTORY"] = str(cred_dir)
    (exec_start,) = keys["ExecStart"][-1:]
    argv = [_expand(a, env) for a in shlex.split(exec_start)]
    log = (vm_dir / f"{unit}.log").open("ab")
    proc = subprocess.Popen(
        argv, env=env, user=uid, group=gid, extra_groups=[], cwd=keys.get("WorkingDirectory", ["/"])[-1],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    (vm_dir / f"{unit}.pid").write_text(str(proc.pid))
    print(f"[testbed] {unit}: started {argv[0]} as {user} (pid {proc.pid})", file=journal)


def systemctl(args: argparse.Namespace) -> None:
    """The machine's `systemctl`: daemon-reload, enable [--now], start, is-active, stop."""
    words = [w for w in args.words if not w.startswith("-")]
    now = "--now" in args.words
    if not words:
        raise VmError("systemctl: no command")
    command, units = words[0], words[1:]
    vm_dir: Path = args.vm
    journal = sys.stderr
    if command == "daemon-reload":
        return
    if command in ("enable", "start"):
        for unit in units:
            if command == "start" or now:
                start_unit(unit, vm_dir, journal)
        return
    if command in ("is-active", "stop"):
        for unit in units:
            pid_file = vm_dir / f"{unit}.pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else 0
            if command == "stop" and pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
            elif command == "is-active" and not (pid and _alive(pid)):
                raise SystemExit(3)
        return
    raise VmError(f"systemctl {command}: not something the testbed's machines do")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudvm", description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", type=Path, help="the testbed's state file")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("launch")
    p.add_argument("--job", required=True)
    p.add_argument("--cloud", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--instance-type", required=True)
    p.add_argument("--allow", action="append")
    p = sub.add_parser("terminate")
    p.add_argument("--job", required=True)
    p.add_argument("--ref", required=True)
    sub.add_parser("list")
    p = sub.add_parser("boot")
    p.add_argument("--vm", type=Path, required=True)
    sub.add_parser("cleanup")
    p = sub.add_parser("systemctl")
    p.add_argument("--vm", type=Path, required=True)
    p.add_argument("words", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.action in ("launch", "terminate", "list", "cleanup") and args.testbed is None:
            raise VmError(f"{args.action} needs --testbed FILE")
        if args.action == "launch":
            print(json.dumps(launch(args)))
        elif args.action == "terminate":
            print(json.dumps(terminate(args)))
        elif args.action == "list":
            print(json.dumps(list_machines(args)))
        elif args.action == "cleanup":
            print(json.dumps(cleanup(args)))
        elif args.action == "boot":
            boot(args)
        else:
            systemctl(args)
    except VmError as exc:
        print(f"cloudvm: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        print(f"cloudvm: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
