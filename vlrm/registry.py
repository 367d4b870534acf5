"""Extension points by import path, so that they work in every process of a cluster.

A user's reward, generation backend or data source is named in the config by where it lives:
``"my_pkg.rewards:factory"`` (an importable module) or ``"path/to/file.py:factory"`` (a file).
Each Ray actor resolves the name itself when it starts, so a plugin needs no registration call
in the driver: it is found wherever the config goes. Built-in entries are names mapped to such
paths (:func:`resolve`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping

__all__ = ["PluginError", "load_target", "resolve", "is_target"]


class PluginError(ValueError):
    """A plugin could not be found or loaded; the message names the config value."""


def is_target(spec: str) -> bool:
    """Whether ``spec`` has the ``module:attribute`` / ``file.py:attribute`` form."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith(("hf-hub:", "local-dir:"))


def _module_from_file(path: Path) -> Any:
    if not path.is_file():
        raise PluginError(f"plugin file not found: {path} (relative paths are taken from {Path.cwd()})")
    name = f"vlrm_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


def load_target(spec: str, what: str = "plugin") -> Any:
    """The object ``spec`` names: ``"pkg.module:attr"`` or ``"path/file.py:attr"`` (``attr`` may be dotted)."""
    if not is_target(spec):
        raise PluginError(f"{what} {spec!r} is not of the form 'pkg.module:name' or 'path/file.py:name'")
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py") or "/" in where:
            module = _module_from_file(Path(where))
        else:
            module = importlib.import_module(where)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"cannot import {what} {spec!r}: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what} {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve(name: str, builtins: Mapping[str, str], what: str) -> Any:
    """A built-in by name (``builtins`` maps names to targets) or a user's object by target."""
    if name in builtins:
        return load_target(builtins[name], what)
    if is_target(name):
        return load_target(name, what)
    raise PluginError(f"unknown {what} {name!r}: built in are {', '.join(sorted(builtins))}; "
                      "or give 'pkg.module:name' / 'path/file.py:name'")
