"""JSON from clients, parsed within limits: what a hostile body can cost is bounded before it is parsed.

Python's `json.loads` accepts more than a service should take from strangers: nesting until the
interpreter's recursion limit (a RecursionError, not a ValueError), the non-standard tokens `NaN`
and `Infinity`, numbers like `1e400` that become infinite, escaped lone surrogates (`"\\ud800"`) that
no database or tokenizer can encode, and millions of tiny containers that cost 25 times the body in
memory. `loads` refuses all of these with a 400 in the OpenAI envelope:

- at most `max_values` JSON values, counted before parsing from the structural bytes `{`, `[` and
  `,` (every container and every value after a container's first is announced by one). This is an
  upper bound: the same bytes inside strings count too, and base64, digits and the data URLs that
  carry images never contain them, so a documented payload stays far below the limit;
- at most `max_depth` levels of nesting;
- strings of valid Unicode only (the text must be UTF-8, and escapes may not leave lone surrogates),
  without NUL characters (which PostgreSQL cannot store);
- finite numbers only.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import GatewayError, invalid

MAX_DEPTH = 32  # the deepest documented body (a prediction's input images) has 4 levels
MAX_VALUES = 100_000  # a prompt of 32,000 characters, all commas, still fits


def loads(
    data: bytes | bytearray | str,
    *,
    what: str = "The request body",
    param: str | None = None,
    max_depth: int = MAX_DEPTH,
    max_values: int = MAX_VALUES,
) -> Any:
    """Parse `data`, or raise GatewayError 400 (`invalid_json`) saying what is wrong."""
    text = data if isinstance(data, str) else decode(data, what=what, param=param, max_values=max_values)
    _count(text, what, param, max_values)
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise _bad(f"{what} is nested too deeply (at most {max_depth} levels).", param) from None
    except _NotFinite:
        raise _bad(f"{what} holds a number that is not finite; JSON numbers must be finite.", param) from None
    except ValueError:
        raise _bad(f"{what} is not valid JSON.", param) from None
    check(value, what=what, param=param, max_depth=max_depth)
    return value


def decode(
    data: bytes | bytearray, *, what: str = "The request body", param: str | None = None, max_values: int = MAX_VALUES
) -> str:
    """UTF-8 text, strictly: invalid bytes and encoded surrogates are refused. Too many values are
    refused first, before the text is made."""
    _count(data, what, param, max_values)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not valid UTF-8.", param) from None


def _count(data: bytes | bytearray | str, what: str, param: str | None, max_values: int) -> None:
    if isinstance(data, str):
        marks = data.count("{") + data.count("[") + data.count(",")
    else:
        marks = data.count(b"{") + data.count(b"[") + data.count(b",")
    if marks >= max_values:
        raise _bad(f"{what} holds too many JSON values (at most {max_values} are accepted).", param)


def check(
    value: Any,
    *,
    what: str = "The request body",
    param: str | None = None,
    max_depth: int = MAX_DEPTH,
    code: str = "invalid_json",
) -> None:
    """Depth and string validity of an already parsed value (iterative: no recursion to exhaust).
    A bad string is reported by its place in the body, e.g. `input.prompt`. `code`: the error's code
    (a form's fields are not JSON)."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _text(item, what, param, path, code)
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise _bad(f"{what} is nested too deeply (at most {max_depth} levels).", param, code)
            if isinstance(item, dict):
                for key, child in item.items():
                    _text(key, what, param, path, code)
                    stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(item))


def _text(s: str, what: str, param: str | None, path: tuple[str | int, ...], code: str) -> None:
    if "\x00" in s:  # PostgreSQL cannot store it, and no prompt or name needs it
        raise _bad(
            f"{_subject(what, param, path)} holds a NUL character (\\u0000), which is not accepted.",
            _dotted(path) or param,
            code,
        )
    if s.isascii():  # the common case, and every data URL: no copy made
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(
            f"{_subject(what, param, path)} is not valid Unicode: it holds an unpaired surrogate escape "
            "such as \\ud800.",
            _dotted(path) or param,
            code,
        ) from None


def _subject(what: str, param: str | None, path: tuple[str | int, ...]) -> str:
    where = _dotted(path) or param
    return f"'{where}' in {what[0].lower()}{what[1:]}" if where else what


def _dotted(path: tuple[str | int, ...]) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


class _NotFinite(ValueError):
    pass


def _constant(name: str) -> float:
    raise _NotFinite(name)  # NaN, Infinity, -Infinity: not JSON


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _NotFinite(text)
    return value


def _bad(message: str, param: str | None, code: str = "invalid_json") -> GatewayError:
    return invalid(message, param=param, code=code)
