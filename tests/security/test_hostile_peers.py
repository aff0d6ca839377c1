"""The hostile-peer suite: every row of CASES is one hostile input sent to a real agent process over a real broker by
a peer that may write the device's push and command topics (the threat model of docs/SECURITY.md).

Each case performs its attack and waits for the device's final answer (a `rejected` state, a FAILED/UNKNOWN ack, or
exactly one command result) and returns it as the outcome; `test_hostile_input` then checks the invariants listed in
conftest.py (alive, old model serving, RSS within budget, nothing written outside the store) and records the
measurements for docs/SECURITY.md.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.contract import bundle as B
from edgecv.agent.contract.grants import DowngradeGrant, grant_downgrade
from edgecv.agent.contract.names import is_name
from edgecv.agent.contract.signing import generate_private_key, sign
from edgecv.agent.contract.transfer import begin_for, chunk_data, encode_chunk
from tests.bundle_factory import make_bundle
from tests.e2e.conftest import wait_until
from tests.security.conftest import BUDGET_MB, SEED_VERSION, STORE_ENTRIES, Kit, Record, Report, Target, Targets

pytestmark = pytest.mark.e2e
CHUNK = 4096
BOMB = (1 << 30) if os.environ.get("EDGECV_SLOW") == "1" else (64 << 20)  # header bomb size: 1 GiB in the long form


@dataclass(frozen=True)
class Case:
    cls: str
    name: str
    run: Callable[[Target, Kit], str]


CASES: list[Case] = []
CLASS_CONFIG: dict[str, dict[str, Any]] = {
    "versions": {"update": {"allow_downgrade": "never"}},
    "grants": {"update": {"allow_downgrade": "when-asked"}},
    # One runtime: with "auto" a signed model is also compiled in OpenVINO to be measured, which costs 13-60 MB of
    # RSS by itself (docs/SECURITY.md); the budget here is about what the hostile model does, not that choice.
    "models": {"model": {"runtime": "onnxruntime"}},
    # sample collection on, keeping nothing (so the agent's directory stays as it was): the commands are served
    "samples": {"samples": {"enabled": True, "low_confidence": 0.0, "state_changes": False, "pending": False}},
}


def case(cls: str, name: str) -> Callable[[Callable[[Target, Kit], str]], Callable[[Target, Kit], str]]:
    def add(fn: Callable[[Target, Kit], str]) -> Callable[[Target, Kit], str]:
        CASES.append(Case(cls, name, fn))
        return fn
    return add


def expect(text: str | None, *needles: str) -> str:
    assert text, "no error text"
    low = text.lower()
    assert any(n.lower() in low for n in needles), f"{text!r} names none of {needles}"
    return text


# ------------------------------------------------------------------------------------------ transfer metadata
def _begin_doc(tid: str, **over: Any) -> dict[str, Any]:
    begin = begin_for(os.urandom(3 * CHUNK), "hostile", "9.9.9", chunk_size=CHUNK, transfer_id="t")
    doc = json.loads(begin.to_payload())
    doc["transfer_id"] = tid
    doc.update(over)
    return doc


def _refused_begin(t: Target, topic_tid: str, payload: bytes, *needles: str) -> str:
    """Send one begin; the device must answer with a rejected state (and a FAILED ack when the topic id is safe)."""
    mark = t.mark()
    t.publish(f"{t.base}/model/push/{topic_tid}/begin", payload)
    valid = is_name(topic_tid)
    state = t.state_after(mark, ("rejected",), transfer=topic_tid if valid else None)
    if valid:
        ack = json.loads(t.wait(mark, lambda m: m.topic == f"{t.base}/model/push/{topic_tid}/ack").payload)
        assert ack["state"] == "failed", ack
    assert len(state["error"]) <= 300
    return "rejected: " + expect(state["error"], *needles)


_n = iter(range(10_000))


def _begin_case(label: str, *needles: str, tid: str | None = None, raw: bytes | None = None, **over: Any) -> None:
    @case("transfer", label)
    def run(t: Target, kit: Kit) -> str:
        topic_tid = tid if tid is not None else f"tm{next(_n)}"
        fields = {k: v for k, v in over.items() if k != "payload_tid"}
        payload = raw if raw is not None else json.dumps(_begin_doc(over.get("payload_tid", topic_tid), **fields),
                                                          allow_nan=True).encode()
        return _refused_begin(t, topic_tid, payload, *needles)


for _tid in ("..", ".", "tr\u00e4nsfer", "t" * 100, "-rf", "a b"):
    _begin_case(f"topic id {_tid[:12]!r}", "not a safe name", tid=_tid)
for _bad, _label in (("x\x00y", "NUL"), ("+", "plus"), ("#", "hash"), ("a/b", "slash"), ("..", "dotdot"),
                     ("\u202eevil", "bidi")):
    _begin_case(f"payload id {_label}", "not a safe name", payload_tid=_bad)
_begin_case("payload id differs from topic", "differs from the topic", payload_tid="other")
for _field, _value, _needle in (
        ("size", 0, "size must be an integer"), ("size", -1, "size must be an integer"),
        ("size", "12", "size must be an integer"), ("size", True, "size must be an integer"),
        ("size", 2 ** 70, "size must be an integer"), ("size", float("nan"), "NaN"),
        ("chunk_size", 0, "chunk_size must be an integer"), ("chunk_size", 1.5, "chunk_size must be an integer"),
        ("chunks", "3", "chunks must be an integer"), ("sha256", "zz" * 32, "lowercase hex"),
        ("sha256", "a" * 63, "lowercase hex"), ("protocol", 2, "protocol 2"), ("protocol", "1", "protocol must be"),
        ("version", "../../etc", "not a safe name"), ("version", "1#0", "not a safe name"),
        ("name", "n" * 500, "at most 128"), ("name", "evil\x00name", "control characters"),
        ("sent_at", "yesterday", "sent_at must be"), ("allow_downgrade", "yes", "true or false")):
    _begin_case(f"{_field}={str(_value)[:16]!r}", _needle, **{_field: _value})
_begin_case("size 1e400", "out of range", raw=b'{"transfer_id": "tm-inf", "size": 1e400}', tid="tm-inf")
_begin_case("size over device limit", "exceeds this device's limit", size=100 << 20, chunks=(100 << 20) // CHUNK)
_begin_case("chunk_size 1 (5.9 GB before)", "chunk_size 1 is outside", size=64 << 20, chunk_size=1, chunks=64 << 20)
_begin_case("chunk_size 1 TiB", "is outside", chunk_size=1 << 40, chunks=1)
_begin_case("chunks inconsistent", "size / chunk_size gives", chunks=1)
_begin_case("chunks 1e9", "size / chunk_size gives", chunks=10 ** 9)
_begin_case("not JSON", "not UTF-8", "not valid JSON", raw=os.urandom(200), tid="tm-junk")
_begin_case("deep JSON", "nested", raw=b"[" * 4000, tid="tm-deep")
_begin_case("1 MiB begin", "limit is 4096", raw=b" " * (1 << 20), tid="tm-huge")
_begin_case("JSON array", "must be a JSON object", raw=b"[1, 2, 3]", tid="tm-array")
_begin_case("keys missing", "is missing", raw=b'{"transfer_id": "tm-keys"}', tid="tm-keys")


# ---------------------------------------------------------------------------------------------- chunk stream
class Transfer:
    """A raw transfer of a validly signed bundle older than the active one: if the stream is reassembled
    correctly the device verifies it completely and refuses it as a downgrade (the model never changes)."""

    def __init__(self, t: Target, kit: Kit, tid: str) -> None:
        self.t, self.tid = t, tid
        self.data = kit.archive("4.0.0", top1=4, pad_bytes=40_000)
        self.begin = begin_for(self.data, "hostile", "4.0.0", chunk_size=CHUNK, transfer_id=tid)
        self.mark = t.mark()

    def topic(self, part: str) -> str:
        return f"{self.t.base}/model/push/{self.tid}/{part}"

    def start(self) -> None:
        """Send begin and wait for its ack, so later acks answer what follows."""
        mark = self.t.mark()
        self.t.publish(self.topic("begin"), self.begin.to_payload())
        self.t.wait(mark, lambda m: m.topic == self.topic("ack"))

    def chunk(self, i: int, payload: bytes | None = None) -> None:
        self.t.publish(self.topic(f"chunk/{i}"),
                       payload if payload is not None else encode_chunk(chunk_data(self.data, self.begin, i)))

    def end(self) -> dict[str, Any]:
        mark = self.t.mark()
        self.t.publish(self.topic("end"), b"{}")
        return json.loads(self.t.wait(mark, lambda m: m.topic == self.topic("ack")).payload)  # type: ignore[no-any-return]

    def all_chunks(self, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        for i in range(self.begin.chunks):
            if i not in skip:
                self.chunk(i)

    def refused_as_downgrade(self) -> str:
        state = self.t.state_after(self.mark, ("rejected", "active"), transfer=self.tid, timeout=60)
        assert state["state"] == "rejected", state
        return "rejected: " + expect(state["error"], "older than the active")

    def failed(self, *needles: str) -> str:
        ack = json.loads(self.t.wait(self.mark, lambda m: m.topic == self.topic("ack")
                                     and json.loads(m.payload)["state"] == "failed").payload)
        self.t.state_after(self.mark, ("rejected",), transfer=self.tid)
        return "failed: " + expect(ack["error"], *needles)


@case("chunks", "reordered and duplicated")
def _(t: Target, kit: Kit) -> str:
    x = Transfer(t, kit, "c-reorder")
    x.start()
    for i in reversed(range(x.begin.chunks)):
        x.chunk(i)
        x.chunk(i)
    assert x.end()["state"] == "complete"
    return x.refused_as_downgrade()


@case("chunks", "bad checksum, then resent")
def _(t: Target, kit: Kit) -> str:
    x = Transfer(t, kit, "c-sum")
    x.start()
    x.all_chunks(skip={3})
    bad = bytearray(encode_chunk(chunk_data(x.data, x.begin, 3)))
    bad[40] ^= 0xFF
    x.chunk(3, bytes(bad))
    ack = x.end()
    assert ack["state"] == "receiving" and ack["missing"] == [[3, 3]], ack
    x.chunk(3)
    assert x.end()["state"] == "complete"
    return x.refused_as_downgrade()


@case("chunks", "gap, then filled")
def _(t: Target, kit: Kit) -> str:
    x = Transfer(t, kit, "c-gap")
    x.start()
    x.all_chunks(skip={1, 2, 7})
    assert x.end()["missing"] == [[1, 2], [7, 7]]
    for i in (7, 2, 1):
        x.chunk(i)
    assert x.end()["state"] == "complete"
    return x.refused_as_downgrade()


for _label, _topic_index in (("index out of range", "999"), ("unicode digit index", "\u00b2"),
                             ("20-digit index", "9" * 20), ("negative index", "-1")):
    @case("chunks", _label)
    def _(t: Target, kit: Kit, _idx: str = _topic_index) -> str:
        x = Transfer(t, kit, f"c-idx{next(_n)}")
        x.start()
        x.t.publish(x.topic(f"chunk/{_idx}"), encode_chunk(b"\x00" * CHUNK))
        x.all_chunks()
        assert x.end()["state"] == "complete"
        return x.refused_as_downgrade()


for _label, _make, _needle in (
        ("chunk longer than announced", lambda c: encode_chunk(c + b"x" * 100), "expected"),
        ("chunk shorter than announced", lambda c: encode_chunk(c[:-1]), "expected"),
        ("empty chunk", lambda c: b"", "expected"),
        ("2 MiB chunk", lambda c: os.urandom(2 << 20), "expected")):
    @case("chunks", _label)
    def _(t: Target, kit: Kit, _mk: Callable[[bytes], bytes] = _make, _nd: str = _needle) -> str:
        x = Transfer(t, kit, f"c-len{next(_n)}")
        x.start()
        x.chunk(2, _mk(chunk_data(x.data, x.begin, 2)))
        return x.failed(_nd)


@case("chunks", "chunks and end for an unknown transfer")
def _(t: Target, kit: Kit) -> str:
    x = Transfer(t, kit, "c-ghost")
    for i in range(50):
        x.chunk(i, encode_chunk(os.urandom(CHUNK)))
    ack = x.end()
    assert ack["state"] == "unknown", ack
    return "unknown: " + ack["error"]


@case("chunks", "1000 corrupt chunks, then the real ones")
def _(t: Target, kit: Kit) -> str:
    x = Transfer(t, kit, "c-flood")
    x.start()
    for n in range(1000):  # right length, wrong sha256 header: dropped, stays missing
        i = n % x.begin.chunks
        x.chunk(i, bytes(32) + chunk_data(x.data, x.begin, i))
    x.all_chunks()
    assert x.end()["state"] == "complete"
    return x.refused_as_downgrade()


@case("chunks", "superseded mid-transfer")
def _(t: Target, kit: Kit) -> str:
    first = Transfer(t, kit, "c-first")
    first.start()
    for i in range(3):
        first.chunk(i)
    second = Transfer(t, kit, "c-second")
    second.start()
    sup = json.loads(t.wait(first.mark, lambda m: m.topic == first.topic("ack")
                            and json.loads(m.payload)["state"] == "superseded").payload)
    second.all_chunks()
    assert second.end()["state"] == "complete"
    return f"superseded + {second.refused_as_downgrade()} ({sup['error']})"


# ------------------------------------------------------------------------------------------ archive contents
def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _raw_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _zeros_gz(head: bytes, n: int) -> bytes:
    """gzip of `head` followed by `n` zero bytes, compressed in pieces (a 1 GiB bomb is ~1 MB of gzip)."""
    z = zlib.compressobj(1, wbits=31)
    out = [z.compress(head)]
    block = bytes(1 << 20)
    for _ in range(n >> 20):
        out.append(z.compress(block))
    out.append(z.compress(bytes(n & ((1 << 20) - 1))))
    out.append(z.flush())
    return b"".join(out)


def _with_checksum(header: bytes) -> bytes:
    """A 512-byte tar header with its checksum field recomputed (so the parser gets past it)."""
    body = header[:148] + b" " * 8 + header[156:]
    return header[:148] + f"{sum(body):06o}\x00 ".encode() + header[156:]


def _manifest_entry() -> tuple[tarfile.TarInfo, bytes]:
    return _info("manifest.json"), b"{}"


def _archive_case(name: str, build: Callable[[Target, Kit], bytes], *needles: str) -> None:
    @case("archive", name)
    def run(t: Target, kit: Kit) -> str:
        _pusher, result = t.push(build(t, kit))
        assert result.state in ("rejected", "failed"), result
        return f"{result.state}: " + expect(result.error, *needles)


def _escape(t: Target, kit: Kit) -> str:
    return os.path.relpath(kit.canary / "evil", t.store / "staging" / "install-0")


_archive_case("path traversal ../", lambda t, k: _tar([_manifest_entry(), (_info(_escape(t, k)), b"evil")]),
              "escape")
_archive_case("absolute path", lambda t, k: _tar([_manifest_entry(), (_info(str(k.canary / "abs")), b"evil")]),
              "escape")
_archive_case("traversal inside a dir", lambda t, k: _tar([(_info("a/../../" + _escape(t, k)), b"evil")]), "escape")
for _label, _kind, _link in (("symlink", tarfile.SYMTYPE, "/etc/passwd"), ("hard link", tarfile.LNKTYPE, "x"),
                             ("char device", tarfile.CHRTYPE, ""), ("block device", tarfile.BLKTYPE, ""),
                             ("fifo", tarfile.FIFOTYPE, ""), ("contiguous file", tarfile.CONTTYPE, "")):
    _archive_case(_label, lambda t, k, _k=_kind, _l=_link: _tar([_manifest_entry(), (_info("m", _k, _l), None)]),
                  "only regular files")
_archive_case("sparse file", lambda t, k: gzip.compress(_raw_header("s", 0, b"S") + bytes(1024)), "sparse")
_archive_case("PAX header bomb", lambda t, k: _zeros_gz(_raw_header("pax", BOMB, b"x"), BOMB), "PAX header of")
_archive_case("global PAX header bomb", lambda t, k: _zeros_gz(_raw_header("pax", BOMB, b"g"), BOMB), "PAX header of")
_archive_case("GNU long name bomb", lambda t, k: _zeros_gz(_raw_header("././@LongLink", BOMB, b"L"), BOMB),
              "GNU long name of")
_archive_case("GNU long link name", lambda t, k: gzip.compress(_raw_header("././@LongLink", 10, b"K") + bytes(1024)),
              "long link")
_archive_case("PAX path traversal", lambda t, k: _pax_archive(b"path=" + _escape(t, k).encode()), "escape")
_archive_case("PAX linkpath", lambda t, k: _pax_archive(b"linkpath=/etc/shadow"), "linkpath")
_archive_case("PAX size over the limit", lambda t, k: _pax_archive(b"size=99999999999"), "exceeds")
_archive_case("gzip bomb: 65 MiB member", lambda t, k: gzip.compress(
    _raw_header("model.onnx", 65 << 20) + bytes(65 << 20) + bytes(1024), 1), "exceeds")
_archive_case("5000 members", lambda t, k: gzip.compress(
    b"".join(_raw_header(f"f{i}", 0) for i in range(5000)) + bytes(1024)), "more than")
_archive_case("duplicate member", lambda t, k: _tar([_manifest_entry(), _manifest_entry()]), "twice")
_archive_case("unicode member name", lambda t, k: _tar([(_info("m\u00f6del.onnx"), b"x")]), "unsafe name")
_archive_case("300-char member name", lambda t, k: _tar([(_info("d" * 300), b"x")]), "characters")
_archive_case("base-256 size (8 EiB)", lambda t, k: gzip.compress(
    _with_checksum(_raw_header("m", 1)[:124] + b"\x80" + b"\xff" * 11 + _raw_header("m", 1)[136:]) + bytes(1024)),
    "base-256")
_archive_case("bad header checksum", lambda t, k: gzip.compress(
    _raw_header("m", 1)[:148] + b"0000000\x00" + _raw_header("m", 1)[156:] + b"x" + bytes(1535)), "checksum")
_archive_case("random bytes", lambda t, k: os.urandom(5000), "not a tar", "corrupt")
_archive_case("bz2 tar", lambda t, k: bz2.compress(_raw_header("m", 0) + bytes(1024)), "format bundles do not use")
_archive_case("empty tar", lambda t, k: gzip.compress(bytes(10240)), "empty")
_archive_case("tar without manifest", lambda t, k: _tar([(_info("model.onnx"), b"x")]), "has no manifest.json")
_archive_case("truncated gzip", lambda t, k: k.archive("9.0.1", pad_bytes=20_000)[:9000], "truncated")
for _where in ("header", "early", "middle", "crc"):
    def _corrupt(t: Target, k: Kit, _w: str = _where) -> bytes:
        data = bytearray(k.archive("9.0.2", pad_bytes=20_000))
        offset = {"header": 3, "early": 40, "middle": len(data) // 2, "crc": len(data) - 6}[_w]
        data[offset] ^= 0x5A
        return bytes(data)
    _archive_case(f"corrupt gzip ({_where})", _corrupt, "corrupt", "truncated", "format bundles", "not a tar")


def _pax_archive(record: bytes) -> bytes:
    rec = record + b"\n"
    length = len(rec) + 3
    rec = f"{length} ".encode() + rec
    if len(rec) != length:
        rec = f"{length + 1} ".encode() + record + b"\n"
    body = _raw_header("pax", len(rec), b"x") + rec + bytes(-len(rec) % 512) + _raw_header("manifest.json", 2) \
        + b"{}" + bytes(510) + bytes(1024)
    return gzip.compress(body)


# ------------------------------------------------------------------------------------ manifests (signed)
def _signed_raw(kit: Kit, version: str, edit: Callable[[bytes], bytes], *, sig: Callable[[bytes], bytes] | None = None,
                files: dict[str, bytes] | None = None) -> bytes:
    """A bundle whose manifest bytes are edited after building, then signed with the trusted key (so it passes the
    signature) and packed without any parse check."""
    src = make_bundle(kit.work / f"m-{version}-{time.monotonic_ns()}", version, top1=3, key=kit.key)
    for rel, data in (files or {}).items():
        (src / rel).write_bytes(data)
    manifest = edit((src / "manifest.json").read_bytes())
    (src / "manifest.json").write_bytes(manifest)
    signature = sig(manifest) if sig is not None else sign(manifest, kit.key).to_bytes()
    if signature:
        (src / "manifest.sig").write_bytes(signature)
    else:
        (src / "manifest.sig").unlink()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, p.name)
    return buf.getvalue()


def _json_edit(mutate: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        mutate(doc)
        return json.dumps(doc, allow_nan=True).encode()
    return edit


def _manifest_case(name: str, edit: Callable[[bytes], bytes], *needles: str) -> None:
    @case("manifest", name)
    def run(t: Target, kit: Kit) -> str:
        _pusher, result = t.push(_signed_raw(kit, f"9.1.{next(_n)}", edit))
        assert result.state == "rejected", result
        return "rejected: " + expect(result.error, *needles)


_manifest_case("deep nesting (100k)", lambda d: d[:-2] + b', "metrics": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
               "nested more than", "twice")
_manifest_case("huge (2 MiB)", _json_edit(lambda d: d.update(description="x" * (2 << 20))), "limit is")
_manifest_case("artifacts[0].bytes = '12'", _json_edit(lambda d: d["artifacts"][0].update(bytes="12")),
               "'artifacts[0].bytes' must be an integer")
_manifest_case("input.width = '28'", _json_edit(lambda d: d["input"].update(width="28")),
               "'input.width' must be an integer")
_manifest_case("input.width = 1e9", _json_edit(lambda d: d["input"].update(width=10 ** 9)), "from 1 to 16384")
_manifest_case("labels a string", _json_edit(lambda d: d.update(labels="abc")), "'labels' must be an array")
_manifest_case("150k labels", _json_edit(lambda d: d.update(labels=["l"] * 150_000)), "at most 100000")
_manifest_case("expected_top1 strings", _json_edit(lambda d: d["selftest"].update(expected_top1=["a"] * 4)),
               "expected_top1[0]' must be an integer")
_manifest_case("scale NaN", _json_edit(lambda d: d["input"].update(scale=float("nan"))),
               "'input.scale' must be a number")
_manifest_case("scale 1e400", _json_edit(lambda d: d["input"].update(scale=float("inf"))),
               "'input.scale' must be a number")
_manifest_case("bytes 1e400", lambda d: re.sub(rb'"bytes": \d+', b'"bytes": 1e400', d, count=1),
               "'artifacts[0].bytes' must be an integer")
_manifest_case("duplicate keys", lambda d: d[:-2] + b', "name": "again"}', "twice")
_manifest_case("not UTF-8", lambda d: d.replace(b'"tiny"', b'"t\xff\xfe"'), "UTF-8")
_manifest_case("unknown key", _json_edit(lambda d: d.update(run_me="rm -rf /")), "unknown key")
_manifest_case("artifact path traversal", _json_edit(lambda d: d["artifacts"][0].update(path="../model.fp32.onnx")),
               "artifacts[].path")
_manifest_case("a JSON array", lambda d: b"[" + d + b"]", "must be a dict")
_manifest_case("version ../../evil", _json_edit(lambda d: d.update(version="../../evil")), "version")


# ----------------------------------------------------------------------------------------------- signatures
def _signature_case(name: str, sig: Callable[[Kit, bytes], bytes], *needles: str,
                    edit: Callable[[bytes], bytes] = lambda d: d) -> None:
    @case("signature", name)
    def run(t: Target, kit: Kit) -> str:
        _pusher, result = t.push(_signed_raw(kit, f"9.2.{next(_n)}", edit, sig=lambda m: sig(kit, m)))
        assert result.state == "rejected", result
        return "rejected: " + expect(result.error, *needles)


_OTHER = generate_private_key()
_signature_case("unsigned", lambda k, m: b"", "unsigned")
_signature_case("signed by an unknown key", lambda k, m: sign(m, _OTHER).to_bytes(), "not in the device keyring")
_signature_case("trusted key id, forged signature", lambda k, m: json.dumps(
    {**json.loads(sign(m, _OTHER).to_bytes()), "key_id": json.loads(sign(m, k.key).to_bytes())["key_id"]}).encode(),
    "does not match")
_signature_case("signature of another manifest", lambda k, m: sign(m + b" ", k.key).to_bytes(), "does not match")
_signature_case("bad base64", lambda k, m: json.dumps(
    {**json.loads(sign(m, k.key).to_bytes()), "sig": "!!notbase64!!"}).encode(), "not a valid signature")
_signature_case("alg rsa", lambda k, m: json.dumps(
    {**json.loads(sign(m, k.key).to_bytes()), "alg": "rsa"}).encode(), "algorithm")
_signature_case("1 MiB signature file", lambda k, m: b" " * (1 << 20), "limit is")
_signature_case("deep signature JSON", lambda k, m: b"[" * 4000, "nested")
_signature_case("signature a JSON array", lambda k, m: b"[1]", "not a valid signature")
_signature_case("manifest altered after signing", lambda k, m: sign(m.replace(b'"tiny"', b'"tinz"'), k.key).to_bytes(),
                "does not match")


@case("signature", "artifact tampered (manifest intact)")
def _(t: Target, kit: Kit) -> str:
    data = _signed_raw(kit, f"9.2.{next(_n)}", lambda d: d,
                       files={"model.fp32.onnx": b"\x08" + os.urandom(100)})
    _pusher, result = t.push(data)
    assert result.state == "rejected", result
    return "rejected: " + expect(result.error, "bytes", "sha256")


# ------------------------------------------------------------------------------------------------- versions
@case("versions", "upgrade 6.0.0 (legitimate)")
def _(t: Target, kit: Kit) -> str:
    _pusher, result = t.push(kit.archive("6.0.0", top1=6))
    assert result.state == "active", result
    t.expected_version = "6.0.0"
    return "active: 6.0.0"


def _version_case(name: str, version: str, *needles: str, allow: bool = False, **kwargs: Any) -> None:
    @case("versions", name)
    def run(t: Target, kit: Kit) -> str:
        data = kit.seed.read_bytes() if version == "seed" else kit.archive(version, **kwargs)
        _pusher, result = t.push(data, allow_downgrade=allow)
        assert result.state == "rejected", result
        return "rejected: " + expect(result.error, *needles)


_version_case("replay of the old signed archive", "seed", f"{SEED_VERSION} is older than the active 6.0.0")
_version_case("downgrade 5.5.0", "5.5.0", "older than the active 6.0.0")
_version_case("downgrade asked, device says never", "5.5.0", "forbids downgrades", allow=True)
_version_case("same version, other content", "6.0.0", "other content", top1=7)
_version_case("6.0 == 6.0.0, other content", "6.0", "other content", top1=7)
_version_case("pre-release 6.0.0-rc.1", "6.0.0-rc.1", "older than")
_version_case("PEP 440 pre-release 6.0.0rc2", "6.0.0rc2", "older than")
_version_case("unorderable 'latest'", "latest", "cannot be ordered")


# --------------------------------------------------------------------------------------------------- grants
# A device that requires signed bundles and allows downgrades when asked ("when-asked", the default): the request
# counts only with a grant signed by a keyring key for this archive, this device, not expired (grants.py).
def _grant_case(name: str, forge: Callable[[Kit, str, str], DowngradeGrant | None], *needles: str) -> None:
    @case("grants", name)
    def run(t: Target, kit: Kit) -> str:
        data = kit.archive(f"4.{next(_n)}.0")
        _pusher, result = t.push(data, allow_downgrade=True,
                                 grant=None if forge is _unsigned else (lambda sha: forge(kit, sha, t.device)))
        assert result.state == "rejected", result
        return "rejected: " + expect(result.error, *needles)


def _unsigned(kit: Kit, sha: str, device: str) -> DowngradeGrant | None:
    return None


def _flip(grant: DowngradeGrant) -> DowngradeGrant:
    raw = bytearray(base64.b64decode(grant.sig))
    raw[5] ^= 0x01
    return replace(grant, sig=base64.b64encode(bytes(raw)).decode())


_grant_case("downgrade asked, unsigned", _unsigned, "not signed")
_grant_case("grant by a key not in the keyring",
            lambda k, sha, dev: grant_downgrade(generate_private_key(), sha, dev), "not in the device keyring")
_grant_case("grant for another archive", lambda k, sha, dev: grant_downgrade(k.key, "0" * 64, dev), "does not match")
_grant_case("grant for another device", lambda k, sha, dev: grant_downgrade(k.key, sha, "other-device"),
            "not this device")
_grant_case("grant target edited after signing",
            lambda k, sha, dev: replace(grant_downgrade(k.key, sha, "other-device"), target=dev), "does not match")
_grant_case("expiry extended after signing",
            lambda k, sha, dev: replace(grant_downgrade(k.key, sha, dev, valid_s=60), expires=int(time.time()) + 600),
            "does not match")
_grant_case("expired grant", lambda k, sha, dev: grant_downgrade(k.key, sha, dev, now=time.time() - 7200), "expired")
_grant_case("grant valid for 30 days", lambda k, sha, dev: grant_downgrade(k.key, sha, dev, valid_s=30 * 86400),
            "more than the 24 h")
_grant_case("signature bit flipped", lambda k, sha, dev: _flip(grant_downgrade(k.key, sha, dev)), "does not match")
_grant_case("signature not base64",
            lambda k, sha, dev: replace(grant_downgrade(k.key, sha, dev), sig="!" * 88), "not base64")
_grant_docs: tuple[tuple[str, object, str], ...] = (
        ("grant a string", "yes", "must be a JSON object"), ("grant target '../x'", {"target": "../x"}, "safe name"),
        ("grant expires 'soon'", {"expires": "soon"}, "expires must be an integer"),
        ("grant key id 'XYZ'", {"key_id": "XYZ"}, "lowercase hex"),
        ("grant signature 200 chars", {"sig": "A" * 200}, "sig must be a string of at most"),
        ("grant fields missing", {}, "is missing"))
for _label, _grant_doc, _needle in _grant_docs:
    _full = {"target": "d", "expires": 1, "key_id": "ab", "sig": "AA=="}
    _begin_case(_label, _needle, allow_downgrade=True,
                downgrade_grant={**_full, **_grant_doc} if isinstance(_grant_doc, dict) and _grant_doc else _grant_doc)


@case("grants", "signed downgrade to 4.0.0 (legitimate)")
def _(t: Target, kit: Kit) -> str:
    _pusher, result = t.push(kit.archive("4.0.0", top1=4), allow_downgrade=True,
                             grant=lambda sha: grant_downgrade(kit.key, sha, t.device))
    assert result.state == "active", result
    t.expected_version = "4.0.0"
    return "active: 4.0.0"


# --------------------------------------------------------------------------------------------------- models
def _model_case(name: str, *needles: str, files: dict[str, bytes] | None = None,
                edit: Callable[[bytes], bytes] | None = None) -> None:
    @case("models", name)
    def run(t: Target, kit: Kit) -> str:
        def rebind(data: bytes) -> bytes:  # keep the manifest's sha256/size bindings true for replaced files
            doc = json.loads(data)
            for art in doc["artifacts"]:
                if art["path"] in (files or {}):
                    content = (files or {})[art["path"]]
                    art["bytes"] = len(content)
                    art["sha256"] = hashlib.sha256(content).hexdigest()
            if doc.get("selftest") and "selftest.npz" in (files or {}):
                doc["selftest"]["sha256"] = hashlib.sha256((files or {})["selftest.npz"]).hexdigest()
            out = json.dumps(doc).encode()
            return edit(out) if edit is not None else out

        _pusher, result = t.push(_signed_raw(kit, f"9.3.{next(_n)}", rebind, files=files))
        assert result.state == "rejected", result
        return "rejected: " + expect(result.error, *needles)


def _npz(frames: np.ndarray | None = None, raw: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    if raw is not None:
        import zipfile

        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("frames.npy", raw)
    else:
        np.savez(buf, frames=frames)
    return buf.getvalue()


def _npy_bomb() -> bytes:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                "shape": (100_000, 4096, 4096)})
    return _npz(raw=head.getvalue() + bytes(1024))


_model_case("garbage model bytes", "model", "onnx", "load", files={"model.fp32.onnx": os.urandom(20_000)})
_model_case("empty model file", "model", "onnx", "load", files={"model.fp32.onnx": b""})
_model_case("self-test expects other classes", "Self-test failed",
            edit=_json_edit(lambda d: d["selftest"].update(expected_top1=[5, 5, 5, 5])))
_model_case("garbage selftest.npz", "unreadable", files={"selftest.npz": os.urandom(3000)})
_model_case("selftest.npz header bomb (2 TB declared)", "exceed the limit", files={"selftest.npz": _npy_bomb()})
_model_case("selftest frames float64", "expected uint8",
            files={"selftest.npz": _npz(np.zeros((4, 8, 8, 1), np.float64))})
_model_case("labels do not match the outputs", "outputs shape",
            edit=_json_edit(lambda d: d.update(labels=["a", "b", "c"]) or d["selftest"].update(expected_top1=[1] * 4)))
_model_case("input 16384x16384", "larger than this agent supports", "does not run",
            edit=_json_edit(lambda d: d["input"].update(width=16384, height=16384)))


@case("models", "correct but far too slow (~150 ms per frame, 20 fps camera)")
def _slow_model(t: Target, kit: Kit) -> str:
    """A validly signed model whose answers pass its own self-test but whose every frame takes hundreds of
    milliseconds: refused by the device's absolute budget (one frame period of its 20 fps camera), the old model
    keeps serving."""
    _pusher, result = t.push(kit.archive(f"9.4.{next(_n)}", top1=3, slow=True))
    assert result.state == "rejected", result
    return "rejected: " + expect(result.error, "too slow for this device", "budget")


# ------------------------------------------------------------------------------------------------- commands
def _command(t: Target, name: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    mark = t.mark()
    t.publish(f"{t.base}/cmd/{name}", payload)
    msg = t.wait(mark, lambda m: m.topic.endswith("/result"), timeout=20)
    t.predictions_continue(2)  # time for a second (wrong) result to show up
    results = t.since(mark, "/result")
    assert len(results) == 1, [(m.topic, m.payload[:80]) for m in results]
    return msg.topic, json.loads(msg.payload)


def _command_case(name: str, cmd: str, payload: bytes, *needles: str, ok: bool = False,
                  topic: str | None = None) -> None:
    @case("commands", name)
    def run(t: Target, kit: Kit) -> str:
        got_topic, doc = _command(t, cmd, payload)
        assert got_topic == f"{t.base}/cmd/{topic or cmd}/result", got_topic
        assert doc["ok"] is ok, doc
        if ok:
            return "result ok"
        assert len(doc["error"]) <= 300
        return "result error: " + expect(doc["error"], *needles)


_command_case("random bytes", "ping", os.urandom(256), "not UTF-8", "not valid JSON")
_command_case("JSON array", "ping", b"[1]", "must be a JSON object")
_command_case("JSON string", "reload", b'"reload"', "must be a JSON object")
_command_case("deep JSON", "ping", b'{"id": ' + b"[" * 10_000, "nested")
_command_case("64 KiB payload", "ping", b'{"id": "' + b"x" * (64 << 10) + b'"}', "limit")
_command_case("id an object", "ping", b'{"id": {"$gt": ""}}', "Command id")
_command_case("id 1e400", "ping", b'{"id": 1e400}', "out of range")
_command_case("id NaN", "ping", b'{"id": NaN}', "NaN")
_command_case("id true", "ping", b'{"id": true}', "Command id")
_command_case("id 10 KB", "ping", json.dumps({"id": "i" * 10_000}).encode(), "Command id")
_command_case("id with control characters", "ping", json.dumps({"id": "\x1b[31mred\x00"}).encode(), "Command id")
_command_case("unknown command", "format-disk", b'{"id": "u"}', "Unknown command")
_command_case("unicode command name", "p\u00efng", b'{"id": "u"}', "not a safe name", topic="_invalid")
_command_case("100-char command name", "c" * 100, b'{"id": "u"}', "not a safe name", topic="_invalid")
_command_case("command name ..", "..", b'{"id": "u"}', "not a safe name", topic="_invalid")
_command_case("rollback to an integer", "rollback", b'{"id": "r", "to": 5}', "'to' must be")
_command_case("rollback to ../../etc", "rollback", b'{"id": "r", "to": "../../etc"}', "'to' must be")
_command_case("rollback to a missing version", "rollback", b'{"id": "r", "to": "0.0.1"}', "No installed model")
_command_case("reload with junk fields", "reload", b'{"id": "j", "x": [1, {"y": null}]}', ok=True)
_command_case("empty ping", "ping", b"", ok=True)


def _samples_case(name: str, cmd: str, body: dict[str, Any], *needles: str, ok: bool = False) -> None:
    payload = json.dumps({"id": "s", **body}).encode()

    @case("samples", name)
    def run(t: Target, kit: Kit) -> str:
        got_topic, doc = _command(t, cmd, payload)
        assert got_topic == f"{t.base}/cmd/{cmd}/result", got_topic
        assert doc["ok"] is ok, doc
        if ok:
            return f"result ok: {len(doc.get('samples', []))} sample(s)"
        assert len(doc["error"]) <= 300
        return "result error: " + expect(doc["error"], *needles)


_samples_case("sample ..", "sample", {"sample": ".."}, "must be a sample id")
_samples_case("sample ../../etc/passwd", "sample", {"sample": "../../etc/passwd"}, "must be a sample id")
_samples_case("sample /etc/passwd", "sample", {"sample": "/etc/passwd"}, "must be a sample id")
_samples_case("sample a/b", "sample", {"sample": "a/b"}, "must be a sample id")
_samples_case("sample with NUL", "sample", {"sample": "a\x00.jpg"}, "must be a sample id")
_samples_case("sample hidden", "sample", {"sample": ".agent"}, "must be a sample id")
_samples_case("sample id 10 KB", "sample", {"sample": "s" * 10_000}, "must be a sample id")
_samples_case("sample id an object", "sample", {"sample": {"$ne": ""}}, "must be a sample id")
_samples_case("sample offset -1", "sample", {"sample": "a", "offset": -1}, "'offset' must be")
_samples_case("sample offset 2**63", "sample", {"sample": "a", "offset": 1 << 63}, "'offset' must be")
_samples_case("sample offset true", "sample", {"sample": "a", "offset": True}, "'offset' must be")
_samples_case("sample length 0.5", "sample", {"sample": "a", "length": 0.5}, "'length' must be")
_samples_case("sample that does not exist", "sample", {"sample": "pi-1-20260101T000000-000001"}, "No sample")
_samples_case("samples after ../x", "samples", {"after": "../x"}, "'after' must be")
_samples_case("samples limit -5", "samples", {"limit": -5}, "'limit' must be")
_samples_case("samples limit 10**12 (capped)", "samples", {"limit": 10**12}, ok=True)
_samples_case("samples.delete 1000 ids", "samples.delete", {"samples": ["a"] * 1000}, "'samples' must be a list")
_samples_case("samples.delete ../models", "samples.delete", {"samples": ["../models"]}, "must be a sample id")
_samples_case("samples.delete a string", "samples.delete", {"samples": "*"}, "'samples' must be a list")


def _flood(t: Target, name: str, n: int) -> dict[Any, list[dict[str, Any]]]:
    mark = t.mark()
    assert t.client is not None
    infos = [t.client.paho.publish(f"{t.base}/cmd/{name}", json.dumps({"id": f"{name}-{i}"}).encode(), qos=1)
             for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)

    def answered() -> bool:
        return len(t.since(mark, f"/cmd/{name}/result")) >= n

    assert wait_until(answered, 60), f"{len(t.since(mark, '/result'))} of {n} results"
    t.predictions_continue(2)
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for m in t.since(mark, f"/cmd/{name}/result"):
        doc = json.loads(m.payload)
        by_id.setdefault(doc["id"], []).append(doc)
    assert sorted(by_id) == sorted(f"{name}-{i}" for i in range(n)) and all(len(v) == 1 for v in by_id.values())
    return by_id


@case("commands", "flood: 1000 pings")
def _(t: Target, kit: Kit) -> str:
    by_id = _flood(t, "ping", 1000)
    return f"results: 1000 of 1000, {sum(v[0]['ok'] for v in by_id.values())} ok"


@case("commands", "flood: 300 snapshots")
def _(t: Target, kit: Kit) -> str:
    by_id = _flood(t, "snapshot", 300)
    busy = sum("busy" in (v[0].get("error") or "") for v in by_id.values())
    return f"results: 300 of 300, {sum(v[0]['ok'] for v in by_id.values())} ok, {busy} busy"


# ------------------------------------------------------------------------------------------------ the suite
@pytest.mark.parametrize("hostile", CASES, ids=[f"{c.cls}-{c.name}" for c in CASES])
def test_hostile_input(hostile: Case, targets: Targets, kit: Kit, report: Report) -> None:
    t = targets.get(hostile.cls, CLASS_CONFIG.get(hostile.cls))
    versions_before = set(os.listdir(t.store / "versions"))
    rss = t.reset_peak()
    t0 = time.monotonic()
    outcome = hostile.run(t, kit)
    seconds = time.monotonic() - t0
    peak = t.peak_mb() - rss
    assert t.alive(), t.log()[-3000:]
    t.predictions_continue(2)
    assert peak <= BUDGET_MB, f"peak RSS grew by {peak:.1f} MB (budget {BUDGET_MB:g} MB)"
    # nothing written outside the store, and nothing left behind inside it
    assert not any(kit.canary.iterdir()), list(kit.canary.iterdir())
    assert t.outside_store() == t.baseline
    assert set(os.listdir(t.store)) <= STORE_ENTRIES, os.listdir(t.store)
    assert wait_until(lambda: not any((t.store / "transfers").iterdir()) and not any((t.store / "staging").iterdir()),
                      10), (list((t.store / "transfers").iterdir()), list((t.store / "staging").iterdir()))
    versions_after = set(os.listdir(t.store / "versions"))
    assert versions_after == versions_before or outcome.startswith("active"), (versions_before, versions_after)
    report.add(Record(cls=hostile.cls, case=hostile.name, outcome=outcome[:200], peak_delta_mb=round(peak, 1),
                      rss_mb=round(rss, 1), seconds=round(seconds, 2)))


def test_the_suite_covers_enough_hostile_inputs() -> None:
    assert len(CASES) >= 60
    assert {c.cls for c in CASES} == {"transfer", "chunks", "archive", "manifest", "signature", "versions", "grants",
                                      "models", "commands", "samples"}


def test_versions_dir_of_the_seed_is_named_safely(kit: Kit) -> None:
    # the seed's store directory is '<version>-<sha12>': built from a validated version only
    b = B.load_bundle(B.extract_archive(kit.seed, kit.work / "seed-x"))
    assert is_name(f"{b.manifest.version}-{b.manifest_sha256[:12]}", 80)
    assert Path(kit.work / "seed-x").is_dir()
