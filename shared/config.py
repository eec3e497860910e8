"""Config files: TOML validated by pydantic at the boundary.

A bad file fails at start with the file, the key and what was expected, e.g.
`agent.toml: key 'report_interval_s': Input should be greater than 0 (got -1)`.
"""

from __future__ import annotations

import reprlib
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file that is missing, unreadable or invalid."""


# A value shown in an error is cut short: the input may be huge or deeply nested (a YAML list of
# lists), and the message goes to logs and API answers.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40
_MAX_ERRORS_SHOWN = 10


def _describe(exc: ValidationError, path: Path) -> str:
    lines = []
    errors = exc.errors()
    for err in errors[:_MAX_ERRORS_SHOWN]:
        key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = (
            ""
            if err.get("type") in ("missing", "extra_forbidden") or isinstance(got, dict)
            else f" (got {_SHORT.repr(got)})"
        )
        lines.append(f"{path}: key '{key[:200]}': {msg}{shown}")
    if len(errors) > _MAX_ERRORS_SHOWN:
        lines.append(f"{path}: and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def parse_config(model: type[M], data: dict[str, Any], *, path: Path) -> M:
    """Validate already-parsed config data, reporting errors against `path`."""
    try:
        return model.model_validate(data, context={"config_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def load_config(model: type[M], path: str | Path) -> M:
    """Read and validate a TOML config file into `model`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(model, data, path=path)


def resolve_path(value: Path, config_dir: Path | None) -> Path:
    """Paths in a config file are relative to the file's directory."""
    value = value.expanduser()
    if config_dir is not None and not value.is_absolute():
        return (config_dir / value).resolve()
    return value
