"""Layered YAML configuration: base -> profile -> experiment overlays -> `--set` overrides, checked
against typed dataclass schemas at load time.

Every key remembers the file (or `--set`) it came from, so an unknown or mistyped key fails with the
key's full path, its file, and the closest valid key. The loader knows nothing about our stages:
it turns a nested dict into any dataclass tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
SET_SOURCE = "--set"


class ConfigError(ValueError):
    """A configuration mistake, raised at load time with the key, where it came from and the fix."""


@dataclasses.dataclass
class LayeredDict:
    """A merged nested dict plus, for every dotted key, the layer that last set it."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def merge(self, overlay: Mapping[str, Any], source: str) -> None:
        _merge_into(self.values, overlay, source, self.sources, prefix="")

    def source_of(self, dotted_key: str) -> str:
        while dotted_key:
            if dotted_key in self.sources:
                return self.sources[dotted_key]
            dotted_key = dotted_key.rpartition(".")[0]
        return "defaults"


def _merge_into(
    base: dict[str, Any], overlay: Mapping[str, Any], source: str, sources: dict[str, str], prefix: str
) -> None:
    for key, value in overlay.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} under '{prefix or '<top>'}' must be a string")
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge_into(base[key], value, source, sources, prefix=f"{dotted}.")
        else:
            base[key] = _plain_copy(value)
            sources[dotted] = source
            _mark_children(value, dotted, source, sources)


def _mark_children(value: Any, dotted: str, source: str, sources: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, child in value.items():
            sources[f"{dotted}.{key}"] = source
            _mark_children(child, f"{dotted}.{key}", source, sources)


def _plain_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one config layer; an empty file is an empty layer."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    dotted, sep, raw = text.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. data.basic_filters.min_short_side=128)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def build(schema: type[T], layered: LayeredDict) -> T:
    """Turn the merged dict into `schema`, failing on the first unknown or mistyped key."""
    return _build_dataclass(schema, layered.values, "", layered)


def _build_dataclass(schema: type[T], data: Any, prefix: str, layered: LayeredDict) -> T:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "<top>"
        raise ConfigError(
            f"{layered.source_of(where)}: '{where}' must be a mapping of {schema.__name__} fields, "
            f"got {type(data).__name__} {data!r}"
        )
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(
                f"{layered.source_of(dotted)}: unknown config key '{dotted}'{hint} "
                f"(valid keys under '{prefix.rstrip('.') or '<top>'}': {valid})"
            )
    kwargs = {
        name: _coerce(hints[name], data[name], f"{prefix}{name}", layered) for name in fields if name in data
    }
    try:
        return schema(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        where = prefix.rstrip(".") or "<top>"
        raise ConfigError(f"{layered.source_of(where)}: invalid value under '{where}': {error}") from error


def _coerce(hint: Any, value: Any, dotted: str, layered: LayeredDict) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, dotted, layered)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{layered.source_of(dotted)}: '{dotted}' = {value!r} "
                          f"matches none of {_type_name(hint)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{layered.source_of(dotted)}: '{dotted}' = {value!r} is not one of {list(allowed)}{hint_text}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, f"{dotted}.", layered)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list):
            raise _type_error(dotted, value, "a list", layered)
        (item_hint, *_) = get_args(hint) or (Any,)
        items = [_coerce(item_hint, item, f"{dotted}[{i}]", layered) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(dotted, value, "a mapping", layered)
        _, value_hint = get_args(hint) or (str, Any)
        return {str(k): _coerce(value_hint, v, f"{dotted}.{k}", layered) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(dotted, value, "true or false", layered)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(dotted, value, "an integer", layered)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(dotted, value, "a number", layered)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(dotted, value, "a string (quote it in YAML)", layered)
        return value
    raise ConfigError(f"'{dotted}': the schema uses unsupported type {hint!r}")


def _type_error(dotted: str, value: Any, expected: str, layered: LayeredDict) -> ConfigError:
    return ConfigError(
        f"{layered.source_of(dotted)}: '{dotted}' must be {expected}, got {type(value).__name__} {value!r}"
    )


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in get_args(hint))


def to_dict(config: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML dumps, MLflow params and cache keys)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    return config


def select(config: Any, dotted: str) -> Any:
    """`select(cfg, "data.basic_filters")` -> that sub-config."""
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept whole (as their YAML text)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


__all__ = [
    "ConfigError",
    "LayeredDict",
    "build",
    "dump_yaml",
    "flatten",
    "parse_override",
    "read_yaml",
    "select",
    "to_dict",
]
