"""The config tree's documentation and text forms: each field's description (its ``Annotated``
text), type names, the ``--help`` listing and the commented YAML a run writes."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vlrm.config_schema import RunConfig

__all__ = ["field_docs", "format_help", "dump_yaml", "save_config", "type_name", "hints", "bare"]


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def bare(tp: Any) -> Any:
    """The type without its ``Annotated`` documentation."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its one-line description}`` of a config dataclass."""
    out = {}
    for name, tp in hints(cls).items():
        meta = getattr(tp, "__metadata__", ())
        out[name] = next((m for m in meta if isinstance(m, str)), "")
    return out


def type_name(tp: Any) -> str:
    tp = bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _inline(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
    return text[: -len("\n...\n")].strip() if text.endswith("\n...\n") else text.strip()


def format_help(prog: str = "vlrm train") -> str:
    """Usage text listing every dotted key with its type, default and description."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--resume RUN] [--section.key=VALUE | --section.key VALUE ...]", "",
             "Values are YAML: numbers, true/false, null, [a, b], {k: v}. Later sources win: defaults < --config "
             "file < overrides."]

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp, v = bare(hints(cls)[f.name]), getattr(obj, f.name, None)
            if dataclasses.is_dataclass(tp):
                lines.extend(["", f"{prefix}{f.name}: {docs[f.name]}"])
                walk(tp, v, f"{prefix}{f.name}.")
            elif f.name == "components":
                lines.append(f"  --{prefix}components.NAME.* : {docs[f.name]}")
                for name, comp in v.items():
                    walk(type(comp), comp, f"{prefix}components.{name}.")
            else:
                default = "required" if v is None and f.default is dataclasses.MISSING and \
                    f.default_factory is dataclasses.MISSING else f"default {_inline(v)}"
                lines.append(f"  --{prefix}{f.name} ({type_name(tp)}, {default})")
                lines.append(f"        {docs[f.name]}")

    walk(RunConfig, RunConfig(), "")
    lines += ["", "  --reward.components.NAME.target 'pkg.module:factory' (or 'file.py:factory') adds a reward of "
              "your own; its other keys are the factory's keyword arguments."]
    return "\n".join(lines)


def dump_yaml(cfg: Any, comments: bool = True) -> str:
    """The config as YAML text: sections as blocks, one key per line, each with its description."""
    out: list[str] = []

    def walk(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj)) if comments else {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            doc = f"  # {docs[f.name]}" if docs.get(f.name) else ""
            if dataclasses.is_dataclass(v):
                out.append(f"{indent}{f.name}:{doc}")
                walk(v, indent + "  ")
            elif f.name == "components" and isinstance(v, dict):
                out.append(f"{indent}{f.name}:{doc}")
                for name, comp in v.items():
                    out.append(f"{indent}  {name}:")
                    walk(comp, indent + "    ")
            else:
                out.append(f"{indent}{f.name}: {_inline(v)}{doc}")

    walk(cfg, "")
    return "\n".join(out) + "\n"


def save_config(cfg: Any, path: str | Path, comments: bool = True) -> Path:
    """Write the config as YAML (``load_config(path)`` reads it back equal); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dump_yaml(cfg, comments=comments), encoding="utf-8")
    return p
