"""JSON over HTTP with a bearer token: what every server of the project shares (the environment
server here, the policy's chat endpoint in the env runners).

An application answers `handle(method, path, authorization, body) -> (status, payload)`;
`JsonServer` puts it behind the standard library's threading HTTP server (one thread per
connection), binding 127.0.0.1 unless told otherwise. A body over `max_body_bytes` is refused
(413), a chunked one too (411); errors are `{"error": {"type", "message"}}`.
"""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

Answer = tuple[int, dict[str, Any]]


class RequestError(Exception):
    """An answer other than 200: its HTTP status, error type and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind

    def answer(self) -> Answer:
        return error(self.status, self.kind, str(self))


def error(status: int, kind: str, message: str) -> Answer:
    return status, {"error": {"type": kind, "message": message}}


def bad(message: str) -> RequestError:
    return RequestError(400, "BadRequest", message)


def body_field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    """`body[name]` checked against `kinds` (a bool is not an int), or a 400 naming the field."""
    if name not in body or body[name] is None:
        if required:
            raise bad(f"field {name!r} is required")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise bad(f"field {name!r}: expected {expected}, got {value!r}")
    return value


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (empty: {}), or a 400."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise bad(f"the body must be a JSON object, got {type(data).__name__}")
    return data


def authorize(authorization: str | None, token: str) -> None:
    """A 401 unless `authorization` is `Bearer <token>`, compared in constant time (the answer's
    timing says nothing about the token)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "Unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")


def plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays (a numpy bool as the string "False" would read as true)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class App(Protocol):
    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> Answer: ...


class JsonServer:
    """`app` behind a threading HTTP server: `start()` serves in a background thread,
    `serve_forever()` in this one; `close()` stops it."""

    def __init__(
        self, app: App, host: str = "127.0.0.1", port: int = 0, max_body_bytes: int = 64 * 1024, token: str | None = None
    ) -> None:
        """`token`: checked from the headers before the body is read (the app checks it too)."""
        self.app = app

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 120  # seconds a connection may idle or stall mid-request
            # Headers and body leave in two writes: with Nagle's algorithm the body waits for the
            # client's delayed ACK of the headers, 40 ms on every call of a kept-alive connection.
            disable_nagle_algorithm = True

            def _body(self) -> bytes | Answer:
                """The request body, or the error answer when it cannot be read."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    return error(411, "LengthRequired", "send a Content-Length, not a chunked body")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    return error(400, "BadRequest", "Content-Length is not a number")
                if length < 0:
                    return error(400, "BadRequest", "Content-Length is negative")
                if length > max_body_bytes:
                    if length <= 16 * max_body_bytes:  # read it, so that the client sees the answer, not a reset
                        self.rfile.read(length)
                    return error(413, "TooLarge", f"body over {max_body_bytes} bytes")
                return self.rfile.read(length) if length else b""

            def _serve(self, method: str) -> None:
                try:
                    if token is not None:
                        authorize(self.headers.get("Authorization"), token)
                    body = self._body()
                except RequestError as err:
                    body = err.answer()
                if isinstance(body, tuple):
                    status, payload = body
                    self.close_connection = True
                else:
                    status, payload = app.handle(method, self.path, self.headers.get("Authorization"), body)
                try:
                    data = json.dumps(payload, default=plain).encode()
                except (TypeError, ValueError) as err:
                    status, payload = error(500, "Unserialisable", f"the answer is not JSON: {err}")
                    data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: object) -> None:  # one line per request would drown the terminal
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self._serving = False

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> JsonServer:
        self._serving = True  # before the thread runs: a close() right away still stops it
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `close()` (or Ctrl-C)."""
        self._serving = True
        self._http.serve_forever()

    def close(self) -> None:
        """Stop serving."""
        if self._serving:
            self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> JsonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
