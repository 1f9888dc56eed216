"""`quotad serve --config FILE.toml`: every serve setting from a TOML file.

Keys are the flag names with underscores (`--map-size-gib` is `map_size_gib`, the repeatable
`--cors-origin` is `cors_origin`, a list), every flag but --config has one, and the one key
that is no flag is `admin_key` (a key is never given on the command line). Flags given on the
command line win over the file; relative paths in the file are relative to the file's folder.
An unknown key, a wrong type or a bad choice is refused naming the key.

SETTINGS is the one table of what the file may hold: adding a setting is adding one entry.
An entry whose `server.Config` field does not exist in this build is refused, cleanly.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quotad.server import NS_PER_HOUR, Config

NS_PER_DAY = 24 * 3600 * 1_000_000_000
LOG_LEVELS = ("debug", "info", "warning", "error")


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    """The TOML key, which is also the serve flag's name with underscores."""
    kind: type
    """What the TOML value must be: str, int, float (an int is fine too), bool, Path or list
    (of strings)."""
    field: str
    """The server.Config field it sets; empty: read by the command line itself."""
    convert: Callable[[Any], Any] = _same
    """Flag value -> Config field value (units, say)."""
    choices: tuple[str, ...] = ()


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", str, "listen"),
    Setting("data_dir", Path, "data_dir"),
    Setting("plans", Path, "plans"),
    Setting("map_size_gib", float, "map_size_bytes", lambda gib: int(gib * 1024**3)),
    Setting("snapshot_every_records", int, "snapshot_every_records"),
    Setting("snapshot_every_s", float, "snapshot_every_s"),
    Setting("audit_retention_days", float, "audit_retention_ns",
            lambda days: int(days * NS_PER_DAY)),
    Setting("audit_retention_gib", float, "audit_retention_bytes", lambda gib: int(gib * 1024**3)),
    Setting("idempotency_retention_hours", float, "idempotency_retention_ns",
            lambda hours: int(hours * NS_PER_HOUR)),
    Setting("metrics_listen", str, "metrics_listen"),
    Setting("reflection", bool, "reflection"),
    Setting("log_state_digest", bool, "log_state_digest"),
    Setting("log_level", str, "", choices=LOG_LEVELS),
    Setting("admin_key", str, "admin_key"),
    Setting("admin_key_file", Path, ""),
    Setting("tls_cert", Path, "tls_cert"),
    Setting("tls_key", Path, "tls_key"),
    Setting("http_listen", str, "http_listen"),
    Setting("cors_origin", list, "cors_origins", tuple),
    Setting("http_read_timeout_s", float, "http_read_timeout_s"),
    Setting("http_allowed_host", list, "http_allowed_hosts", tuple),
    Setting("admission_operations", int, "admission_operations"),
    Setting("commit_delay_ms", int, "commit_delay_ms"),
    Setting("pending_calls_per_method", int, "pending_calls_per_method"),
    Setting("shard_map", Path, "shard_map_file"),
    Setting("shard_id", int, "shard_id"),
    Setting("cluster", str, "cluster"),
    Setting("lease_ttl_s", int, "lease_ttl_s"),
)
BY_KEY = {setting.key: setting for setting in SETTINGS}
assert {s.field for s in SETTINGS if s.field} <= {f.name for f in dataclasses.fields(Config)}


class ConfigFileError(Exception):
    pass


def load(path: Path) -> dict[str, Any]:
    """The file's settings as {key: flag value}, checked; ConfigFileError naming the key."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: {error}") from error
    folder = path.resolve().parent
    values = {}
    for key, value in document.items():
        setting = BY_KEY.get(key)
        if setting is None:
            raise ConfigFileError(
                f"{path}: unknown key {key!r}; known keys: "
                f"{', '.join(s.key for s in SETTINGS)}")
        values[key] = _checked(path, setting, value, folder)
    if "admin_key" in values:
        try:
            require_owner_only(path, "holds admin_key, but")
        except ValueError as error:
            raise ConfigFileError(str(error)) from error
    return values


def require_owner_only(path: Path, why: str) -> None:
    """ValueError naming the file if anyone but its owner may read or write it: it holds a
    secret (why: "holds admin_key, but", say)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"{path}: {why} others may read it (mode {mode & 0o777:o}); make it "
                         f"owner-only: chmod 600 {path}")


def _checked(path: Path, setting: Setting, value: Any, folder: Path) -> Any:
    kind = setting.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is Path and isinstance(value, str) and value:
        value = folder / Path(value).expanduser()
    elif kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        pass
    elif type(value) is not kind:  # bool is an int: exact types only
        expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                    Path: "a non-empty path string", list: "a list of strings"}[kind]
        raise ConfigFileError(f"{path}: key {setting.key!r} must be {expected}, "
                              f"got {value!r}")
    if setting.choices and value not in setting.choices:
        raise ConfigFileError(f"{path}: key {setting.key!r} must be one of "
                              f"{', '.join(setting.choices)}, got {value!r}")
    return value


def config_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """server.Config keyword arguments from flag values ({key: value}; None: not set)."""
    kwargs = {}
    for key, value in values.items():
        setting = BY_KEY.get(key)
        if value is None or setting is None or not setting.field:
            continue  # not set: the Config default
        kwargs[setting.field] = setting.convert(value)
    return kwargs
