"""Typed job configuration: nested dataclasses, loaded from YAML, overridden by `key.sub=value`.

One module serves every `t2i` command. A job's schema is a dataclass tree; `load_config` builds it
from a YAML file (values only, no import strings) plus command-line overrides, and every problem —
an unknown key, a value of the wrong type, a required value left unset — raises `ConfigError`
naming the dotted key and where the value came from (the file or the command line).

Across a Ray boundary pass `dataclasses.asdict(cfg)` and rebuild with `from_dict(Schema, d)` on the
first line of the worker function; workers never read module globals.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

# Sentinel for values a job cannot default (an output path, say). `validate_required` reports them.
REQUIRED: Any = "???"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the source."""


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    """Where `s3://` paths live. Credentials are never configured here: they come from the
    environment / boto3 credential chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles)."""

    endpoint_url: str | None = None  # S3-compatible endpoint; default: $AWS_ENDPOINT_URL or AWS
    region: str | None = None  # default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1


@dataclass
class RayConfig:
    """How a command reaches Ray: in-process local instance by default."""

    address: str | None = None  # None: $RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = None  # local instance only; None: all cores
    dashboard: bool = True  # local instance only; bound to 127.0.0.1


# --------------------------------------------------------------------------------------------
# Job schemas
# --------------------------------------------------------------------------------------------


@dataclass
class DigitsConfig:
    """`t2i data digits`: scikit-learn's bundled handwritten digits as WebDataset shards."""

    out: str = REQUIRED  # output directory or s3://bucket/prefix
    image_size: int = 32  # 8x8 digits are upscaled (bilinear) to image_size x image_size
    val_fraction: float = 0.1  # deterministic held-out split
    samples_per_shard: int = 256
    mismatch_fraction: float = 0.0  # fraction of captions swapped to a wrong digit (recorded)
    seed: int = 0
    photos: int = 64  # real photo crops (scikit-image samples) for tokenizer checks; 0: none
    photo_size: int = 64  # side of each photo crop
    storage: StorageConfig = field(default_factory=StorageConfig)


# --------------------------------------------------------------------------------------------
# Loading machinery
# --------------------------------------------------------------------------------------------


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    require: bool = True,
) -> T:
    """Build `schema` from an optional YAML file, then apply dotted `key=value` overrides.

    Raises ConfigError naming the key and the file (or "command line") for unknown keys, wrong
    types, malformed overrides, and (with `require`) required values left unset.
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
    cfg = from_dict(schema, data, source=source)
    cfg = apply_overrides(cfg, overrides)
    if require:
        validate_required(cfg, source=source)
    return cfg


def from_dict(
    schema: type[T], data: dict[str, Any], *, source: str = "dict", prefix: str = ""
) -> T:
    """Rebuild a dataclass tree from plain data (YAML or `asdict` output), checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}"
        )
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
    """Apply `a.b.c=value` strings; values parse as YAML scalars/lists ("3", "true", "[1,2]")."""
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


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_path(node: Any, parts: list[str], raw: str, key: str) -> Any:
    """Return a copy of `node` with the field at `parts` set from the override string `raw`."""
    name = parts[0]
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
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{source}: '{key}' has an unsupported type {hint!r} in the schema")
    raise ConfigError(
        f"{source}: '{key}' expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
    )
