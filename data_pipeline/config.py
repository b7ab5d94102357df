"""Typed job configuration: nested dataclasses, loaded from YAML, overridden by `key.sub=value`.

The machinery every `t2i` command shares; it imports nothing from the project, and each job's
schema lives beside its job (`trainer.config.TrainConfig`, `data_pipeline.preprocess.config`,
`data_pipeline.tokenize.config`, `data_pipeline.digits.DigitsConfig`, ...). A job's schema is a dataclass tree; `load_config` builds it
from a YAML file (values only, no import strings) plus command-line overrides, and every problem —
an unknown key, a value of the wrong type, a required value left unset — raises `ConfigError`
naming the dotted key and where the value came from (the file or the command line).

Across a Ray boundary pass `dataclasses.asdict(cfg)` and rebuild with `from_dict(Schema, d)` on the
first line of the worker function; workers never read module globals.

A key that moved keeps a forwarding entry in its schema's `RENAMED` class attribute (old dotted key
-> new dotted key, both relative to that schema): the old key in a file or on the command line is
an error naming the new one. Reading a config that an earlier version wrote (a run directory's
`config.yaml`) passes `migrate=True` instead, which moves the value to its new key. A key whose
value does not carry over (it changed meaning or type) goes in `REPLACED` instead: an error naming
its successor in a file or on the command line, dropped when migrating.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

# Sentinel for values a job cannot default (an output path, say). `validate_required` reports them.
REQUIRED: Any = "???"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the source."""


# --------------------------------------------------------------------------------------------
# Sections every job shares
# --------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    """Where `s3://` paths live. Credentials are never configured here: they come from the
    environment / boto3 credential chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles)."""

    endpoint_url: str | None = None  # S3-compatible endpoint; default: $AWS_ENDPOINT_URL or AWS
    region: str | None = None  # default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1
    # S3 client (same defaults as data_pipeline.fs.S3Options): retries back off exponentially with
    # jitter (AWS "standard" strategy) on 503 SlowDown, 5xx, reset connections and timeouts.
    max_attempts: int = 10  # attempts per request, the first included (1: no retry)
    connect_timeout_s: float = 10.0  # TCP/TLS connect timeout
    request_timeout_s: float = 60.0  # a request whose transfer stalls this long is retried
    part_size_mb: int = 64  # multipart part size for large uploads (grows past 10,000 parts)


@dataclass
class RayConfig:
    """How a command reaches Ray: in-process local instance by default."""

    address: str | None = None  # None: $RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = None  # local instance only; None: all cores
    dashboard: bool = True  # local instance only; bound to 127.0.0.1


@dataclass
class ActorPoolSection:
    """The fields of a section whose model runs on a Ray Data actor pool (the CLIP scorer, the
    image tokenizer, the text encoder); each section adds what its actors load."""

    batch_size: int = 64  # rows per forward pass; batches are padded to it (batch-invariant)
    concurrency: int = 1  # actors in the pool
    num_gpus: float = 0.0  # per actor, requested as given (0: CPU actors; data_pipeline/devices.py)
    num_cpus: float = 1.0  # per actor; also its torch thread count (at least 1)


# --------------------------------------------------------------------------------------------
# Loading machinery
# --------------------------------------------------------------------------------------------


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    require: bool = True,
    migrate: bool = False,
) -> T:
    """Build `schema` from an optional YAML file, then apply dotted `key=value` overrides.

    Raises ConfigError naming the key and the file (or "command line") for unknown keys, wrong
    types, malformed overrides, and (with `require`) required values left unset. With `migrate`,
    the file's values under `schema.RENAMED` keys move to their new keys (see `from_dict`).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    cfg = from_dict(schema, data, source=source, migrate=migrate)
    cfg = apply_overrides(cfg, overrides)
    if require:
        validate_required(cfg, source=source)
    return cfg


def has_presets(schema: type) -> bool:
    """A section accepts `preset: NAME` when its class defines `from_preset(name)`: the named
    values first, the section's own keys on top (the DALL-E and U-Net shapes do)."""
    return callable(getattr(schema, "from_preset", None))


def _from_preset(schema: type, name: Any, source: str, key: str) -> Any:
    try:
        return schema.from_preset(name)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: '{key}': {e}") from None


def from_dict(
    schema: type[T],
    data: dict[str, Any],
    *,
    source: str = "dict",
    prefix: str = "",
    migrate: bool = False,
) -> T:
    """Rebuild a dataclass tree from plain data (YAML or `asdict` output), checking every key.

    A key of `schema.RENAMED` in `data` is an error naming its new key; with `migrate` its value
    moves there instead (configs written before the rename; `schema`'s own RENAMED only).
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}"
        )
    data = _migrate(schema, data, source, prefix) if migrate else data
    for old, new in {**renamed_keys(schema), **replaced_keys(schema)}.items():
        if _has_path(data, old.split(".")):
            raise _renamed_error(source, _join(prefix, old), _join(prefix, new))
    if has_presets(schema) and "preset" in data:
        data = dict(data)
        base = _from_preset(schema, data.pop("preset"), source, _join(prefix, "preset"))
        data = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **data}
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = _join(prefix, str(unknown[0]))
        raise ConfigError(
            f"{source}: unknown key '{key}' (valid keys here: {', '.join(sorted(names))})"
        )
    kwargs = {
        name: _coerce(hints[name], value, source, _join(prefix, name))
        for name, value in data.items()
    }
    return schema(**kwargs)


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply `a.b.c=value` strings; values parse as YAML scalars/lists ("3", "true", "[1,2]").

    `section.preset=NAME` overrides apply first, so `dalle.preset=1b3 dalle.depth=12` means
    "the 1b3 preset with 12 layers" whatever the order on the command line.
    """
    overrides = sorted(overrides, key=lambda o: not o.partition("=")[0].strip().endswith("preset"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        cfg = _set_path(cfg, key.split("."), raw, key)
    return cfg


def validate_required(cfg: Any, *, source: str = "config", prefix: str = "") -> None:
    """Raise ConfigError for the first field still holding REQUIRED."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            validate_required(value, source=source, prefix=key)
        elif isinstance(value, str) and value == REQUIRED:
            raise ConfigError(
                f"{source}: missing required value '{key}' (set it in the file or pass {key}=...)"
            )


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, for run directories and logs (holds no credentials)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def renamed_keys(schema: type) -> dict[str, str]:
    """`schema.RENAMED`: old dotted key -> new dotted key, both relative to `schema` ({} if none)."""
    return getattr(schema, "RENAMED", None) or {}


def replaced_keys(schema: type) -> dict[str, str]:
    """`schema.REPLACED`: old dotted key -> the key that took its place with another meaning or
    type, both relative to `schema` ({} if none). Migration drops the old value."""
    return getattr(schema, "REPLACED", None) or {}


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _renamed_error(source: str, old: str, new: str) -> ConfigError:
    return ConfigError(f"{source}: unknown key '{old}': it was renamed to '{new}'")


def _pop_path(data: dict[str, Any], parts: list[str]) -> Any:
    *parents, name = parts
    for p in parents:
        data = data.get(p) if isinstance(data, dict) else None
    return data.pop(name) if isinstance(data, dict) and name in data else None


def _has_path(data: Any, parts: list[str]) -> bool:
    for name in parts:
        if not isinstance(data, dict) or name not in data:
            return False
        data = data[name]
    return True


def _migrate(schema: type, data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """A copy of `data` with the value of each old key of `schema.RENAMED` at its new key, and
    without the keys of `schema.REPLACED`."""
    data = copy.deepcopy(data)
    for old in replaced_keys(schema):
        _pop_path(data, old.split("."))
    for old, new in renamed_keys(schema).items():
        *parents, name = old.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        value = node.pop(name)
        *parents, name = new.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{_join(prefix, p)}' must be a mapping")
        if name in node:
            raise ConfigError(
                f"{source}: both '{_join(prefix, old)}' and its new name "
                f"'{_join(prefix, new)}' are set"
            )
        node[name] = value
    return data


def _set_path(node: Any, parts: list[str], raw: str, key: str) -> Any:
    """Return a copy of `node` with the field at `parts` set from the override string `raw`."""
    rest = ".".join(parts)
    for old, new in {**renamed_keys(type(node)), **replaced_keys(type(node))}.items():
        if rest == old or rest.startswith(old + "."):
            done = key[: len(key) - len(rest)]
            raise _renamed_error("command line", key, done + new + rest[len(old) :])
    name = parts[0]
    if name == "preset" and len(parts) == 1 and has_presets(type(node)):
        return _from_preset(type(node), raw.strip(), "command line", key)
    fields = {f.name: f for f in dataclasses.fields(node) if f.init}
    if name not in fields:
        done = key[: len(key) - len(".".join(parts))].rstrip(".")
        raise ConfigError(
            f"command line: unknown key '{key}' ('{name}' is not one of "
            f"{', '.join(sorted(fields))}{' under ' + repr(done) if done else ''})"
        )
    hint = typing.get_type_hints(type(node))[name]
    current = getattr(node, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"command line: '{key}': '{name}' has no sub-keys")
        value = _set_path(current, parts[1:], raw, key)
    else:
        value = _coerce(hint, _parse_override(hint, raw), "command line", key)
    return dataclasses.replace(node, **{name: value})


def _parse_override(hint: Any, raw: str) -> Any:
    # A str field keeps the text verbatim ("001" stays "001"); other types parse as YAML.
    if hint is str:
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against the type `hint`; convert only losslessly (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{source}: '{key}' expects {_type_name(hint)}, got {value!r}") from (
            errors[0] if errors else None
        )

    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value

    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, source, f"{key}.{k}") for k, v in value.items()}

    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if value is None:
            raise ConfigError(f"{source}: '{key}' expects a mapping, got null")
        return from_dict(hint, value, source=source, prefix=key)

    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads "3e-4" (no dot) as a string; users mean a float
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{source}: '{key}' has an unsupported type {hint!r} in the schema")
    raise ConfigError(
        f"{source}: '{key}' expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
    )
