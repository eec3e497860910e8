#!/usr/bin/env bash
# Installs everything fedsky needs on a fresh Debian 12 machine into .venv at the repo root.
# Idempotent: each step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# --browser: also what the dashboard's browser tests drive (Debian's chromium); `make test` asks.
packages=(libvirt-dev pkg-config mosquitto openssh-server openssh-client iproute2 python3-venv adduser procps)
[ "${1:-}" = "--browser" ] && packages+=(chromium)
need_apt=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
# npm builds the dashboard's front-end files; a node install of its own will do.
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "fedsky: installing system packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "fedsky: creating .venv"
    "$PY" -m venv .venv
fi
VPIP=".venv/bin/pip --disable-pip-version-check -q"
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "fedsky: installing torch 2.13.0 (CPU build)"
    # The exact pin takes the CPU wheel; a looser spec would pull a CUDA build of several GB.
    $VPIP install torch==2.13.0
fi
# The dashboard's library (pinned in web/package-lock.json) into the controller's package.
"$PY" scripts/build_dashboard.py
stamp=.venv/.fedsky-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$(find controller agent shared \( -name '*.py' -o -path '*/dashboard/static/*' \) -newer "$stamp" -print -quit)" ]; then
    echo "fedsky: installing fedsky with all extras (editable)"
    $VPIP install -e ".[agent,client,aggregator,controller,dev]" --config-settings editable_mode=strict
    touch "$stamp"
fi
