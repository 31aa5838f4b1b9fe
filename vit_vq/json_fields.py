"""JSON from someone else's file: size, nesting, number and type checks before any value is used.

`config.json` and the metadata of codes files both come through here. Every failure is a
`ValueError` that names the source (the file) and the key, so a hostile value never escapes as
a `TypeError`, a `RecursionError` or Python's "Exceeds the limit (4300 digits)" error.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # vit_vq's own JSON nests at most 3 deep
MAX_INT_DIGITS = 19  # every integer vit_vq stores fits in int64
MAX_SHOWN = 80  # characters of a bad value quoted in a message


def shown(value: Any) -> str:
    """A value as quoted in a message: its repr, cut to `MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


def _where(source: str, key: str | None) -> str:
    """`<source> '<key>'`: e.g. `c.safetensors: codes metadata field 'names'`."""
    return source if key is None else f"{source} {key!r}"


def _nesting(text: str) -> int:
    """The deepest `[`/`{` nesting of a JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse(text: str | bytes, *, source: str, key: str | None = None, max_chars: int) -> Any:
    """Parse JSON text of at most `max_chars` characters, nested at most `MAX_DEPTH` deep.

    Raises:
        ValueError: too long, not UTF-8, not JSON, nested too deeply, an integer over
            `MAX_INT_DIGITS` digits, or NaN/Infinity; names `source` and `key`.
    """
    where = _where(source, key)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: not UTF-8 text ({err})") from None
    if len(text) > max_chars:
        raise ValueError(f"{where} is {len(text)} characters long; at most {max_chars} expected")
    if _nesting(text) > MAX_DEPTH:
        raise ValueError(f"{where} nests JSON too deeply (more than {MAX_DEPTH} levels)")
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except ValueError as err:  # json.JSONDecodeError included
        raise ValueError(f"{where} is not valid JSON ({err})") from None


def string(value: Any, *, source: str, key: str, max_chars: int, nullable: bool = False) -> str | None:
    """`value` as a string of at most `max_chars` characters without NUL (None allowed when `nullable`).

    Raises:
        ValueError: another type, too long, or holding NUL.
    """
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        expected = "a string or null" if nullable else "a string"
        raise ValueError(f"{_where(source, key)} must be {expected}, got {type(value).__name__} {shown(value)}")
    if len(value) > max_chars or "\0" in value:
        problem = f"is {len(value)} characters long (at most {max_chars})" if len(value) > max_chars else "holds a NUL"
        raise ValueError(f"{_where(source, key)} {problem}")
    return value


def integer(value: Any, *, source: str, key: str, low: int, high: int) -> int:
    """`value` as an int in `[low, high]` (a bool is not an int here).

    Raises:
        ValueError: another type, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_where(source, key)} must be a whole number, got {type(value).__name__} {shown(value)}")
    if not low <= value <= high:
        raise ValueError(f"{_where(source, key)} must be in [{low}, {high}], got {value}")
    return value


def integer_text(text: str, *, source: str, key: str, low: int, high: int) -> int:
    """A decimal integer written as text (environment variables, string metadata) in `[low, high]`.

    Raises:
        ValueError: not plain ASCII digits, too many digits, or out of range.
    """
    body = text.strip()
    digits = body.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{_where(source, key)} must be a whole number, got {shown(text)}")
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError(f"{_where(source, key)} has {len(digits)} digits; it must be in [{low}, {high}]")
    return integer(int(body), source=source, key=key, low=low, high=high)


def string_list(value: Any, *, source: str, key: str, max_items: int, max_chars: int) -> list[str]:
    """`value` as a list of at most `max_items` non-empty strings (see `string`).

    Raises:
        ValueError: not a list (a string or an object is not taken for one), too many items, or a bad item.
    """
    if not isinstance(value, list):
        raise ValueError(f"{_where(source, key)} must be a list of strings, got {type(value).__name__} {shown(value)}")
    if len(value) > max_items:
        raise ValueError(f"{_where(source, key)} has {len(value)} items; at most {max_items} expected")
    out = []
    for i, item in enumerate(value):
        text = string(item, source=source, key=f"{key}[{i}]", max_chars=max_chars)
        if not text:
            raise ValueError(f"{_where(source, f'{key}[{i}]')} is empty")
        out.append(text)
    return out


__all__ = ["parse", "string", "integer", "integer_text", "string_list", "shown", "MAX_DEPTH", "MAX_INT_DIGITS"]
