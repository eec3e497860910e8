"""The agent's config file as `agentctl enroll BUNDLE` writes it.

Enrolment records who the agent is (`agent_id`, and `state_dir` when `--state-dir` moved it) in
the agent's config, so the file says which identity the installed certificates belong to and a
later bundle for another name is refused. An existing file (the package's conffile, one edited
by hospital IT) is edited line by line: its comments, order and other keys stay as they are,
and the edit is checked by parsing both versions: the result must hold exactly the old values
plus the new ones, or nothing is written. A missing file is created from a short template.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedsky.shared.files import atomic_write

_TABLE_HEADER = re.compile(r"^\s*\[")
# A new config holds paths and ids only; readable by the agent's group, never by others.
NEW_CONFIG_MODE = 0o640

Written = Literal["created", "updated", "unchanged"]


class ConfigFileError(Exception):
    """The config file could not be read or edited safely; the message says what to do."""


@dataclass(frozen=True)
class ConfigWrite:
    path: Path
    outcome: Written


def _toml_string(value: str) -> str:
    """`value` as a TOML basic string: quote, backslash and control characters escaped, every
    other character as it is (TOML has no surrogate escapes for characters beyond U+FFFF)."""
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _trailing_comment(line: str, key: str) -> str:
    """The comment ending an assignment line (`  # why`), or "": the first `#` before which the
    line is a whole assignment of `key` (a `#` inside the value's string does not count)."""
    for at in (i for i, char in enumerate(line) if char == "#"):
        try:
            if key in tomllib.loads(line[:at]):
                return "  " + line[at:].strip()
        except tomllib.TOMLDecodeError:
            continue
    return ""


def set_top_level(text: str, values: Mapping[str, str]) -> str:
    """`text` with each of `values` set as a top-level string key, everything else kept.

    A key already set at the top level (before the first table) has its line replaced; a new
    one goes just before the first table. Raises ConfigFileError if the text is not TOML or if
    the edit would change anything but those keys (a multi-line value, a dotted key).
    """
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"not valid TOML: {exc}") from None
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    first_table = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    for key, value in values.items():
        if before.get(key) == value:
            continue  # already so: the line stays as IT wrote it
        assignment = f"{key} = {_toml_string(value)}"
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        found = next((i for i in range(first_table) if pattern.match(lines[i])), None)
        if found is not None:
            lines[found] = assignment + _trailing_comment(lines[found], key)
            continue
        # Before the first table, after a blank line if the top-level block does not end in one.
        insert = [assignment]
        if first_table < len(lines):
            insert.append("")
        lines[first_table:first_table] = insert
        first_table += len(insert)
    edited = newline.join(lines) + newline
    try:
        after = tomllib.loads(edited)
    except tomllib.TOMLDecodeError:
        after = None
    if after != {**before, **values}:
        keys = ", ".join(f"{k} = {_toml_string(v)}" for k, v in values.items())
        raise ConfigFileError(
            f"its layout cannot be edited safely; add `{keys}` at its top yourself"
        )
    return edited


def new_config_text(values: Mapping[str, str]) -> str:
    """A fresh agent config holding `values`: the rest stays at the documented defaults."""
    keys = "\n".join(f"{key} = {_toml_string(value)}" for key, value in values.items())
    return (
        "# fedsky agent (docs/agent.md), written by `agentctl enroll`.\n"
        "# agent_id names the installed certificate: a bundle for another name is refused.\n"
        f"{keys}\n"
        "\n"
        "[libvirt]\n"
        'uri = "qemu:///system"\n'
        "\n"
        "# The SuperNode of each task runs inside the chosen VM, over SSH (required).\n"
        "# [executor]\n"
        '# kind = "ssh"\n'
        '# user = "fedsky"\n'
        '# identity_file = "/var/lib/fedsky-agent/ssh/id_ed25519"\n'
    )


def configured_agent_id(path: Path) -> str | None:
    """The `agent_id` the config file names, if it exists and names one."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc}") from None
    value = data.get("agent_id")
    return value if isinstance(value, str) else None


def record(path: Path, values: Mapping[str, str], *, group_of: Path | None = None) -> ConfigWrite:
    """Set `values` in the config file at `path`, creating it if missing.

    An existing file keeps its mode and owner. A new one is 0640, owned by the running user
    with the group of `group_of` (the agent's state directory: the service's group).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc}") from None
    if text is None:
        fresh = new_config_text(values)
        if {k: tomllib.loads(fresh).get(k) for k in values} != dict(values):
            raise ConfigFileError(f"{path}: the values cannot be written as TOML")
        group = group_of.stat().st_gid if group_of is not None and os.geteuid() == 0 else None
        atomic_write(path, fresh.encode(), mode=NEW_CONFIG_MODE, group=group)
        return ConfigWrite(path, "created")
    try:
        edited = set_top_level(text, values)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    if edited.splitlines() == text.splitlines():
        return ConfigWrite(path, "unchanged")
    st = path.stat()
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    atomic_write(path, edited.encode(), mode=st.st_mode & 0o7777, owner=owner)
    return ConfigWrite(path, "updated")
