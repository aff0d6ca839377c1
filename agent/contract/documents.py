"""JSON documents from peers (push begin, manifest, manifest.sig, commands): bounded before they are parsed, typed
after.

`parse` refuses a document before `json` sees it when it is larger than its limit, not UTF-8, or nested deeper
than its limit (a scan of the brackets outside strings; `json` itself recurses, so depth is checked first). While
parsing, NaN/Infinity literals, numbers that overflow to infinity (`1e400`) and duplicate keys are refused. The
`get_*` readers then turn fields into typed values or raise DocumentError naming the key path: integers are never
bools, floats or strings (`"12"`, `12.0`, `true` are all refused), numbers are finite and in range.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from edgecv.agent.contract.names import shown
from edgecv.agent.errors import DocumentError

_SPECIAL = re.compile(r'[\\"\[\]{}]')
_MISSING: Any = object()


def parse(data: bytes | str, what: str, *, max_bytes: int, max_depth: int, allow_nonfinite: bool = False) -> Any:
    """The JSON value of `data`, or DocumentError when it breaks a limit or is not strict JSON.

    `allow_nonfinite` lets NaN/Infinity (and numbers that overflow to infinity) through as floats, for documents with
    a free-form part that the workstation may write them into (a manifest's `metrics`); every typed field is still
    range-checked by its `need_*` reader, which refuses them."""
    if len(data) > max_bytes:
        raise DocumentError(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    else:
        text = data
    depth = nesting_depth(text, max_depth)
    if depth > max_depth:
        raise DocumentError(f"{what} is nested more than {max_depth} levels deep")
    try:
        if allow_nonfinite:
            return json.loads(text, object_pairs_hook=_unique_keys)
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except DocumentError as exc:
        raise DocumentError(f"{what} is not valid: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit; RecursionError cannot happen
        raise DocumentError(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def nesting_depth(text: str, stop_above: int) -> int:
    """The deepest array/object nesting of a JSON text (brackets inside strings do not count); the scan stops as
    soon as the depth exceeds `stop_above`. Malformed text gives some number; `json` rejects it afterwards."""
    depth = deepest = 0
    in_string = False
    skip_to = -1
    for m in _SPECIAL.finditer(text):
        pos = m.start()
        if pos < skip_to:
            continue  # the character after a backslash inside a string
        c = text[pos]
        if in_string:
            if c == "\\":
                skip_to = pos + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    return deepest
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise DocumentError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DocumentError(f"number {text[:24]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise DocumentError(f"key {shown(key)} appears twice")
        doc[key] = value
    return doc


# ---------------------------------------------------------------------------------------------- typed fields
def describe(value: Any) -> str:
    """A JSON value in an error message, bounded."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"string {shown(value)}"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 24 else text[:23] + "…"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def need_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DocumentError(f"{where or 'document'} must be a JSON object, got {describe(value)}")
    return value


def need_int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DocumentError(f"{where} must be an integer from {lo} to {hi}, got {describe(value)}")
    return value


def need_number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise DocumentError(f"{where} must be a number from {lo:g} to {hi:g}, got {describe(value)}")
    return float(value)


def need_str(value: Any, where: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise DocumentError(f"{where} must be a string of at most {max_len} characters, got {describe(value)}")
    return value


def need_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DocumentError(f"{where} must be true or false, got {describe(value)}")
    return value


def field(doc: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """doc[key], or `default`; DocumentError naming the key when it is required and missing."""
    if key in doc:
        return doc[key]
    if default is _MISSING:
        raise DocumentError(f"{prefix}{key} is missing")
    return default
