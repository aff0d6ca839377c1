"""`edgecv label` without a browser: the dataset layout rules, the store's moves, journal and undo, and the
HTTP API on a real server (token, Host and Origin checks, validation, traversal attempts, concurrency), and
the command's process lifecycle. The page itself is driven in a real browser in test_label_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgecv.tools.dataset_layout import (
    JUNK,
    LABELS_LOG,
    UNLABELLED,
    ModelRef,
    Sidecar,
    SidecarError,
    check_class_name,
    check_sample_id,
    folder_for_label,
    read_sidecar,
    write_sidecar,
)
from edgecv.tools.errors import DatasetError, LabelError, NameNotAllowedError, UnknownSampleError
from edgecv.tools.label.server import TOKEN_HEADER, LabelServer
from edgecv.tools.label.store import LabelStore
from tests.tools.conftest import CollectedDataset, make_collected_dataset

BAD_CLASS_NAMES = ["", " ", "../evil", "a/b", "a\\b", "_junk", "_unlabelled", ".hidden", "-rf", "dog.", "dog ",
                   "x" * 65, "nul\x00byte", "tab\tname", "semi;colon", "..", "."]


def journal_lines(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / LABELS_LOG).read_text().splitlines() if line.strip()]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------- layout rules


def test_class_names_are_validated_before_they_become_folders() -> None:
    for name in BAD_CLASS_NAMES:
        with pytest.raises(NameNotAllowedError, match="not allowed"):
            check_class_name(name)
    for name in ("cat", "T-shirt top", "Ankle boot", "bin+lid", "v1.2", "Äpfel", "猫", "7"):
        assert check_class_name(name) == name
    assert check_class_name("Cafe\u0301") == "Café"  # NFC: one spelling, one folder


def test_model_labels_map_to_allowed_folder_names() -> None:
    assert folder_for_label("cat") == "cat"
    assert folder_for_label("T-shirt/top") == "T-shirt-top"
    assert folder_for_label("../../etc") == "etc"
    assert folder_for_label("_private") == "private"
    assert folder_for_label("///") is None
    for label in ("a/b/c", "..", "x" * 200, "name.", " lead"):
        folder = folder_for_label(label)
        assert folder is None or check_class_name(folder) == folder


def test_sample_ids_are_plain_ascii_file_stems() -> None:
    for ok in ("pi-1_20261130T101500_000042", "a", "A.b-c_d"):
        assert check_sample_id(ok) == ok
    for bad in ("", ".hidden", "../x", "a/b", "a..b", "é", "x" * 129, "a b"):
        with pytest.raises(NameNotAllowedError):
            check_sample_id(bad)


def test_sidecar_round_trips_and_rejects_wrong_types(tmp_path: Path) -> None:
    sc = Sidecar(predicted="T-shirt/top", score=0.42, camera="cam0", region="door", ts=1_764_500_000.5,
                 reason="state_change", device="pi-1", model=ModelRef("fm", "1.2.0", "ab" * 32, ("a", "b")))
    write_sidecar(tmp_path / "x.json", sc)
    assert read_sidecar(tmp_path / "x.json") == sc
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind
    # unknown keys are ignored, missing ones are None
    assert Sidecar.from_json({"predicted": "cat", "future_field": 1}).score is None
    for bad in ({"score": 1.5}, {"score": "high"}, {"reason": "bored"}, {"predicted": 3}, {"ts": float("nan")},
                {"model": {"labels": "cat"}}, [], {"model": "m"}):
        with pytest.raises(SidecarError):
            Sidecar.from_json(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SidecarError, match="not valid JSON"):
        read_sidecar(tmp_path / "bad.json")


# ---------------------------------------------------------------- store


def test_store_lists_samples_classes_and_counts(collected: CollectedDataset) -> None:
    unl = collected.root / UNLABELLED
    cv2.imwrite(str(unl / "zz_nosidecar.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(unl / "zz_badsidecar.jpg"), np.zeros((8, 8, 3), np.uint8))
    (unl / "zz_badsidecar.json").write_text('{"score": 7}')
    (unl / ".s99.jpg.tmp").write_bytes(b"being written")
    (unl / "notes.txt").write_text("not an image")
    store = LabelStore(collected.root)
    samples, summary = store.state()
    names = [s.name for s in samples]
    # sidecar time order first, then samples without a time by name
    assert names == [f"{i}.jpg" for i in collected.ids] + ["zz_badsidecar.jpg", "zz_nosidecar.png"]
    assert samples[0].sidecar is not None and samples[0].sidecar.predicted == "circle"
    assert samples[-2].sidecar is None and "score" in (samples[-2].problem or "")
    assert samples[-1].sidecar is None and samples[-1].problem is None
    classes = {c.name: c for c in summary.classes}
    assert list(classes) == ["circle", "square", "triangle"]  # folder + the model's predicted labels
    assert (classes["circle"].count, classes["circle"].has_folder) == (2, True)
    assert (classes["square"].count, classes["square"].has_folder, classes["square"].from_model) == (0, False, True)
    assert (summary.left, summary.total, summary.junk, summary.undo_depth) == (8, 8, 0, 0)


def test_predicted_labels_map_to_folders_and_existing_case_wins(tmp_path: Path) -> None:
    data = make_collected_dataset(tmp_path / "d", predicted=["Circle", "T-shirt/top", "///"])
    store = LabelStore(data.root)
    samples, summary = store.state()
    assert [(s.sidecar.predicted, s.folder) for s in samples if s.sidecar] == [
        ("Circle", "circle"), ("T-shirt/top", "T-shirt-top"), ("///", None)]
    assert [c.name for c in summary.classes] == ["circle", "T-shirt-top"]
    store.label("s01.jpg", "T-shirt-top")
    assert (data.root / "T-shirt-top" / "s01.jpg").is_file()
    assert journal_lines(data.root)[0]["predicted"] == "T-shirt/top"


def test_label_moves_image_and_sidecar_and_logs_it(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    out = store.label("s00.jpg", "circle")
    assert files_in(collected.root / "circle") == ["old0.png", "old1.png", "s00.jpg", "s00.json"]
    assert "s00.jpg" not in files_in(collected.root / UNLABELLED)
    assert read_sidecar(collected.root / "circle" / "s00.json").predicted == "circle"  # the sidecar travels along
    assert out.summary.left == 5 and out.summary.total == 6
    assert {c.name: c.count for c in out.summary.classes}["circle"] == 3
    # a model label without a folder yet: the folder is made by the move
    store.label("s01.jpg", "square")
    assert files_in(collected.root / "square") == ["s01.jpg", "s01.json"]
    store.junk("s02.jpg")
    assert files_in(collected.root / JUNK) == ["s02.jpg", "s02.json"]
    lines = journal_lines(collected.root)
    assert [(e["seq"], e["op"], e["sample"], e["from"], e["to"], e["made_folder"]) for e in lines] == [
        (1, "move", "s00", UNLABELLED, "circle", False), (2, "move", "s01", UNLABELLED, "square", True),
        (3, "move", "s02", UNLABELLED, JUNK, False)]
    assert lines[0]["files"] == ["s00.jpg", "s00.json"] and lines[1]["predicted"] == "square"


def test_undo_is_multi_level_and_survives_a_restart(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    store.label("s00.jpg", "circle")
    store.label("s01.jpg", "square")  # makes square/
    store.add_class("bird")
    store.label("s03.jpg", "bird")
    store.junk("s04.jpg")
    assert store.summary().undo_depth == 5

    out = store.undo()
    assert out.restored is not None and out.restored.name == "s04.jpg" and out.restored.sidecar is not None
    assert files_in(collected.root / JUNK) == []
    assert out.summary.left == 3 and out.summary.total == 6

    restarted = LabelStore(collected.root)  # a new server on the same dataset: the journal holds the history
    assert restarted.summary().undo_depth == 4
    assert restarted.summary().undo_next == "s03.jpg → bird"
    assert restarted.undo().restored.name == "s03.jpg"  # type: ignore[union-attr]
    assert restarted.undo().message == "undone: new class bird"
    assert not (collected.root / "bird").exists()
    assert restarted.undo().restored.name == "s01.jpg"  # type: ignore[union-attr]
    assert not (collected.root / "square").exists()  # the move had made it, undo takes it away again
    assert restarted.undo().restored.name == "s00.jpg"  # type: ignore[union-attr]
    with pytest.raises(LabelError, match="Nothing to undo"):
        restarted.undo()
    unl = files_in(collected.root / UNLABELLED)
    assert unl == sorted(f"{i}{ext}" for i in collected.ids for ext in (".jpg", ".json"))
    assert files_in(collected.root / "circle") == ["old0.png", "old1.png"]
    ops = [(e["op"], e.get("undoes")) for e in journal_lines(collected.root)]
    assert ops[5:] == [("undo", 5), ("undo", 4), ("undo", 3), ("undo", 2), ("undo", 1)]


def test_class_list_and_order_stay_put_while_the_server_runs(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    store.label("s03.jpg", "circle")  # the only sample predicted triangle
    store.add_class("bird")
    names = [c.name for c in store.summary().classes]
    assert names == ["circle", "square", "triangle", "bird"]  # triangle keeps its place (and its key)
    store.undo()
    store.undo()
    assert [c.name for c in store.summary().classes] == ["circle", "square", "triangle"]


def test_add_class_validates_and_refuses_clashes(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    before = sorted(p.name for p in collected.root.parent.iterdir())
    for name in BAD_CLASS_NAMES:
        with pytest.raises(NameNotAllowedError):
            store.add_class(name)
    assert sorted(p.name for p in collected.root.parent.iterdir()) == before  # nothing made outside the root
    with pytest.raises(LabelError, match="already exists"):
        store.add_class("circle")
    with pytest.raises(LabelError, match="differ only in case"):
        store.add_class("Circle")
    out = store.add_class("bird")
    assert (collected.root / "bird").is_dir()
    assert [c.name for c in out.summary.classes] == ["circle", "square", "triangle", "bird"]  # new ones go last
    store.add_class("square")  # a model label without a folder may be given one
    assert (collected.root / "square").is_dir()


def test_label_rejects_unknown_samples_classes_and_traversal(collected: CollectedDataset, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    cv2.imwrite(str(outside), np.zeros((8, 8, 3), np.uint8))
    os.symlink(outside, collected.root / UNLABELLED / "link.jpg")
    store = LabelStore(collected.root)
    assert "link.jpg" not in [s.name for s in store.samples()]  # links are neither listed nor moved
    for name in ("../circle/old0.png", "circle/old0.png", "/etc/passwd", "link.jpg", "s00.json", "nope.jpg", "",
                 ".", "..", f"..{os.sep}s00.jpg"):
        with pytest.raises(UnknownSampleError):
            store.label(name, "circle")
        with pytest.raises(UnknownSampleError):
            store.image_path(name)
    for cls in ("../elsewhere", "_junk", "/tmp", "a/b"):
        with pytest.raises(NameNotAllowedError):
            store.label("s00.jpg", cls)
    with pytest.raises(LabelError, match="does not exist: add it first"):
        store.label("s00.jpg", "zebra")
    assert outside.exists() and not (collected.root / LABELS_LOG).exists()
    assert len(store.samples()) == len(collected.ids)


def test_a_file_in_the_way_stops_the_move_and_nothing_changes(collected: CollectedDataset) -> None:
    (collected.root / "circle" / "s00.json").write_text("{}")  # someone's file with the same name
    store = LabelStore(collected.root)
    with pytest.raises(LabelError, match=r"circle/s00\.json already exists"):
        store.label("s00.jpg", "circle")
    assert "s00.jpg" in files_in(collected.root / UNLABELLED)
    assert (collected.root / "circle" / "s00.json").read_text() == "{}"


def test_undo_of_a_step_overtaken_by_hand_is_dropped_with_a_clear_message(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    store.label("s00.jpg", "circle")
    store.label("s01.jpg", "square")
    (collected.root / "square" / "s01.jpg").unlink()  # deleted by hand after labelling
    with pytest.raises(LabelError, match=r"square/s01.jpg is no longer there.*undo again"):
        store.undo()
    assert store.undo().restored.name == "s00.jpg"  # type: ignore[union-attr]
    assert journal_lines(collected.root)[2]["dropped"] == "square/s01.jpg is no longer there"


def test_journal_skips_a_torn_last_line_and_keeps_appending(collected: CollectedDataset) -> None:
    store = LabelStore(collected.root)
    store.label("s00.jpg", "circle")
    with open(collected.root / LABELS_LOG, "a") as fh:
        fh.write('{"seq": 2, "op": "mo')  # a crash in the middle of a write
    again = LabelStore(collected.root)
    assert again.journal.skipped_lines == 1 and again.summary().undo_depth == 1
    again.label("s01.jpg", "circle")
    raw = (collected.root / LABELS_LOG).read_text().splitlines()
    assert json.loads(raw[-1])["sample"] == "s01" and json.loads(raw[-1])["seq"] == 2
    assert LabelStore(collected.root).summary().undo_depth == 2


def test_a_sidecar_left_behind_by_a_crash_follows_its_image(collected: CollectedDataset) -> None:
    # A run stopped after moving the image (the first of the two moves) and before the sidecar.
    os.replace(collected.root / UNLABELLED / "s02.jpg", collected.root / "circle" / "s02.jpg")
    store = LabelStore(collected.root)
    assert store.repaired == 1
    assert files_in(collected.root / "circle") == ["old0.png", "old1.png", "s02.jpg", "s02.json"]
    assert journal_lines(collected.root)[0]["op"] == "repair"
    assert LabelStore(collected.root).repaired == 0


def test_store_refuses_a_wrong_root_with_a_hint(collected: CollectedDataset, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        LabelStore(tmp_path / "missing")
    with pytest.raises(DatasetError, match="pass its parent"):
        LabelStore(collected.root / UNLABELLED)
    with pytest.raises(DatasetError, match="no _unlabelled/ folder"):
        LabelStore(collected.root / "circle")


def test_concurrent_labels_are_serialised(tmp_path: Path) -> None:
    data = make_collected_dataset(tmp_path / "many", predicted=["circle", "square"] * 12)
    store = LabelStore(data.root)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(ids: list[str]) -> None:
        barrier.wait(timeout=30)
        for sample_id in ids:
            try:
                store.label(f"{sample_id}.jpg", data.predicted[sample_id])
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(list(data.ids[k::6]),)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert files_in(data.root / UNLABELLED) == []
    lines = journal_lines(data.root)
    assert sorted(e["seq"] for e in lines) == list(range(1, 25))
    assert len(files_in(data.root / "square")) == 24 and len(files_in(data.root / "circle")) == 26


# ---------------------------------------------------------------- HTTP API


class Client:
    """A tiny HTTP client for one LabelServer; `host` overrides the Host header."""

    def __init__(self, server: LabelServer) -> None:
        self.server = server

    def request(self, method: str, path: str, body: object = None, token: str | None = "", host: str | None = None,
                content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            hdrs = {"Host": host or f"127.0.0.1:{self.server.port}", **(headers or {})}
            data = None
            if method == "POST":
                data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
                hdrs["Content-Type"] = content_type
                if token is not None:
                    hdrs[TOKEN_HEADER] = self.server.token if token == "" else token
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: object = None, **kw: Any) -> tuple[int, dict[str, Any]]:
        status, _, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw)

    def get_json(self, path: str) -> dict[str, Any]:
        status, _, raw = self.request("GET", path)
        assert status == 200, raw
        return dict(json.loads(raw))


@pytest.fixture
def served(collected: CollectedDataset) -> Iterator[tuple[Client, CollectedDataset]]:
    server = LabelServer(LabelStore(collected.root), port=0).start()
    try:
        yield Client(server), collected
    finally:
        server.stop()


def test_server_binds_loopback_and_serves_the_page_with_token_and_csp(
        served: tuple[Client, CollectedDataset]) -> None:
    client, _ = served
    assert client.server._httpd.server_address[0] == "127.0.0.1"
    status, headers, body = client.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert f'content="{client.server.token}"' in page
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["content-security-policy"])
    assert nonce and f'<script nonce="{nonce.group(1)}">' in page and "frame-ancestors 'none'" in \
        headers["content-security-policy"]
    assert "__EDGECV" not in page and "http://" not in page and "https://" not in page  # self-contained
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


def test_state_and_images(served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    state = client.get_json("/api/state")
    assert [s["id"] for s in state["samples"]] == list(data.ids)
    first = state["samples"][0]
    assert (first["predicted"], first["folder"], first["camera"], first["device"]) == ("circle", "circle", "cam0",
                                                                                        "pi-1")
    assert state["summary"]["left"] == 6 and [c["name"] for c in state["summary"]["classes"]] == [
        "circle", "square", "triangle"]
    status, headers, body = client.request("GET", "/thumb/s00.jpg?v=1")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (48, 64, 3)  # small images are not enlarged
    status, headers, body = client.request("GET", "/image/s00.jpg")
    assert status == 200 and body == (data.root / UNLABELLED / "s00.jpg").read_bytes()


def test_images_outside_unlabelled_are_never_served(served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    (data.root / UNLABELLED / "secret.txt").write_text("secret")
    for path in ("/image/../circle/old0.png", "/image/..%2Fcircle%2Fold0.png", "/thumb/%2e%2e%2fcircle%2fold0.png",
                 "/image/%2Fetc%2Fpasswd", "/image/s00.json", "/image/secret.txt", "/image/_labels.log",
                 "/thumb/..%2F..%2F..%2Fetc%2Fhostname", "/image/%ff.jpg", "/circle/old0.png", "/_unlabelled/s00.jpg"):
        status, headers, body = client.request("GET", path)
        assert status == 404, (path, status)
        assert headers["content-type"].startswith("application/json") and "error" in json.loads(body)


def test_post_needs_the_token_the_host_and_a_same_origin(served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    body = {"name": "s00.jpg", "class": "circle"}
    assert client.post("/api/label", body, token=None)[0] == 403
    assert client.post("/api/label", body, token="guess")[0] == 403
    assert client.post("/api/label", body, headers={"Origin": "http://evil.example"})[0] == 403
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header
    assert client.post("/api/label", body, host="evil.example:80")[0] == 421
    status, _, _ = client.request("GET", "/api/state", host="evil.example")
    assert status == 421
    status, _, _ = client.request("GET", "/", host="evil.example")
    assert status == 421
    # a cross-site HTML form can only send form/text bodies
    assert client.post("/api/label", b"name=s00.jpg&class=circle", content_type="text/plain")[0] == 400
    assert client.post("/api/label", b"x" * 5000)[0] == 400
    assert client.post("/api/label", b"[1, 2]")[0] == 400
    assert client.post("/api/label", {"name": 3, "class": "circle"})[0] == 400
    assert client.post("/api/nope", {})[0] == 404
    assert "s00.jpg" in files_in(data.root / UNLABELLED) and not (data.root / LABELS_LOG).exists()
    status, reply = client.post("/api/label", body, headers={"Origin": f"http://localhost:{client.server.port}"},
                                host=f"localhost:{client.server.port}")
    assert status == 200 and reply["message"] == "s00 → circle"


def test_api_label_junk_class_undo_round_trip(served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    status, reply = client.post("/api/label", {"name": "s00.jpg", "class": "circle"})
    assert status == 200 and reply["summary"]["left"] == 5
    assert {c["name"]: c["count"] for c in reply["summary"]["classes"]}["circle"] == 3
    status, reply = client.post("/api/junk", {"name": "s01.jpg"})
    assert status == 200 and reply["summary"]["junk"] == 1
    status, reply = client.post("/api/classes", {"name": "bird"})
    assert status == 200 and reply["entry"] == {"seq": 3, "op": "add_class", "name": "bird",
                                                "ts": reply["entry"]["ts"]}
    status, reply = client.post("/api/label", {"name": "s03.jpg", "class": "bird"})
    assert status == 200 and files_in(data.root / "bird") == ["s03.jpg", "s03.json"]
    status, reply = client.post("/api/undo", {})
    assert status == 200 and reply["restored"]["name"] == "s03.jpg" and reply["restored"]["predicted"] == "triangle"
    assert reply["summary"]["undo"] == {"depth": 3, "next": "new class bird"}
    assert files_in(data.root / "bird") == [] and "s03.jpg" in files_in(data.root / UNLABELLED)


def test_api_errors_map_to_statuses_and_change_nothing(served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    before = sorted(str(p.relative_to(data.root.parent)) for p in data.root.parent.rglob("*"))
    assert client.post("/api/label", {"name": "../circle/old0.png", "class": "square"})[0] == 404
    assert client.post("/api/label", {"name": "s00.jpg", "class": "../../escaped"})[0] == 400
    assert client.post("/api/label", {"name": "s00.jpg", "class": "_junk"})[0] == 400
    assert client.post("/api/label", {"name": "s00.jpg", "class": "zebra"})[0] == 409
    for name in BAD_CLASS_NAMES:
        status, reply = client.post("/api/classes", {"name": name})
        assert status == 400 and "not allowed" in reply["error"]
    status, reply = client.post("/api/undo", {})
    assert status == 409 and reply["error"] == "Nothing to undo"
    assert sorted(str(p.relative_to(data.root.parent)) for p in data.root.parent.rglob("*")) == before


def test_tiff_is_converted_for_the_browser_and_an_unreadable_image_says_so(
        served: tuple[Client, CollectedDataset]) -> None:
    client, data = served
    cv2.imwrite(str(data.root / UNLABELLED / "t.tif"), np.full((20, 30, 3), 99, np.uint8))
    (data.root / UNLABELLED / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    status, headers, body = client.request("GET", "/image/t.tif")
    assert status == 200 and headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (20, 30, 3)
    assert client.request("GET", "/thumb/broken.jpg")[0] == 415
    assert client.post("/api/junk", {"name": "broken.jpg"})[0] == 200  # still sortable into _junk


# ---------------------------------------------------------------- the command


def test_edgecv_label_prints_the_url_opens_it_serves_and_stops_on_sigterm(collected: CollectedDataset,
                                                                          tmp_path: Path) -> None:
    opened = tmp_path / "opened.txt"
    fake_browser = tmp_path / "browser.sh"  # webbrowser runs $BROWSER with the URL as its argument
    fake_browser.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}.tmp && mv {opened}.tmp {opened}\n')
    fake_browser.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "edgecv.tools.cli", "label", str(collected.root), "--port", "0",
                             "--open"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BROWSER": str(fake_browser)})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert first.startswith("6 image(s) to label in") and "3 class(es)" in first
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", second)
        assert match, second
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/api/state")
        assert json.loads(conn.getresponse().read())["summary"]["left"] == 6
        conn.close()
        # --open starts the browser before the command settles to wait; wait for its file (a condition)
        deadline = time.monotonic() + 60
        while not opened.exists() and time.monotonic() < deadline and proc.poll() is None:
            threading.Event().wait(0.05)
        assert opened.read_text() == match.group(0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Stopped. 6 image(s) left" in out


def test_edgecv_label_on_a_taken_port_says_so(collected: CollectedDataset) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgecv.tools.cli", "label", str(collected.root), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_edgecv_label_on_a_wrong_folder_is_one_line_and_nonzero(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgecv.tools.cli", "label", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "has no _unlabelled/ folder" in proc.stderr
    assert "Traceback" not in proc.stderr
