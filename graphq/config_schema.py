"""Strict type and range checks for QuantConfig, derived from its dataclass field annotations.

Values come from YAML as well as from the command line, and YAML happily hands over ``"no"`` for a boolean or
``[w4a16]`` for a string; Python would then treat a non-empty string as true. Every field is therefore checked
against its annotation before anything else reads it: a new field is covered as soon as it is annotated. The few
range rules that are not about one option's meaning (counts, finite numbers) are in ``RANGES``; the option-specific
rules (known schemes, power-of-two group sizes, ...) stay in ``QuantConfig.validate``.

Conversions are only the lossless, unambiguous ones: an int where a float is expected, a single string where a
list of strings is expected (``exclude: down_proj``), and a comma list for ``save_format`` (the command line's form).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable

from graphq.errors import GraphqError

#: Fields whose string form is a comma-separated list (the command line's ``--save-format onnx,safetensors``).
COMMA_LISTS = ("save_format",)

#: field -> (rule, what the rule asks for). Checked after the type, so each rule sees a value of the right type.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "seq_len": (lambda v: v >= 2, "an integer >= 2"),
    "act_fallback": (lambda v: v >= 0, "an integer >= 0"),
    "reservoir_rows": (lambda v: v >= 16, "an integer >= 16"),
    "damp": (lambda v: 0 < v < 1, "a number between 0 and 1"),
    "percentile": (lambda v: 50 < v <= 100, "a number in (50, 100]"),
    "part_file_size": (lambda v: v > 0, "a positive, finite number of GB"),
}


class _Mismatch(Exception):
    """The value does not have the annotated type; the message says what was expected."""


def _bare(description: str) -> str:
    """'an integer' -> 'integer', to name the items of a list or mapping."""
    return description.removeprefix("an ").removeprefix("a ")


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe(a) for a in options)
        return text + (" or null" if len(options) < len(typing.get_args(annotation)) else "")
    if origin is list:
        return f"a list of {_bare(_describe(typing.get_args(annotation)[0]))}s"
    if origin is dict:
        key, value = (_bare(_describe(a)) for a in typing.get_args(annotation))
        return f"a mapping of {key} to {value}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as the annotated type, or _Mismatch. bool is never an int here, and a string is never a bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        failures = []
        for option in options:
            try:
                return _convert(value, option, name)
            except _Mismatch as exc:
                failures.append(exc)
        # One real option (Optional[X]): its own reason ("a finite number") says more than the union's description.
        raise failures[0] if len(options) == 1 else _Mismatch(_describe(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str) and item is str:
            value = [p.strip() for p in value.split(",") if p.strip()] if name in COMMA_LISTS else [value]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(annotation))
        try:
            return [_convert(v, item, name) for v in value]
        except _Mismatch:
            raise _Mismatch(_describe(annotation)) from None
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise _Mismatch(_describe(annotation))
        try:
            return {_convert(k, key_type, name): _convert(v, value_type, name) for k, v in value.items()}
        except _Mismatch:
            raise _Mismatch(_describe(annotation)) from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise _Mismatch(_describe(bool))
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch(_describe(int))
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch(_describe(float))
        if not math.isfinite(value):
            raise _Mismatch("a finite number")
        return float(value) if isinstance(value, int) else value
    if annotation is str:
        if not isinstance(value, str):
            raise _Mismatch(_describe(str))
        return value
    if annotation is Any:
        return value
    raise TypeError(f"config_schema cannot check the annotation {annotation!r} of {name}: teach _convert about it")


def check_config(config: Any) -> None:
    """Check every field of a dataclass instance against its annotation and ``RANGES``, converting in place.

    Raises GraphqError naming the first bad key, what it must be and what it was.
    """
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        try:
            converted = _convert(value, hints[spec.name], spec.name)
        except _Mismatch as exc:
            raise GraphqError(f"config key '{spec.name}' must be {exc}, got {value!r}: fix the YAML file or the option") from None
        rule = RANGES.get(spec.name)
        if rule is not None and converted is not None and not rule[0](converted):
            flag = "--" + spec.name.replace("_", "-")
            raise GraphqError(f"{flag} (config key '{spec.name}') must be {rule[1]}, got {value!r}")
        setattr(config, spec.name, converted)
