"""The HTTP side of `edgecv label`: a standard-library ThreadingHTTPServer on 127.0.0.1 serving one
self-contained page, the waiting samples' images and a small JSON API over a LabelStore.

Safety: it binds 127.0.0.1 only. It answers only requests whose Host header names it, so a page on a
DNS-rebinding domain cannot talk to it. Every state-changing request is a POST with a JSON body and the
per-run token in the X-Edgecv-Token header: a page of another origin can neither read the token nor send
that header without a CORS preflight, which this server never grants. Names from the page are looked up or
validated by the store before they touch the file system, and only images waiting in `_unlabelled` are
served.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from edgecv.tools.errors import DatasetError, LabelError, NameNotAllowedError, ToolsError, UnknownSampleError
from edgecv.tools.label.images import ThumbnailCache, browser_image
from edgecv.tools.label.store import LabelStore, Outcome

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TOKEN_HEADER = "X-Edgecv-Token"
MAX_BODY = 4096
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin"}


def load_page() -> str:
    """The page template shipped beside this module (package data)."""
    return resources.files("edgecv.tools.label").joinpath("page.html").read_text(encoding="utf-8")


class LabelServer:
    """Serves `store` on http://127.0.0.1:<port>/ (port 0: any free port). `start()` runs it on a thread,
    `serve_forever()` on the caller's; `stop()` ends either."""

    def __init__(self, store: LabelStore, port: int = 0, token: str | None = None) -> None:
        if not 0 <= port <= 65535:
            raise ToolsError(f"Port {port} is out of range: use 1-65535, or 0 for any free port")
        self.store = store
        self.token = token or secrets.token_urlsafe(32)
        self.thumbnails = ThumbnailCache()
        self._template = load_page()
        try:
            self._httpd = _HTTPServer((HOST, port), _Handler, self)
        except OSError as exc:
            raise ToolsError(f"Cannot listen on {HOST}:{port}: {exc.strerror or exc}; pass --port with another "
                             "port, or --port 0 for any free one") from exc
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{HOST}:{self.port}/"
        self.allowed_hosts = {f"{HOST}:{self.port}", f"localhost:{self.port}"}
        self.allowed_origins = {f"http://{h}" for h in self.allowed_hosts}
        self._thread: threading.Thread | None = None

    def page(self, nonce: str) -> bytes:
        return (self._template.replace("__EDGECV_TOKEN__", self.token)
                .replace("__EDGECV_NONCE__", nonce).encode("utf-8"))

    def start(self) -> LabelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgecv-label", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving (from any thread but the serving one) and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LabelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- API

    def state(self) -> dict[str, Any]:
        samples, summary = self.store.state()
        return {"root": str(self.store.root), "samples": [s.to_json() for s in samples],
                "summary": summary.to_json(), "repaired": self.store.repaired,
                "journal_skipped": self.store.journal.skipped_lines}

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one state-changing request; raises the store's errors (the handler maps them to statuses)."""
        outcome: Outcome
        if route == "/api/label":
            outcome = self.store.label(_field(body, "name"), _field(body, "class"))
        elif route == "/api/junk":
            outcome = self.store.junk(_field(body, "name"))
        elif route == "/api/classes":
            outcome = self.store.add_class(_field(body, "name"))
        elif route == "/api/undo":
            outcome = self.store.undo()
        else:
            raise KeyError(route)
        return {"message": outcome.message, "summary": outcome.summary.to_json(), "entry": outcome.entry.to_json(),
                "restored": outcome.restored.to_json() if outcome.restored else None}


def _field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise _BadRequest(f"The request needs {key!r} as a string")
    return value


class _BadRequest(Exception):
    """A malformed request (status 400); the message goes back to the page."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR (http.server's default) lets a restart take the port while old connections linger in
    # TIME_WAIT; on Linux it never lets two servers listen on one port, so a second `edgecv label` still fails.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], app: LabelServer) -> None:
        self.app = app
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "edgecv-label"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ---------------------------------------------------------------- responses

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in {**_COMMON_HEADERS, **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (reload, closed tab)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        if self.headers.get("Host", "") in self.server.app.allowed_hosts:
            return True
        self._error(HTTPStatus.MISDIRECTED_REQUEST, "Wrong Host header: open the URL that 'edgecv label' printed")
        return False

    # ---------------------------------------------------------------- GET

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        path = urlsplit(self.path).path
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
            self._send(200, app.page(nonce), "text/html; charset=utf-8",
                       {"Cache-Control": "no-store", "Content-Security-Policy": csp})
        elif path == "/api/state":
            try:
                self._json(200, app.state())
            except DatasetError as exc:
                self._error(500, str(exc))
        elif path.startswith(("/thumb/", "/image/")):
            self._image(path)
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"No such page: {path}")

    def _image(self, path: str) -> None:
        kind, _, quoted = path[1:].partition("/")
        app = self.server.app
        try:
            file = app.store.image_path(unquote(quoted, errors="strict"))
        except (UnknownSampleError, UnicodeDecodeError):
            self._error(404, "Not an image waiting in _unlabelled")
            return
        if kind == "thumb":
            data = app.thumbnails.get(file)
            result = (data, "image/jpeg") if data is not None else None
        else:
            result = browser_image(file)
        if result is None:
            self._error(415, f"{file.name} cannot be read as an image")
            return
        # URLs carry ?v=<mtime>, so a changed file gets a new URL: the browser may keep what it has.
        self._send(200, result[0], result[1], {"Cache-Control": "private, max-age=86400"})

    # ---------------------------------------------------------------- POST

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        origin = self.headers.get("Origin")
        token = self.headers.get(TOKEN_HEADER, "")
        if (origin is not None and origin not in app.allowed_origins) or not hmac.compare_digest(
                token.encode("utf-8", "replace"), app.token.encode("utf-8")):
            self._error(403, "Missing or wrong token: reload the page that 'edgecv label' serves")
            return
        route = urlsplit(self.path).path
        if route not in ("/api/label", "/api/junk", "/api/classes", "/api/undo"):
            self._error(404, f"No such action: {route}")
            return
        try:
            body = self._read_json()
            self._json(200, app.post(route, body))
        except _BadRequest as exc:
            self._error(400, str(exc))
        except NameNotAllowedError as exc:
            self._error(400, str(exc))
        except UnknownSampleError as exc:
            self._error(404, str(exc))
        except LabelError as exc:
            self._error(409, str(exc))
        except (DatasetError, OSError) as exc:
            log.error("%s failed: %s", route, exc)
            self._error(500, f"{route} failed: {exc}")

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get_content_type() != "application/json":
            raise _BadRequest("The request body must be JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("The request needs a Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise _BadRequest(f"The request body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _BadRequest("The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object")
        return body
