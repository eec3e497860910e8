"""`fedctl backup create FILE` / `fedctl backup restore FILE [--force]`: the controller's
database, CA, vault key, model signing key and audit head, in one file (no daemon needed;
run it as the controller's user). See `controller/security/backup.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsky.controller.cli.client import config_path
from fedsky.controller.cli.output import fail, print_json
from fedsky.controller.config import ControllerConfig, load_controller_config
from fedsky.controller.security.backup import (
    BackupError,
    Sources,
    create_backup,
    restore_backup,
)
from fedsky.controller.store import StateInUse
from fedsky.shared import exitcodes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser("backup", help="back up or restore the controller's state")
    backup_sub = backup.add_subparsers(dest="backup_command", metavar="ACTION")
    backup_sub.required = True
    create = backup_sub.add_parser(
        "create", help="write the database, CA, vault key and signing key to FILE (0600)"
    )
    create.add_argument("file", type=Path, metavar="FILE")
    create.add_argument("--json", action="store_true", help="print the manifest as JSON")
    create.set_defaults(func=_create)
    restore = backup_sub.add_parser(
        "restore", help="restore FILE into the state directory (the controller stopped)"
    )
    restore.add_argument("file", type=Path, metavar="FILE")
    restore.add_argument(
        "--force", action="store_true", help="replace a state directory that holds a database"
    )
    restore.set_defaults(func=_restore)


def _signing_key(config: ControllerConfig) -> Path:
    return config.registry.root(config.state_dir) / "signing.key"


def _create(args: argparse.Namespace) -> int:
    config = load_controller_config(config_path(args.config))
    sources = Sources(state_dir=config.state_dir, signing_key=_signing_key(config))
    try:
        manifest = create_backup(sources, args.file)
    except (BackupError, OSError) as exc:
        return fail(str(exc))
    if args.json:
        print_json(manifest)
    else:
        for entry in manifest["files"]:
            print(f"{entry['name']}  sha256:{entry['sha256'][:16]}...")
        print(f"backup written to {args.file} (0600: it holds the CA's private key)")
    return exitcodes.OK


def _restore(args: argparse.Namespace) -> int:
    config = load_controller_config(config_path(args.config))
    try:
        names = restore_backup(
            args.file,
            state_dir=config.state_dir,
            signing_key=_signing_key(config),
            force=args.force,
        )
    except StateInUse as exc:
        return fail(str(exc), code=exitcodes.UNAVAILABLE)
    except (BackupError, OSError) as exc:
        return fail(str(exc))
    for name in names:
        print(f"restored {name}")
    print(f"state restored into {config.state_dir}; start the controller")
    return exitcodes.OK
