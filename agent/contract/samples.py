"""The sample-collection protocol (docs/MQTT.md, "Sample collection"): the sample id rule and the requests of
`cmd/samples` (list a page), `cmd/sample` (one chunk of one image) and `cmd/samples.delete`, parsed strictly.

Device and workstation share these limits: the device caps whatever a request asks for, and `edgecv collect` caps
whatever a device announces. A sample id is checked against SAMPLE_ID before it becomes a file name on either side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgecv.agent.contract.documents import describe
from edgecv.agent.errors import SampleRequestError

REASONS = ("low_confidence", "state_change", "pending", "periodic")
MAX_SAMPLE_ID = 128
MAX_PAGE = 200  # samples per `cmd/samples` page and per `cmd/samples.delete` request
MAX_CHUNK = 48 * 1024  # image bytes per `cmd/sample` result (base64 makes it 64 KiB)
MAX_SAMPLE_BYTES = 16 * 1024 * 1024  # the largest image either side accepts
PAGE_BUDGET_BYTES = 512 * 1024  # a page stops early (`more: true`) once its entries take this much JSON
MAX_LABELS_BYTES = 32 * 1024  # a model's label list travels with a sample only up to this size

# The dataset layout's rule (tools/dataset_layout.check_sample_id): ASCII, no leading dot, no separators, no '..'.
SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_sample_id(value: object) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= MAX_SAMPLE_ID and SAMPLE_ID.fullmatch(value) is not None
            and ".." not in value)


def check_sample_id(value: object, where: str = "sample") -> str:
    if not is_sample_id(value):
        raise SampleRequestError(f"{where} must be a sample id (1-{MAX_SAMPLE_ID} ASCII letters, digits, '.', '_' "
                                 f"or '-', starting with a letter or digit, without '..'), got {describe(value)}")
    return value  # type: ignore[return-value]


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SampleRequestError(f"'{key}' must be an integer from {lo} to {hi}, got {describe(value)}")
    return value


@dataclass(frozen=True)
class ListRequest:
    after: str | None
    limit: int


@dataclass(frozen=True)
class ChunkRequest:
    sample: str
    offset: int
    length: int  # already capped at MAX_CHUNK


def parse_list(body: dict[str, Any]) -> ListRequest:
    """`{"after": <sample id> | null, "limit": 1..}`; a limit above MAX_PAGE is lowered to it."""
    after = body.get("after")
    if after is not None:
        check_sample_id(after, "'after'")
    limit = _int(body, "limit", MAX_PAGE, 1, 1 << 53)
    return ListRequest(after, min(limit, MAX_PAGE))


def parse_chunk(body: dict[str, Any]) -> ChunkRequest:
    """`{"sample": id, "offset": 0.., "length": 1..}`; a length above MAX_CHUNK is lowered to it."""
    sample = check_sample_id(body.get("sample"), "'sample'")
    offset = _int(body, "offset", 0, 0, MAX_SAMPLE_BYTES)
    length = _int(body, "length", MAX_CHUNK, 1, 1 << 53)
    return ChunkRequest(sample, offset, min(length, MAX_CHUNK))


def parse_delete(body: dict[str, Any]) -> list[str]:
    """`{"samples": [id, ...]}` with 1 to MAX_PAGE ids."""
    ids = body.get("samples")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_PAGE:
        raise SampleRequestError(f"'samples' must be a list of 1 to {MAX_PAGE} sample ids, got {describe(ids)}")
    return [check_sample_id(v, f"'samples'[{i}]") for i, v in enumerate(ids)]
