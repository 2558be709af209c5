"""A local HTTP file server for download tests: Range requests, dropped connections and error statuses.

Usage: `with LocalHttpServer() as server: server.files["/a.bin"] = b"..."; download(server.url("/a.bin"), ...)`.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class RecordedRequest:
    path: str
    range: str | None  # the Range header as sent, if any


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # path -> error status to answer instead (e.g. 500)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> close after this many body bytes, once
    honour_range: bool = True  # False: answer 200 with the whole file, like servers without Range support
    requests: list[RecordedRequest] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState  # set on a subclass per server

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state = self.state
        state.requests.append(RecordedRequest(self.path, self.headers.get("Range")))
        if self.path in state.statuses:
            self.send_error(state.statuses[self.path])
            return
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if requested and state.honour_range:
            start = int(requested.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        end = len(body)
        if self.path in state.drop_after:
            end = start + state.drop_after.pop(self.path)
            self.close_connection = True
        self.wfile.write(body[start:end])


class LocalHttpServer:
    """ThreadingHTTPServer on 127.0.0.1 with a free port, serving `files` from memory in a daemon thread."""

    def __init__(self) -> None:
        self.state = ServerState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval makes shutdown() return quickly at the end of each test.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def files(self) -> dict[str, bytes]:
        return self.state.files

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.state.requests

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def __enter__(self) -> "LocalHttpServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
