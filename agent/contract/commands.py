"""Remote command requests (`<p>/<dev>/cmd/<name>`, JSON `{"id": ..., ...}`), parsed strictly before use.

Every request gets exactly one result. So parsing never fails silently: a request that cannot be used raises
RequestError carrying where its result goes (the command name when that is a safe name, else
topics.INVALID_COMMAND) and the request id to echo (only when the id itself is valid, else None).

Limits: a payload of at most MAX_COMMAND_BYTES, nested at most MAX_COMMAND_DEPTH deep, a JSON object (an empty
payload counts as `{}`); the id a string of at most MAX_ID_CHARS printable characters or an integer that JSON
readers hold exactly (|id| < 2**53), or absent/null. Fields of each command are checked by the command itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgecv.agent.contract import documents as D
from edgecv.agent.contract.names import is_name, shown
from edgecv.agent.contract.topics import INVALID_COMMAND
from edgecv.agent.errors import DocumentError, EdgecvError

MAX_COMMAND_BYTES = 16 * 1024
MAX_COMMAND_DEPTH = 8
MAX_ID_CHARS = 128
MAX_COMMAND_NAME = 32
_MAX_INT_ID = 1 << 53

RequestId = str | int | None


class RequestError(EdgecvError):
    """A command request that cannot be executed; `name` is where its result goes, `request_id` what it echoes."""

    def __init__(self, message: str, name: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.name = name
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    name: str
    id: RequestId
    body: dict[str, Any] = field(default_factory=dict)


def result_name(name: str) -> str:
    """The result topic level for a request that arrived on `cmd/<name>`."""
    return name if is_name(name, MAX_COMMAND_NAME) else INVALID_COMMAND


def parse_request(name: str, payload: bytes) -> Request:
    """A usable request, or RequestError (see the module docstring). Unknown command names are not an error
    here: the handler answers them."""
    where = result_name(name)
    if where == INVALID_COMMAND:
        raise RequestError(f"Command name {shown(name)} is not a safe name: use 1 to {MAX_COMMAND_NAME} letters, "
                           "digits, '.', '_' or '-'", where)
    try:
        doc = D.parse(payload, "Command payload", max_bytes=MAX_COMMAND_BYTES,
                      max_depth=MAX_COMMAND_DEPTH) if payload else {}
    except DocumentError as exc:
        raise RequestError(str(exc), where) from None
    if not isinstance(doc, dict):
        raise RequestError(f"Command payload must be a JSON object, got {D.describe(doc)}", where)
    raw_id = doc.get("id")
    if not valid_id(raw_id):
        raise RequestError(f"Command id must be a string of at most {MAX_ID_CHARS} printable characters or an "
                           f"integer, got {D.describe(raw_id)}", where)
    return Request(name=name, id=raw_id, body=doc)


def valid_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_MAX_INT_ID < value < _MAX_INT_ID
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS and value.isprintable()
