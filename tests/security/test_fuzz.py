"""Property-based fuzzing (hypothesis) of what a hostile peer controls: push messages, command requests, archives and
manifests. The properties: parsing fails only with the documented error type (never a TypeError, RecursionError,
OverflowError, zlib.error...), what parses is within every limit, and extraction never writes outside its
destination. CI runs a short form (150 examples per property); EDGECV_SLOW=1 runs 5,000 (profiles in conftest.py).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from edgecv.agent.contract import bundle as B
from edgecv.agent.contract import documents as D
from edgecv.agent.contract import samples as S
from edgecv.agent.contract.commands import MAX_ID_CHARS, RequestError, parse_request
from edgecv.agent.contract.names import is_name
from edgecv.agent.contract.topics import INVALID_COMMAND, DeviceTopics
from edgecv.agent.contract.transfer import (
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    Begin,
    Receiver,
    TransferError,
    begin_for,
    parse_push_topic,
)
from edgecv.agent.errors import BundleError, DocumentError, SampleRequestError

TOPICS = DeviceTopics("edgecv", "dev")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["..", ".", "", "a/b", "+", "#", "x\x00y", "-rf", "t" * 65, "\u202eevil", "1" * 30])


# ---------------------------------------------------------------------------------------------- push messages
def _valid_begin_doc() -> dict[str, Any]:
    return json.loads(begin_for(os.urandom(3 * 4096), "m", "1.0", chunk_size=4096, transfer_id="t1").to_payload())


@given(st.binary(max_size=6000))
@example(b"[" * 5000)
@example(b'{"transfer_id": "t", "size": 1e400}')
def test_begin_parsing_of_arbitrary_bytes_fails_cleanly(data: bytes) -> None:
    try:
        Begin.from_payload(data)
    except TransferError:
        pass


@given(st.dictionaries(st.sampled_from(["transfer_id", "name", "version", "sha256", "size", "chunk_size", "chunks",
                                        "sent_at", "protocol", "allow_downgrade", "x"]),
                       json_values | hostile_text, max_size=6))
def test_begin_fields_of_any_type_are_typed_or_refused(over: dict[str, Any]) -> None:
    doc = {**_valid_begin_doc(), **over}
    try:
        payload = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, UnicodeEncodeError):
        return
    try:
        begin = Begin.from_payload(payload)
    except TransferError as exc:
        assert exc.transfer_id is None or is_name(exc.transfer_id)
        return
    assert is_name(begin.transfer_id) and is_name(begin.version)
    for value in (begin.size, begin.chunk_size, begin.chunks, begin.protocol):
        assert type(value) is int
    assert isinstance(begin.allow_downgrade, bool)
    TOPICS.push_ack(begin.transfer_id)  # every parsed id makes a valid topic


@given(st.integers(min_value=-5, max_value=2 ** 40), st.integers(min_value=-5, max_value=2 ** 22),
       st.integers(min_value=-5, max_value=2 ** 30))
def test_receiver_accepts_only_bounded_transfers(size: int, chunk_size: int, chunks: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="fuzz-rx-"))
    try:
        begin = Begin(transfer_id="t1", name="m", version="1", sha256="0" * 64, size=size, chunk_size=chunk_size,
                      chunks=chunks)
        [ack] = Receiver(root / "rx", "dev", max_bytes=64 << 20).begin(begin)
        if ack.state == "receiving":
            assert 0 < size <= 64 << 20 and MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
            assert chunks <= MAX_CHUNKS and chunks * chunk_size >= size
            assert (root / "rx" / "t1" / "received.map").stat().st_size == chunks
        else:
            assert ack.state == "failed" and not (root / "rx" / "t1").exists()
        assert sorted(p.name for p in root.iterdir()) == ["rx"]
    finally:
        shutil.rmtree(root)


@given(hostile_text, st.sampled_from(["begin", "end", "ack", "chunk/1", "chunk/x", "chunk/\u0663", "chunk/"]))
def test_push_topics_parse_without_exceptions(tid: str, part: str) -> None:
    parsed = parse_push_topic(f"edgecv/dev/model/push/{tid}/{part}")
    if parsed is not None and parsed[2] is not None:
        assert 0 <= parsed[2] <= 999_999_999


# ------------------------------------------------------------------------------------------------- commands
@given(hostile_text, st.binary(max_size=3000) | json_values.map(lambda v: json.dumps({"id": v, "to": v},
                                                                                     allow_nan=True).encode()))
@example("ping", b'{"id": ' + b"[" * 9000)
def test_command_parsing_answers_everything_on_a_valid_topic(name: str, payload: bytes) -> None:
    try:
        request = parse_request(name, payload)
    except RequestError as exc:
        assert exc.name == INVALID_COMMAND or is_name(exc.name)
        assert exc.request_id is None
        TOPICS.cmd_result(exc.name)
        return
    assert is_name(request.name) and isinstance(request.body, dict)
    assert request.id is None or (isinstance(request.id, int) and not isinstance(request.id, bool)) \
        or (isinstance(request.id, str) and len(request.id) <= MAX_ID_CHARS)
    TOPICS.cmd_result(request.name)


@given(st.dictionaries(st.sampled_from(["sample", "offset", "length", "after", "limit", "samples"]),
                       json_values | hostile_text | st.lists(hostile_text, max_size=4), max_size=6))
@example({"sample": "../x", "offset": True})
@example({"samples": ["a", ".."], "limit": 2 ** 70})
def test_sample_requests_are_bounded_and_safe_or_refused(body: dict[str, Any]) -> None:
    """Whatever fields a peer sends, a sample request parses to safe ids and capped sizes or is refused."""
    for parse in (S.parse_list, S.parse_chunk, S.parse_delete):
        try:
            parsed = parse(body)
        except SampleRequestError:
            continue
        if isinstance(parsed, S.ChunkRequest):
            assert S.is_sample_id(parsed.sample) and "/" not in parsed.sample and not parsed.sample.startswith(".")
            assert 0 <= parsed.offset <= S.MAX_SAMPLE_BYTES and 1 <= parsed.length <= S.MAX_CHUNK
        elif isinstance(parsed, S.ListRequest):
            assert parsed.after is None or S.is_sample_id(parsed.after)
            assert 1 <= parsed.limit <= S.MAX_PAGE
        else:
            assert 1 <= len(parsed) <= S.MAX_PAGE and all(S.is_sample_id(i) and ".." not in i for i in parsed)


# ------------------------------------------------------------------------------------------------- documents
@given(st.text(max_size=400))
@example('{"a": "[[[\\"[["}')
def test_json_documents_parse_or_fail_with_document_error(text: str) -> None:
    try:
        D.parse(text.encode("utf-8", "surrogatepass"), "doc", max_bytes=1 << 16, max_depth=6)
    except DocumentError:
        pass


@given(json_values.filter(lambda v: not _has_nonfinite(v)))
def test_nesting_depth_matches_the_parsed_depth(value: Any) -> None:
    text = json.dumps(value)
    assert D.nesting_depth(text, 1000) == _depth(value)


def _has_nonfinite(v: Any) -> bool:
    if isinstance(v, float):
        return v != v or v in (float("inf"), float("-inf"))
    if isinstance(v, list):
        return any(_has_nonfinite(x) for x in v)
    if isinstance(v, dict):
        return any(_has_nonfinite(x) for x in v.values())
    return False


def _depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


# -------------------------------------------------------------------------------------------------- archives
def _good_archive() -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", b'{"a": 1}'), ("sub/model.onnx", bytes(range(256)) * 8),
                           ("x" * 120, b"long name via PAX")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = _good_archive()
RAW_TAR = gzip.decompress(GOOD)


def _extract(data: bytes) -> None:
    work = Path(tempfile.mkdtemp(prefix="fuzz-tar-"))
    try:
        (work / "a.edgecv").write_bytes(data)
        dest = work / "box" / "out"
        (work / "box").mkdir()
        try:
            B.extract_archive(work / "a.edgecv", dest, max_bytes=1 << 20, max_members=8)
        except BundleError:
            assert not dest.exists()
        for path in work.rglob("*"):  # nothing outside the destination
            assert path == work / "a.edgecv" or path == work / "box" or dest in path.parents or path == dest, path
            assert not path.is_symlink()
    finally:
        shutil.rmtree(work)


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(1, 255)), max_size=4),
       st.integers(min_value=1, max_value=len(GOOD)))
def test_mutated_gzip_archives_extract_or_fail_cleanly(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for offset, mask in flips:
        data[offset] ^= mask
    _extract(bytes(data[:cut]))


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(RAW_TAR) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_tar_headers_extract_or_fail_cleanly(writes: list[tuple[int, int]]) -> None:
    """Byte writes in the uncompressed tar (headers, PAX records, sizes, type flags), re-compressed so gzip is fine:
    this reaches the header parser rather than zlib."""
    data = bytearray(RAW_TAR)
    for offset, value in writes:
        data[offset] = value
    _extract(gzip.compress(bytes(data)))


# ------------------------------------------------------------------------------------------------- manifests
MANIFEST = json.loads(B.Manifest(
    name="m", version="1.0.0", created="x", labels=("a", "b"),
    input=B.InputSpec(width=8, height=8, channels=1, color="GRAY"),
    artifacts=(B.Artifact("model.onnx", "onnx", "int8", "0" * 64, 10),),
    selftest=B.SelfTest("selftest.npz", "0" * 64, (0, 1))).to_bytes())


@given(st.sampled_from([("",), ("input",), ("artifacts", 0), ("selftest",)]),
       st.sampled_from(["name", "version", "labels", "width", "height", "channels", "scale", "mean", "bytes", "path",
                        "sha256", "expected_top1", "min_agreement", "metrics", "color", "x"]),
       json_values | hostile_text)
def test_manifest_fields_of_any_type_parse_or_name_the_key(where: tuple[Any, ...], key: str, value: Any) -> None:
    doc = json.loads(json.dumps(MANIFEST))
    target = doc
    for step in where:
        if step != "":
            target = target[step]
    target[key] = value
    try:
        data = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    try:
        B.Manifest.from_bytes(data)
    except BundleError as exc:
        assert "Manifest key" in str(exc) or "manifest.json" in str(exc) or "unknown key" in str(exc), exc


NAMES = ["a", "b", "a/b", "a/b/c", "./a", "a/", "..", "../a", "a/../b", "/a", ".", "", "a" * 70, "m\u00f6", "c\\d"]
KINDS = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
         tarfile.CHRTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(KINDS), st.binary(max_size=600)), max_size=6),
       st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
def test_generated_tar_layouts_extract_or_fail_cleanly(entries: list[tuple[str, bytes, bytes]], fmt: int) -> None:
    """Any sequence of names and entry types (collisions, links, devices, traversal), in every tar format."""
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
            for name, kind, data in entries:
                info = tarfile.TarInfo(name)
                info.type = kind
                if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    info.linkname = "target"
                    tar.addfile(info)
    except (ValueError, UnicodeEncodeError, tarfile.TarError):
        return  # a name this tar format cannot even write
    _extract(buf.getvalue())
