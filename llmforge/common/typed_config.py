"""Typed configuration machinery: dataclasses loaded from YAML, overridden by dotted ``key=value`` arguments.

Shared by the trainer's schema (llmforge/core/config.py) and the data pipeline's (data_pipeline/config.py).
``load_config(Cls, path, overrides)`` returns a validated instance; every problem raises :class:`ConfigError`
with one line naming the key (and the closest valid keys for typos). ``dump_config`` writes the resolved config
atomically; ``describe``, ``key_ranges`` and ``markdown_keys`` document a schema.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Union

import yaml

from llmforge.common.ranges import Range, range_errors


class ConfigError(ValueError):
    """A configuration problem; its message is meant to be printed as one line without a traceback."""


def opt(default, doc: str, *, ge=None, gt=None, le=None, lt=None, also: tuple = (), allow_inf: bool = False):
    """A dataclass field with a default and a one-line doc (shown by ``describe`` and in the README).

    Numeric keys declare their range here (``ge``/``gt`` lower, ``le``/``lt`` upper bound, ``also`` sentinel
    values such as -1 = auto); ``check_ranges`` enforces it for every config built from YAML or overrides."""
    meta: dict = {"doc": doc}
    if (ge, gt, le, lt) != (None,) * 4 or also:
        if ge is not None and gt is not None or le is not None and lt is not None:
            raise TypeError("opt: give at most one lower (ge/gt) and one upper (le/lt) bound")
        meta["range"] = Range(ge if gt is None else gt, gt is not None, le if lt is None else lt, lt is not None,
                              tuple(also), allow_inf)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_scalar(text: str):
    """Parse an override value with YAML rules (``[a,b]`` lists, numbers, true/false, null)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _coerce(key: str, value, tp):
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming the key on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path/number is accepted where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, raw: dict, prefix: str = ""):
    types_ = _field_types(cls)
    for k in raw:
        if k not in types_:
            raise _unknown(prefix + str(k), [prefix + n for n in types_])
    kwargs = {k: _coerce(prefix + k, v, types_[k]) for k, v in raw.items()}
    try:
        cfg = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    check_ranges(cfg, prefix)  # here, not in load_config: every builder of a config from user input gets it
    return cfg


def check_ranges(cfg, prefix: str = "") -> None:
    """Raise ConfigError for the first value of ``cfg`` (nested sections included) outside its declared range."""
    for message in range_errors(cfg, prefix):
        raise ConfigError(message)


def _set_dotted(tree: dict, key: str, value, cls) -> None:
    """Set ``a.b.c=value`` in a nested dict, checking every segment against the dataclass ``cls``."""
    parts = key.split(".")
    node, tp = tree, cls
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        fields = _field_types(tp) if _is_dataclass_type(tp) else None
        if fields is not None and part not in fields:
            raise _unknown(path, [".".join(parts[:i] + [n]) for n in fields])
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_tp = fields[part] if fields is not None else Any
        open_map = sub_tp is dict or sub_tp is Any or typing.get_origin(sub_tp) is dict  # e.g. deepspeed.a.b=1
        if not _is_dataclass_type(sub_tp) and not open_map:
            raise ConfigError(f"config key '{path}' is a value, not a section (cannot set '{key}')")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{path}' is a value, not a section (cannot set '{key}')")
        tp = sub_tp if _is_dataclass_type(sub_tp) else Any


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    out = []
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"override '{a}' is not of the form key=value (e.g. train.steps=20)")
        k, v = a.split("=", 1)
        out.append((k.strip(), _parse_scalar(v)))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys silently (``lr`` twice: one is ignored); refuse instead."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """Load ``cls`` from a YAML file and dotted overrides; validate; return the instance."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v, cls)
    cfg = _build(cls, raw)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML, atomically (temp name + rename)."""
    from llmforge.common.atomic import write_text
    resolved = cfg.resolved_dict() if hasattr(cfg, "resolved_dict") else to_dict(cfg)
    write_text(path, yaml.safe_dump(resolved, sort_keys=False))


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, used to document config keys in the README/CLI."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((prefix + f.name, getattr(tp, "__name__", str(tp)), default, f.metadata.get("doc", "")))
    return rows


def key_ranges(cls, prefix: str = "") -> dict[str, Range]:
    """{dotted key: declared Range} for every key of ``cls`` that has one (numeric keys)."""
    out: dict[str, Range] = {}
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            out.update(key_ranges(tp, prefix + f.name + "."))
        elif "range" in f.metadata:
            out[prefix + f.name] = f.metadata["range"]
    return out


def markdown_keys(cls) -> str:
    """A markdown table of every key, its default, range and doc (pasted into the README; a test keeps them in
    sync)."""
    ranges = key_ranges(cls)
    lines = ["| key | default | range | meaning |", "|---|---|---|---|"]
    for key, _, default, doc in describe(cls):
        rng = f"{ranges[key]}" if key in ranges else ""
        lines.append(f"| `{key}` | `{default!r}` | {rng} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
