"""Input-side limits of the contract: safe names, bounded JSON documents, typed push begin and manifest fields, the
strict archive reader (header bombs, links, corrupt gzip), version ordering and command request parsing."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import pytest

from edgecv.agent.contract import archive as A
from edgecv.agent.contract import bundle as B
from edgecv.agent.contract import documents as D
from edgecv.agent.contract.commands import RequestError, parse_request
from edgecv.agent.contract.names import check_name, inside, is_name, join
from edgecv.agent.contract.topics import INVALID_COMMAND, DeviceTopics
from edgecv.agent.contract.transfer import (
    FAILED,
    MAX_ACK_RANGES,
    MAX_CHUNKS,
    Begin,
    Receiver,
    TransferError,
    begin_for,
    parse_push_topic,
)
from edgecv.agent.contract.versions import compare, version_key
from edgecv.agent.errors import BundleFormatError, DocumentError, UnsafeArchiveError, UnsafeNameError

# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a\x00b", "+", "#", "a+b", "a#", "-x", ".hidden",
                                 "x" * 65, "tränsfer", "a b", "a\\b", "\u202eevil"])
def test_unsafe_names_are_refused(bad: str) -> None:
    assert not is_name(bad)
    with pytest.raises(UnsafeNameError):
        check_name(bad, "Transfer id")


@pytest.mark.parametrize("good", ["a", "0", "1.2.0", "1.0.0-rc.1", "abc123def456-9f8e7d", "x_y", "x" * 64])
def test_safe_names_pass(good: str) -> None:
    assert check_name(good, "Name") == good


def test_topics_are_built_only_from_safe_names() -> None:
    t = DeviceTopics("edgecv", "dev")
    for bad in ("..", "a/b", "+", "#", "x\x00"):
        with pytest.raises(UnsafeNameError):
            t.push_ack(bad)
        with pytest.raises(UnsafeNameError):
            t.cmd_result(bad)
    assert t.cmd_result(INVALID_COMMAND) == "edgecv/dev/cmd/_invalid/result"


def test_paths_must_stay_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    assert join(root, "a", "b") == (root / "a" / "b").resolve()
    for escape in (root, root / ".." / "x", root / "link" / "x"):
        with pytest.raises(UnsafeNameError):
            inside(root, escape)


# ------------------------------------------------------------------------------------------- documents


@pytest.mark.parametrize(("data", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": 1e400}', "out of range"),
    (b'{"a": 1, "a": 2}', "twice"),
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b" " * (2 << 20), "limit is 1048576"),
    (b"{", "not valid JSON"),
])
def test_documents_are_bounded_before_parsing(data: bytes, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        D.parse(data, "doc", max_bytes=1 << 20, max_depth=8)


def test_nesting_scan_ignores_brackets_in_strings() -> None:
    assert D.nesting_depth('{"a": "[[[[[[[[[[\\"[[["}', 8) == 1
    assert D.parse(b'{"a": ["[[[[[[[[[[[["]}', "doc", max_bytes=100, max_depth=2) == {"a": ["[[[[[[[[[[[["]}


@pytest.mark.parametrize("value", ["12", 12.0, True, None, [1], 1 << 80, -1])
def test_integers_are_integers_in_range(value: object) -> None:
    with pytest.raises(DocumentError, match="must be an integer"):
        D.need_int(value, "size", 0, 1 << 53)


# ---------------------------------------------------------------------------------------------- begin


def _begin_doc(**over: object) -> bytes:
    doc = json.loads(begin_for(os.urandom(10_000), "m", "1.0", chunk_size=4096, transfer_id="t1").to_payload())
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("over", "message"), [
    ({"size": "12"}, "size must be an integer"),
    ({"size": True}, "size must be an integer"),
    ({"size": 12.5}, "size must be an integer"),
    ({"chunks": 1 << 60}, "chunks must be an integer"),
    ({"sent_at": "now"}, "sent_at must be a number"),
    ({"version": "../../x"}, "not a safe name"),
    ({"version": "1.0+local"}, "not a safe name"),
    ({"name": "a\x00b"}, "control characters"),
    ({"name": "n" * 500}, "at most 128"),
    ({"allow_downgrade": "yes"}, "true or false"),
    ({"protocol": [1]}, "protocol must be an integer"),
])
def test_begin_fields_are_typed_and_keep_a_valid_transfer_id(over: dict[str, object], message: str) -> None:
    with pytest.raises(TransferError, match=message) as err:
        Begin.from_payload(_begin_doc(**over))
    assert err.value.transfer_id == "t1"  # so the device can still answer on the transfer's ack topic


@pytest.mark.parametrize("tid", ["..", ".", "a/b", "x\x00", "#", "+", "t" * 100, 5, None])
def test_begin_with_an_unsafe_transfer_id_has_no_id_to_answer_on(tid: object) -> None:
    with pytest.raises(TransferError) as err:
        Begin.from_payload(_begin_doc(transfer_id=tid))
    assert err.value.transfer_id is None


@pytest.mark.parametrize(("over", "message"), [
    ({"chunk_size": 1, "chunks": 10_000}, "chunk_size 1 is outside"),
    ({"chunk_size": 4 << 20, "chunks": 1}, "is outside"),
    ({"chunks": 5}, "size / chunk_size gives 3"),
    ({"size": 100 << 20, "chunks": 25600}, "exceeds this device's limit"),
    ({"sha256": "A" * 64}, "lowercase hex"),
    ({"protocol": 2}, "protocol 2 is not supported"),
])
def test_begin_limits_are_checked_before_anything_is_allocated(tmp_path: Path, over: dict[str, object],
                                                                message: str) -> None:
    begin = Begin.from_payload(_begin_doc(**over))
    [ack] = Receiver(tmp_path, "dev").begin(begin)
    assert ack.state == FAILED and message in (ack.error or "")
    assert not (tmp_path / "t1").exists()


def test_chunk_count_is_capped_and_missing_ranges_are_bounded(tmp_path: Path) -> None:
    size = (MAX_CHUNKS + 1) * 4096
    b = Begin(transfer_id="big", name="m", version="1", sha256="0" * 64, size=size, chunk_size=4096,
              chunks=MAX_CHUNKS + 1)
    [ack] = Receiver(tmp_path, "dev", max_bytes=size).begin(b)
    assert ack.state == FAILED and "exceed the limit" in (ack.error or "")
    # every other chunk missing: the ack lists only the first MAX_ACK_RANGES ranges
    n = 4 * MAX_ACK_RANGES
    data = os.urandom(n * 4096)
    b = begin_for(data, "m", "1", chunk_size=4096, transfer_id="alt")
    rx = Receiver(tmp_path / "rx", "dev", max_bytes=len(data))
    rx.begin(b)
    from edgecv.agent.contract.transfer import chunk_data, encode_chunk

    for i in range(0, n, 2):
        rx.chunk("alt", i, encode_chunk(chunk_data(data, b, i)))
    ack = rx.end("alt")
    assert len(ack.missing) == MAX_ACK_RANGES and ack.missing[0] == [1, 1] and len(ack.to_payload()) < 8000


def test_push_topic_index_is_ascii_digits_only() -> None:
    assert parse_push_topic("e/d/model/push/t/chunk/\u00b2") is None  # '²'.isdigit() is True, int('²') fails
    assert parse_push_topic("e/d/model/push/t/chunk/-1") is None
    assert parse_push_topic("e/d/model/push/t/chunk/" + "9" * 40) is None
    assert parse_push_topic("e/d/model/push/../begin") == ("..", "begin", None)  # the caller checks the id


def test_receiver_never_deletes_outside_its_root(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    rx = Receiver(tmp_path / "transfers", "dev")
    (tmp_path / "transfers" / "planted").symlink_to(victim)
    rx._discard_dir("..")
    rx._discard_dir("planted")
    assert (victim / "keep").exists() and (tmp_path / "transfers").is_dir()


# --------------------------------------------------------------------------------------------- archive


def _raw(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    (b"x", "PAX header of"), (b"g", "PAX header of"), (b"L", "GNU long name of")])
def test_header_bombs_are_refused_from_the_header_alone(tmp_path: Path, kind: bytes, message: str) -> None:
    # 64 MiB of header body in a ~64 KB gzip: tarfile would read it all into memory first
    body = _raw("hdr", 64 << 20, kind) + bytes(64 << 20)
    archive = _write(tmp_path, "bomb.edgecv", gzip.compress(body, 1))
    with pytest.raises(UnsafeArchiveError, match=message):
        B.extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("records", "error"), [
    (b"linkpath=/etc/passwd", UnsafeArchiveError), (b"GNU.sparse.size=1", UnsafeArchiveError),
    (b"path=../../escape", UnsafeArchiveError), (b"size=99999999999", UnsafeArchiveError)])
def test_pax_records_are_checked(tmp_path: Path, records: bytes, error: type[Exception]) -> None:
    rec = records + b"\n"
    n = len(rec) + 3
    rec = f"{n} ".encode() + rec
    assert len(rec) == n
    body = _raw("pax", len(rec), b"x") + rec + bytes(-len(rec) % 512) + _raw("manifest.json", 1) + b"x" \
        + bytes(511) + bytes(1024)
    with pytest.raises(error):
        B.extract_archive(_write(tmp_path, "p.edgecv", gzip.compress(body)), tmp_path / "out")


def test_corrupt_gzip_at_several_offsets_is_a_format_error(tmp_path: Path) -> None:
    src = tmp_path / "b"
    src.mkdir()
    (src / "model.onnx").write_bytes(os.urandom(50_000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "model.onnx", "model.onnx")
    whole = buf.getvalue()
    for n, offset in enumerate((12, 200, len(whole) // 2, len(whole) - 6)):
        bad = bytearray(whole)
        bad[offset] ^= 0x55
        with pytest.raises(BundleFormatError, match="truncated or corrupt"):
            B.extract_archive(_write(tmp_path, f"c{n}.edgecv", bytes(bad)), tmp_path / f"out{n}")
        assert not (tmp_path / f"out{n}").exists()


def test_other_formats_duplicates_and_bad_checksums_are_refused(tmp_path: Path) -> None:
    import bz2

    ok = _raw("a", 1) + b"x" + bytes(511)
    cases = {
        "bz2": (bz2.compress(ok + bytes(1024)), "format bundles do not use"),
        "dup": (gzip.compress(ok + ok + bytes(1024)), "twice"),
        "sum": (gzip.compress(ok[:148] + b"0000000\x00" + ok[156:] + bytes(1024)), "checksum"),
        "empty": (gzip.compress(bytes(1024)), "empty"),
        "sparse": (gzip.compress(_raw("s", 0, b"S") + bytes(1024)), "sparse"),
        "unicode": (gzip.compress(_raw("mödel", 1) + b"x" + bytes(511) + bytes(1024)), "unsafe name"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises((BundleFormatError, UnsafeArchiveError), match=message):
            A.extract(_write(tmp_path, f"{name}.edgecv", data), tmp_path / f"out-{name}", max_bytes=1 << 20)


@pytest.mark.parametrize("names", [("a", "a/b"), ("a/b", "a"), ("d/", "d")])
def test_entries_that_collide_are_refused(tmp_path: Path, names: tuple[str, str]) -> None:
    body = b""
    for name in names:
        if name.endswith("/"):
            body += _raw(name, 0, tarfile.DIRTYPE)
        else:
            body += _raw(name, 1) + b"x" + bytes(511)
    with pytest.raises(UnsafeArchiveError, match=r"collide|twice"):
        A.extract(_write(tmp_path, "c.edgecv", gzip.compress(body + bytes(1024))), tmp_path / "out", max_bytes=100)
    assert not (tmp_path / "out").exists()


def test_gnu_tar_layout_with_dot_slash_names_extracts(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        info = tarfile.TarInfo("./sub/manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    out = A.extract(_write(tmp_path, "g.edgecv", buf.getvalue()), tmp_path / "out", max_bytes=100)
    assert (out / "sub" / "manifest.json").read_bytes() == b"{}"


# -------------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["artifacts"][0].update(bytes="12"), r"'artifacts\[0\]\.bytes' must be an integer"),
    (lambda d: d["input"].update(width="28"), r"'input\.width' must be an integer"),
    (lambda d: d["input"].update(width=10**12), r"'input\.width' must be an integer from 1 to 16384"),
    (lambda d: d["input"].update(scale=[1]), r"'input\.scale' must be a number"),
    (lambda d: d["input"].update(mean=["a"]), r"'input\.mean\[0\]' must be a number"),
    (lambda d: d.update(labels="abc"), r"'labels' must be an array"),
    (lambda d: d.update(labels=[1, 2]), r"'labels\[0\]' must be a string"),
    (lambda d: d["selftest"].update(expected_top1=["a"]), r"'selftest\.expected_top1\[0\]' must be an integer"),
    (lambda d: d["selftest"].update(min_agreement="1"), r"'selftest\.min_agreement' must be a number"),
    (lambda d: d.update(version="../../x"), "version"),
    (lambda d: d.update(metrics=[1]), "metrics"),
])
def test_wrong_typed_manifest_fields_name_the_key_path(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    from tests.agent.test_contract_bundle import SPEC

    m = B.Manifest(name="fm", version="1.0.0", created="x", labels=("a", "b"), input=SPEC,
                   artifacts=(B.Artifact("model.onnx", "onnx", "int8", "0" * 64, 10),),
                   selftest=B.SelfTest("selftest.npz", "0" * 64, (0,)))
    doc = json.loads(m.to_bytes())
    mutate(doc)
    with pytest.raises(BundleFormatError, match=message):
        B.Manifest.from_bytes(json.dumps(doc).encode())


def test_nan_is_allowed_in_metrics_only() -> None:
    from tests.agent.test_contract_bundle import SPEC

    m = B.Manifest(name="fm", version="1.0.0", created="x", labels=("a", "b"), input=SPEC,
                   artifacts=(B.Artifact("model.onnx", "onnx", "int8", "0" * 64, 10),),
                   metrics={"latency_ms": float("nan")})
    assert B.Manifest.from_bytes(m.to_bytes()).metrics["latency_ms"] != 0  # NaN round-trips in metrics
    doc = json.loads(m.to_bytes())
    doc["input"]["scale"] = float("nan")
    with pytest.raises(BundleFormatError, match=r"'input\.scale' must be a number"):
        B.Manifest.from_bytes(json.dumps(doc).encode())


def test_deep_or_huge_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(BundleFormatError, match="nested more than"):
        B.Manifest.from_bytes(b'{"metrics": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    with pytest.raises(BundleFormatError, match="limit is"):
        B.Manifest.from_bytes(b" " * (B.MAX_MANIFEST_BYTES + 1))


# -------------------------------------------------------------------------------------------- versions


def test_version_order_semver_and_pep440() -> None:
    chain = ["1.0.dev1", "1.0a1", "1.0b2", "1.0rc1", "1.0", "1.0.post1", "1.0.1", "1.10", "2.0.0-rc.1", "2.0.0"]
    for a, b in itertools.pairwise(chain):
        assert compare(a, b) == -1 and compare(b, a) == 1, (a, b)
    for a, b in [("1.0a1", "1.0.0-alpha.1"), ("1.0rc1", "1.0.0-rc.1"), ("1.0", "1.0.0"), ("v2", "2.0")]:
        assert compare(a, b) == 0, (a, b)
    assert compare("1.0.0-alpha", "1.0.0-alpha.1") == -1 and compare("1.0.0-beta.2", "1.0.0-beta.11") == -1
    assert compare("latest", "1.0") is None and version_key("1.0-x.y") is not None


# -------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize(("name", "payload", "where", "message"), [
    ("ping", b"\xff\x00garbage", "ping", "UTF-8"),
    ("ping", b"[1, 2]", "ping", "must be a JSON object"),
    ("ping", b'{"id": {"a": 1}}', "ping", "Command id"),
    ("ping", b'{"id": "' + b"x" * 500 + b'"}', "ping", "Command id"),
    ("ping", b'{"id": 1e400}', "ping", "out of range"),
    ("ping", b'{"id": true}', "ping", "Command id"),
    ("ping", b"[" * 1000, "ping", "nested"),
    ("ping", b" " * 20_000, "ping", "limit"),
    ("p\u00efng", b"{}", INVALID_COMMAND, "not a safe name"),
    ("x" * 200, b"{}", INVALID_COMMAND, "not a safe name"),
])
def test_command_requests_are_parsed_strictly(name: str, payload: bytes, where: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        parse_request(name, payload)
    assert err.value.name == where and err.value.request_id is None


def test_valid_command_requests() -> None:
    assert parse_request("ping", b"").id is None
    assert parse_request("rollback", b'{"id": "r1", "to": "1.0"}').body["to"] == "1.0"
    assert parse_request("ping", b'{"id": 7}').id == 7
