"""Run configuration: read defaults, a YAML file and command-line overrides into the typed tree of
:mod:`vlrm.config_schema`, validated by pydantic.

Sources, applied in order: the defaults; a YAML file (``--config file.yaml``) with any subset of
keys; dotted command-line overrides (``--rollout.num_actors=3``, ``--rollout.num_actors 3``,
``rollout.num_actors=3``, a bare ``--flag`` for a true bool). Values are YAML scalars or flow
collections (``[a, b]``, ``{k: v}``, ``null``), except ``str`` fields, which take the text as it
is. Mappings merge key by key.

Errors raise :class:`ConfigError` naming the full dotted key, where it came from (file and line,
or the argument), what was expected and the closest valid key. ``save_config`` writes the
resolved tree back as commented YAML and ``load_config`` reads it back equal.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import time
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import TypeAdapter, ValidationError

from vlrm.config_schema import *  # noqa: F403 - the tree is part of this module's API
from vlrm.config_schema import BUILTIN_COMPONENTS, ConfigError, PluginComponent, RunConfig, validate
from vlrm.config_schema import __all__ as _TREE
from vlrm.config_docs import bare as _bare, dump_yaml, field_docs, format_help, hints as _hints, save_config
from vlrm.config_docs import type_name as _type_name

__all__ = list(_TREE) + ["load_config", "parse_cli", "split_cli", "from_dict", "to_dict", "to_flat_dict",
                         "save_config", "dump_yaml", "resolve", "format_help", "field_docs", "peel_option"]

_FLAG = object()  # a bare --key on the command line


# --------------------------------------------------------------------------------------
# The tree's types and documentation
# --------------------------------------------------------------------------------------


def _field_type(path: Sequence[str]) -> Any:
    """The (bare) type at a dotted path: None where the path names no field, ``Any`` inside a free
    mapping (a user's reward component takes any option)."""
    cls: Any = RunConfig
    for i, part in enumerate(path):
        if tuple(path[:i]) == ("reward", "components"):
            cls = BUILTIN_COMPONENTS.get(part, PluginComponent)
        elif not dataclasses.is_dataclass(cls):
            return Any
        else:
            tp = _hints(cls).get(part)
            if tp is None:
                return Any if cls is PluginComponent else None
            cls = _bare(tp)
    return cls


def _valid_keys(prefix: tuple[str, ...]) -> list[str]:
    cls = _field_type(prefix) if prefix else RunConfig
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _all_dotted(cls: type = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = _bare(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            out += _all_dotted(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    if cls is RunConfig:
        for name, comp in BUILTIN_COMPONENTS.items():
            out += _all_dotted(comp, f"reward.components.{name}.")
    return out


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


class _Sources:
    """Where each dotted key's value came from, for error messages."""

    def __init__(self) -> None:
        self.where: dict[tuple[str, ...], str] = {}

    def of(self, path: Sequence[str]) -> str:
        path = tuple(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.where:
                return self.where[path[:n]]
        deeper = [w for k, w in self.where.items() if k[:len(path)] == path]
        return deeper[0] if deeper else "the defaults"


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """``{key path: line number}`` of every mapping key in a YAML document."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                p = prefix + (str(knode.value),)
                lines[p] = knode.start_mark.line + 1
                walk(vnode, p)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _read_yaml(path: str | Path, sources: _Sources) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}", source=str(path))
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"could not parse YAML config {str(path)!r}: {e}", source=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys at the top level, got "
                          f"{type(data).__name__}", source=str(path))
    for key, line in _yaml_lines(text).items():
        sources.where[key] = f"config file {str(path)!r}, line {line}"
    return data


def _parse_override(item: str, sources: _Sources) -> dict:
    """One ``key=value`` / ``key`` override as a nested mapping."""
    item = item[2:] if item.startswith("--") else item
    key, sep, text = item.partition("=")
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"malformed override {item!r}: expected section.key=value", source="command line")
    sources.where[tuple(path)] = f"command-line argument {'--' + item!r}"
    tp = _field_type(path)
    if not sep:
        value: Any = True if tp is bool else _FLAG
    elif tp is str or (tp == typing.Optional[str] and text.strip() != "null"):
        value = text
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if typing.get_origin(tp) is list and isinstance(value, str):  # --key=a,b for a list
            value = [v.strip() for v in value.split(",") if v.strip()]
    if value is _FLAG:
        raise ConfigError(f"'{key}' needs a value ({_type_name(tp) if tp else 'unknown key'}): --{key}=VALUE",
                          key=key, source="command line")
    for part in reversed(path):
        value = {part: value}
    return value


def _merge(base: dict, extra: Mapping) -> dict:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v) if isinstance(v, (dict, list)) else v
    return base


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _unknown_key(path: tuple[str, ...], sources: _Sources) -> ConfigError:
    key = ".".join(path)
    valid = _valid_keys(path[:-1])
    near = difflib.get_close_matches(path[-1], valid, n=3, cutoff=0.5)
    if not near:  # a key in the wrong section: look through every dotted key
        near = difflib.get_close_matches(key, _all_dotted(), n=3, cutoff=0.6) or [
            k for k in _all_dotted() if k.endswith("." + path[-1])][:3]
    else:
        near = [".".join(path[:-1] + (n,)) for n in near]
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return ConfigError(f"unknown config key '{key}' (from {sources.of(path)}){hint}", key=key,
                       source=sources.of(path))


def _check_keys(data: Mapping, prefix: tuple[str, ...], sources: _Sources) -> None:
    """Every key names a field (plugin reward components take any option)."""
    if prefix[:2] == ("reward", "components") and len(prefix) == 3 and prefix[2] not in BUILTIN_COMPONENTS:
        return
    valid = _valid_keys(prefix)
    for k, v in data.items():
        path = prefix + (str(k),)
        if path[:2] == ("reward", "components") and len(path) == 3:
            if not isinstance(v, Mapping):
                raise ConfigError(f"'{'.'.join(path)}' (from {sources.of(path)}) must be a mapping such as "
                                  "{weight: 1.0}", key=".".join(path), source=sources.of(path))
            _check_keys(v, path, sources)
            continue
        if str(k) not in valid:
            raise _unknown_key(path, sources)
        if isinstance(v, Mapping) and dataclasses.is_dataclass(_field_type(path)):
            _check_keys(v, path, sources)


def _convert(e: ValidationError, prefix: tuple[str, ...], sources: _Sources) -> ConfigError:
    err = e.errors()[0]
    path = prefix + tuple(str(p) for p in err["loc"])
    key = ".".join(path)
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown_key(path, sources)
    tp = _field_type(list(path))
    expected = f"expected {_type_name(tp)}, " if tp not in (None, Any) else ""
    value = err.get("input")
    if err["type"] == "missing_argument" or err["type"] == "missing":
        return ConfigError(f"'{key}' is required (from {sources.of(path)})", key=key, source=sources.of(path))
    return ConfigError(f"invalid value for '{key}' (from {sources.of(path)}): {expected}got {value!r}: {err['msg']}",
                       key=key, source=sources.of(path))


def _component(name: str, raw: Mapping, sources: _Sources) -> Any:
    cls = BUILTIN_COMPONENTS.get(name)
    path = ("reward", "components", name)
    data = dict(raw)
    if cls is None:
        if "target" not in data:
            raise ConfigError(f"reward component '{name}' (from {sources.of(path)}) is not built in "
                              f"({', '.join(BUILTIN_COMPONENTS)}): give it a target, e.g. "
                              f"{{target: 'my_pkg.rewards:factory', weight: 1.0}}", key=".".join(path),
                              source=sources.of(path))
        inline = {k: data.pop(k) for k in list(data) if k not in ("target", "weight", "options")}
        data["options"] = {**dict(data.get("options") or {}), **inline}
        cls = PluginComponent
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        raise _convert(e, path, sources) from None


def _drop_empty_sections(data: dict, cls: type) -> dict:
    """``section:`` with nothing under it (YAML's null) means the section's defaults."""
    hints = _hints(cls)
    for k in list(data):
        tp = _bare(hints.get(k, Any))
        if dataclasses.is_dataclass(tp):
            if data[k] is None:
                del data[k]
            elif isinstance(data[k], dict):
                _drop_empty_sections(data[k], tp)
    return data


def _build(data: Mapping, sources: _Sources) -> RunConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(data).__name__}")
    _check_keys(data, (), sources)
    data = _drop_empty_sections(copy.deepcopy(dict(data)), RunConfig)
    reward = data.get("reward")
    comps_raw = {name: dataclasses.asdict(cls()) for name, cls in BUILTIN_COMPONENTS.items()}
    if isinstance(reward, dict) and "components" in reward:
        user = reward.pop("components") or {}
        if not isinstance(user, Mapping):
            raise ConfigError(f"'reward.components' (from {sources.of(('reward', 'components'))}) must be a mapping")
        for name, block in user.items():
            if block is None:  # `name: null` removes a component
                comps_raw.pop(name, None)
            else:
                _merge(comps_raw.setdefault(name, {}), block)
    try:
        cfg = _adapter(RunConfig).validate_python(data)
    except ValidationError as e:
        raise _convert(e, (), sources) from None
    cfg.reward.components = {name: _component(name, block, sources) for name, block in comps_raw.items()}
    return cfg


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def from_dict(d: Mapping[str, Any] | None, source: str = "config dict") -> RunConfig:
    """A RunConfig from a (possibly partial) nested mapping, strictly validated."""
    sources = _Sources()
    sources.where[()] = source
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source} must be a mapping, got {type(d).__name__}", source=source)
    for k in d:
        sources.where[(str(k),)] = source
    return _build(d, sources)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists/scalars (YAML, JSON and msgpack safe)."""
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{'rollout.num_actors': 2, ...}``: one entry per leaf field (dicts stay values)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            elif f.name == "components":
                out.update({f"{prefix}components.{k}": dataclasses.asdict(c) for k, c in v.items()})
            else:
                out[prefix + f.name] = v

    walk(cfg, "")
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, check: bool = True) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``'rollout.num_actors=3'``);
    with ``check``, the range and cross-field checks of :func:`vlrm.config_schema.validate` too."""
    if isinstance(overrides, str):
        overrides = [overrides]
    sources = _Sources()
    data: dict = _read_yaml(path, sources) if path is not None else {}
    for item in overrides:
        _merge(data, _parse_override(item, sources))
    cfg = _build(data, sources)
    return validate(cfg) if check else cfg


def peel_option(argv: Sequence[str], name: str, example: str) -> tuple[str | None, list[str]]:
    """``(value of --name or None, the other arguments)``: ``--name VALUE`` or ``--name=VALUE``, once."""
    flag, rest, value = f"--{name}", [], None
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == flag or a.startswith(flag + "="):
            if a == flag:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{flag} needs a value: {flag} {example}", source="command line")
                val = argv[i + 1]
                i += 1
            else:
                val = a.split("=", 1)[1]
            if value is not None:
                raise ConfigError(f"{flag} given twice ({value!r} and {val!r})", source="command line")
            value = val
        else:
            rest.append(a)
        i += 1
    return value, rest


def split_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split argv into (``--config`` path, overrides as ``'key=value'`` / ``'key'`` strings)."""
    config, argv = peel_option(argv, "config", "configs/shapes.yaml")
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            body = a[2:]
            if "=" in body:
                overrides.append(body)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(body)
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(f"unexpected command-line argument {a!r}: use --config FILE and overrides like "
                              "--rollout.num_actors=3", source="command line")
        i += 1
    return config, overrides


def parse_cli(argv: Sequence[str] | None = None, *, check: bool = True) -> RunConfig:
    """A RunConfig from command-line arguments (``sys.argv[1:]`` by default); ``-h`` prints every key."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        raise SystemExit(0)
    path, overrides = split_cli(argv)
    return load_config(path, overrides, check=check)


def resolve(cfg: RunConfig, now: float | None = None) -> RunConfig:
    """A copy with run-time defaults filled in: ``run_name`` (timestamp) and ``learner.value_lr`` (lr)."""
    out = from_dict(to_dict(cfg))
    if out.run_name is None:
        out.run_name = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    if out.learner.value_lr is None:
        out.learner.value_lr = out.learner.lr
    return out
