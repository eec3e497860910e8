"""Build fedsky's Debian packages from the pinned wheelhouse (`make packages`).

    python packaging/build_debs.py [--wheelhouse dist/wheelhouse] [--out dist]
                                   [--version X.Y.Z] [--package agent ...] [--json]

Each package carries its role's wheels and hash-pinned requirement file (from `make
artifacts`) under `/opt/fedsky-<role>/wheelhouse/`, and its `postinst` builds
`/opt/fedsky-<role>/venv` from them with Debian 12's `python3`, offline (`pip install
--no-index --require-hashes`): a hospital without internet installs from the .deb alone, and
every wheel is checked against its digest on the machine that runs it. Building the venv there
rather than here keeps the package independent of where it was built (a venv is not
relocatable).

- `fedsky-agent`: the agent and agentctl (no torch, numpy or Flower), user `fedsky-agent`
  (in the `libvirt` group where it exists), `fedsky-agent.service`, `/etc/fedsky/agent.toml`.
- `fedsky-controller`: the controller and fedctl, user `fedsky`, `fedsky-controller.service`,
  `/etc/fedsky/controller.toml`; an upgrade migrates the database (`fedsky-controller
  --migrate`).
- `fedsky-client`: the hospital VMs' payload (the SuperNode, the ClientApp, torch CPU).
- `fedsky-aggregator`: the aggregator VM's payload (`fedsky-aggregator`, the ServerApp).

The config files are conffiles (kept across upgrades, dpkg asks before replacing an edited
one); state is removed only on purge. Built with `dpkg-deb`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
MAINTAINER = "fedsky developers <fedsky-dev@lists.fedsky.invalid>"


@dataclass(frozen=True)
class Package:
    role: str
    summary: str
    depends: tuple[str, ...] = ()
    user: str | None = None  # the service's system user
    state_dir: str | None = None
    unit: str | None = None
    config: str | None = None  # /etc/fedsky/<config>, a conffile
    commands: tuple[str, ...] = ()  # linked into /usr/bin
    groups: tuple[str, ...] = ()  # joined when they exist

    @property
    def name(self) -> str:
        return f"fedsky-{self.role}"

    @property
    def prefix(self) -> str:
        return f"/opt/{self.name}"


PACKAGES = {
    p.role: p
    for p in (
        Package(
            "agent",
            "fedsky agent: a hospital's VMs, tasks and SuperNodes",
            depends=("openssh-client",),
            user="fedsky-agent",
            state_dir="/var/lib/fedsky-agent",
            unit="fedsky-agent.service",
            config="agent.toml",
            commands=("fedsky-agent", "agentctl"),
            groups=("libvirt",),
        ),
        Package(
            "controller",
            "fedsky controller: API, job pipeline, orchestrator, placement",
            depends=("mosquitto",),
            user="fedsky",
            state_dir="/var/lib/fedsky",
            unit="fedsky-controller.service",
            config="controller.toml",
            commands=("fedsky-controller", "fedctl"),
        ),
        Package("client", "fedsky client payload for hospital VMs (SuperNode, ClientApp)"),
        Package("aggregator", "fedsky aggregator payload (SuperLink front, ServerApp)"),
    )
}


def _script(text: str) -> str:
    return "#!/bin/sh\nset -e\n" + text.strip() + "\nexit 0\n"


def postinst(p: Package) -> str:
    lines = [
        'if [ "$1" = configure ]; then',
    ]
    if p.user and p.state_dir:
        lines += [
            f"  if ! getent passwd {p.user} >/dev/null; then",
            f"    adduser --system --group --home {p.state_dir} --no-create-home "
            f"--gecos 'fedsky {p.role}' --quiet {p.user}",
            "  fi",
        ]
        for group in p.groups:
            lines += [
                f"  if getent group {group} >/dev/null; then adduser --quiet {p.user} {group}; fi"
            ]
        lines += [
            f"  install -d -m 0700 -o {p.user} -g {p.user} {p.state_dir}",
        ]
    lines += [
        # The venv from the packaged wheels alone, each checked against its digest. An upgrade
        # installs what changed into the same venv.
        f"  if [ ! -x {p.prefix}/venv/bin/python ]; then /usr/bin/python3 -m venv {p.prefix}/venv; fi",
        f"  PIP_CONFIG_FILE=/dev/null {p.prefix}/venv/bin/python -m pip install --quiet "
        "--disable-pip-version-check --no-input --no-cache-dir --no-index "
        f"--find-links {p.prefix}/wheelhouse --require-hashes "
        f"-r {p.prefix}/wheelhouse/requirements.txt",
    ]
    if p.role == "controller":
        lines += [
            # The database moves to this release's schema (a fresh install has none yet).
            "  if [ -f /var/lib/fedsky/controller.db ]; then",
            f"    runuser -u {p.user} -- {p.prefix}/venv/bin/fedsky-controller "
            "--config /etc/fedsky/controller.toml --migrate",
            "  fi",
        ]
    if p.unit:
        lines += ["  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi"]
    lines += ["fi"]
    return _script("\n".join(lines))


def prerm(p: Package) -> str:
    if not p.unit:
        return _script("true")
    return _script(f"if [ -d /run/systemd/system ]; then systemctl stop {p.unit} || true; fi")


def postrm(p: Package) -> str:
    lines = [
        'case "$1" in',
        "  remove|purge)",
        # The venv is made by postinst, so dpkg does not know its files.
        f"    rm -rf {p.prefix}/venv",
        f"    rmdir {p.prefix} 2>/dev/null || true",
        "    ;;",
        "esac",
    ]
    if p.user and p.state_dir:
        lines += [
            'if [ "$1" = purge ]; then',
            # Nothing of the service's user may outlive it (a broker left by a killed daemon).
            f"  if command -v pkill >/dev/null; then pkill -KILL -u {p.user} || true; fi",
            f"  rm -rf {p.state_dir}",
            f"  if getent passwd {p.user} >/dev/null; then deluser --quiet --system {p.user} || true; fi",
            f"  if getent group {p.user} >/dev/null; then delgroup --quiet --system {p.user} || true; fi",
            "  rmdir /etc/fedsky 2>/dev/null || true",
            "fi",
        ]
    if p.unit:
        lines += ["if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi"]
    return _script("\n".join(lines))


def control(p: Package, *, version: str, installed_kib: int) -> str:
    depends = ", ".join(("python3 (>= 3.11)", "python3-venv", "adduser", *p.depends))
    return (
        f"Package: {p.name}\n"
        f"Version: {version}\n"
        "Architecture: amd64\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {depends}\n"
        "Section: net\n"
        "Priority: optional\n"
        f"Description: {p.summary}\n"
        " fedsky builds federated-learning environments across clouds: hospitals train in their\n"
        " own private clouds, the aggregator runs in a public cloud placed by cost and latency.\n"
        " Installs offline from the pinned wheels it carries (checked by SHA-256).\n"
    )


def _wheels(wheelhouse: Path, role: str) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(REPO))
    from fedsky.shared.artifacts import requirement_files, requirements_file

    requirements = wheelhouse / requirements_file(role)  # type: ignore[arg-type]
    if not requirements.is_file():
        raise SystemExit(f"{requirements} is missing: run `make artifacts` first (the {role} role)")
    files = [wheelhouse / name for name in requirement_files(requirements.read_text())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"the wheelhouse lacks {', '.join(missing[:5])}")
    return requirements, files


def build(
    p: Package, *, wheelhouse: Path, out: Path, version: str, work: Path
) -> dict[str, object]:
    started = time.monotonic()
    stage = work / p.name
    shutil.rmtree(stage, ignore_errors=True)
    requirements, wheels = _wheels(wheelhouse, p.role)
    house = stage / p.prefix.lstrip("/") / "wheelhouse"
    house.mkdir(parents=True)
    shutil.copyfile(requirements, house / "requirements.txt")
    for wheel in wheels:
        shutil.copyfile(wheel, house / wheel.name)
    if p.unit:
        units = stage / "lib/systemd/system"
        units.mkdir(parents=True)
        shutil.copyfile(REPO / "systemd" / p.unit, units / p.unit)
    conffiles = []
    if p.config:
        etc = stage / "etc/fedsky"
        etc.mkdir(parents=True)
        shutil.copyfile(PACKAGING / p.config, etc / p.config)
        conffiles.append(f"/etc/fedsky/{p.config}")
    if p.commands:
        bin_dir = stage / "usr/bin"
        bin_dir.mkdir(parents=True)
        for command in p.commands:
            (bin_dir / command).symlink_to(f"{p.prefix}/venv/bin/{command}")
    debian = stage / "DEBIAN"
    debian.mkdir()
    size_kib = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file()) // 1024
    (debian / "control").write_text(control(p, version=version, installed_kib=size_kib))
    if conffiles:
        (debian / "conffiles").write_text("".join(f"{c}\n" for c in conffiles))
    for name, text in (("postinst", postinst(p)), ("prerm", prerm(p)), ("postrm", postrm(p))):
        (debian / name).write_text(text)
        (debian / name).chmod(0o755)
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"{p.name}_{version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z6", "--build", str(stage), str(deb)],
        check=True,
        capture_output=True,
    )
    return {
        "package": p.name,
        "file": str(deb),
        "bytes": deb.stat().st_size,
        "installed_kib": size_kib,
        "wheels": len(wheels),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "dist" / "wheelhouse")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "deb")
    parser.add_argument("--version", default=None, help="default: pyproject.toml's version")
    parser.add_argument("--package", action="append", choices=sorted(PACKAGES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("dpkg-deb") is None:
        print("dpkg-deb is not installed (apt-get install dpkg-dev)", file=sys.stderr)
        return 2
    version = (
        args.version or tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    )
    rows = [
        build(
            PACKAGES[role],
            wheelhouse=args.wheelhouse,
            out=args.out,
            version=version,
            work=args.work,
        )
        for role in (args.package or list(PACKAGES))
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['file']}: {int(row['bytes']) / 1e6:.1f} MB, {row['wheels']} wheels, "
                f"{int(row['installed_kib']) / 1024:.1f} MiB installed before its venv, "
                f"{row['seconds']} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
