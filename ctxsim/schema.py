"""Typed reading of plain data (YAML settings, JSON records) against type annotations; a mismatch is one line.

``check(value, type_, name)`` returns ``value`` as ``type_`` (tuples from lists, floats from ints; with ``lenient``
also numbers from strings, since YAML 1.1 reads ``3e-4`` as a string) or raises ``error`` with one line naming the
setting, what it must be and what it was. Types understood: bool, int, float (finite), str, None, Any, Literal,
unions, list[T], tuple[T, ...], tuple[T1, T2], dict[K, V], TypedDicts (required keys checked, other keys kept) and
dataclasses (built from a mapping; unknown keys refused, missing required ones named).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from ctxsim.errors import ConfigError, CtxsimError

__all__ = ["check", "check_fields", "describe"]

_NONE = type(None)


class _Mismatch(Exception):
    """Internal: one line describing the first mismatch found."""


def check(value: Any, type_: Any, name: str, *, lenient: bool = False,
          error: Callable[[str], CtxsimError] = ConfigError, where: str = "", hint: str = "") -> Any:
    """``value`` checked (and converted) against ``type_``, or ``error("<where>: <name> must be ...; <hint>")``."""
    try:
        return _check(value, type_, name, lenient)
    except _Mismatch as e:
        raise error(f"{where + ': ' if where else ''}{e}{'; ' + hint if hint else ''}") from None


def check_fields(cls: type, data: Mapping[str, Any], *, lenient: bool = False,
                 error: Callable[[str], CtxsimError] = ConfigError, where: str = "", hint: str = "",
                 prefix: str = "") -> dict[str, Any]:
    """The entries of ``data`` that name fields of dataclass or TypedDict ``cls``, each checked against its field's
    type (unknown keys are left out, not refused: readers of files written by newer versions keep working)."""
    hints = _hints(cls)
    return {k: check(v, hints[k], prefix + k, lenient=lenient, error=error, where=where, hint=hint)
            for k, v in data.items() if k in hints}


def describe(type_: Any) -> str:
    """Plain words for a type: 'an integer', 'a list of numbers', 'one of 'adam', 'adamw''."""
    origin, args = get_origin(type_), get_args(type_)
    if type_ is Any:
        return "anything"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not _NONE]
        return " or ".join(parts) + (" or null" if _NONE in args else "")
    if origin in (list, tuple) or type_ in (list, tuple):
        item = args[0] if args else Any
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return f"a list of {len(args)} values" if fixed else f"a list of {_plural(describe(item))}"
    if origin is dict or type_ is dict:
        return "a mapping"
    if dataclasses.is_dataclass(type_) or _is_typeddict(type_):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            _NONE: "null"}.get(type_, getattr(type_, "__name__", str(type_)))


# ---------------------------------------------------------------------------------------------- internals
def _plural(words: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings", "a mapping": "mappings",
            "true or false": "booleans"}.get(words, words)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_typeddict(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, dict) and hasattr(type_, "__required_keys__")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # resolving string annotations costs ~0.1 ms a class; Preprocess is read on every served batch
    return typing.get_type_hints(cls)


def _fail(name: str, type_: Any, value: Any) -> _Mismatch:
    return _Mismatch(f"{name} must be {describe(type_)}, got {_show(value)}")


def _check(v: Any, tp: Any, name: str, lenient: bool) -> Any:  # one branch per kind of type
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return v
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise _fail(name, tp, v)
    if origin in (Union, types.UnionType):
        if v is None:
            if _NONE in args:
                return None
            raise _fail(name, tp, v)
        for arm in args:
            if arm is not _NONE:
                try:
                    return _check(v, arm, name, lenient)
                except _Mismatch:
                    continue
        raise _fail(name, tp, v)
    if tp is _NONE:
        if v is None:
            return None
        raise _fail(name, tp, v)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _fail(name, tp, v)
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if lenient and isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise _fail(name, tp, v)
    if tp is float:
        number: float | None = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            number = float(v)
        elif lenient and isinstance(v, str):
            with contextlib.suppress(ValueError):
                number = float(v.strip())
        if number is None:
            raise _fail(name, tp, v)
        if not math.isfinite(number):
            raise _Mismatch(f"{name} must be a finite number, got {_show(v)}")
        return number
    if tp is str:
        if isinstance(v, str):
            return v
        raise _fail(name, tp, v)
    if origin is list or tp is list:
        if not isinstance(v, (list, tuple)):
            raise _fail(name, tp, v)
        item = args[0] if args else Any
        return [_check(x, item, f"{name}[{i}]", lenient) for i, x in enumerate(v)]
    if origin is tuple or tp is tuple:
        if not isinstance(v, (list, tuple)):
            raise _fail(name, tp, v)
        if not args or args[-1] is Ellipsis:
            item = args[0] if args else Any
            return tuple(_check(x, item, f"{name}[{i}]", lenient) for i, x in enumerate(v))
        if len(v) != len(args):
            raise _fail(name, tp, v)
        return tuple(_check(x, a, f"{name}[{i}]", lenient) for i, (x, a) in enumerate(zip(v, args)))
    if origin is dict or tp is dict:
        if not isinstance(v, Mapping):
            raise _fail(name, tp, v)
        kt, vt = args if args else (Any, Any)
        return {_check(k, kt, f"{name} key", lenient): _check(x, vt, f"{name}.{k}", lenient) for k, x in v.items()}
    if _is_typeddict(tp):
        if not isinstance(v, Mapping):
            raise _fail(name, tp, v)
        hints = _hints(tp)
        missing = [k for k in sorted(tp.__required_keys__) if k not in v]
        if missing:
            raise _Mismatch(f"{name} lacks {missing[0]!r}")
        return {**v, **{k: _check(x, hints[k], f"{name}.{k}", lenient) for k, x in v.items() if k in hints}}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(v, tp):
            return v
        if not isinstance(v, Mapping):
            raise _fail(name, tp, v)
        known = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise _Mismatch(f"unknown setting {name}.{unknown[0]}; known: {', '.join(sorted(known))}")
        missing = [n for n, f in known.items() if n not in v and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise _Mismatch(f"{name} lacks {missing[0]!r}")
        hints = _hints(tp)
        return tp(**{k: _check(x, hints[k], f"{name}.{k}", lenient) for k, x in v.items()})
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _fail(name, tp, v)
    raise TypeError(f"ctxsim.schema cannot check {tp!r}")  # pragma: no cover - a programming error, not input
