"""A small reverse proxy that records every exchange it forwards, for benchmarks against a local
OpenAI-compatible server.

Each client request is forwarded as it came (method, path, headers, body) on a fresh upstream
connection, read back whole, then written to the client. The client side keeps connections alive
(HTTP/1.1), as the OpenAI client expects. Per exchange it records when the request arrived, when
it went upstream and when the upstream reply was back, the status, the `usage` of a successful
JSON reply, and whether the client had hung up before the reply could be written to it (an
abandoned request: sent, never read).

A hang-up is passed on the way the server would have seen it without the proxy. A request still
waiting in the server's queue (not the oldest one outstanding: a one-slot server works on its
requests in arrival order) has its upstream connection closed, so the server drops it when its
turn comes (llama-cpp-python's server checks for a gone client before it starts a request). The
request being worked on is held until its reply comes, since that server does not stop a
non-streaming completion whose client has gone either. So the server does the same work as
without the proxy, and the time with at least one request outstanding upstream (not counting
dropped ones) is the server's busy time.
"""

from __future__ import annotations

import gzip
import http.client
import json
import select
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that describe one connection, not the message: never forwarded.
HOP_BY_HOP = (
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade",
)  # fmt: skip


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    arrived: float  # time.time() when the whole request had been read from the client
    sent: float  # when it went upstream
    returned: float  # when the whole upstream reply was back (the upstream call failed, or was dropped)
    status: int  # upstream status; 502 when the upstream call failed, 499 when dropped on a hang-up
    abandoned: bool  # the client had hung up before the reply was written to it
    dropped: bool = False  # abandoned while queued: closed upstream, so the server skipped it
    hung_up: float | None = None  # when the proxy saw the client hang up (polled every 0.1 s)
    prompt_tokens: int = 0  # from the reply's `usage` (successful JSON replies only)
    completion_tokens: int = 0
    upstream_error: str | None = None


class RecordingProxy:
    """Forwards http://127.0.0.1:<port> to an upstream host:port and records each exchange."""

    def __init__(self, upstream_host: str, upstream_port: int, upstream_timeout: float = 3600.0):
        self.upstream = (upstream_host, upstream_port)
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._outstanding: list[object] = []  # tokens of requests sent upstream, oldest first
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> RecordingProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def outstanding(self) -> int:
        """Requests sent upstream whose reply has not come back yet."""
        with self._lock:
            return len(self._outstanding)

    def _began(self) -> object:
        token = object()
        with self._lock:
            self._outstanding.append(token)
        return token

    def _is_oldest(self, token: object) -> bool:
        with self._lock:
            return bool(self._outstanding) and self._outstanding[0] is token

    def _ended(self, token: object, exchange: Exchange) -> None:
        with self._lock:
            self._outstanding.remove(token)
            self._exchanges.append(exchange)


class _Dropped(Exception):
    """The client hung up while its request waited in the server's queue."""


def _handler_for(proxy: RecordingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive towards the client

        def do_GET(self) -> None:
            self._forward()

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass  # the records are the log

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            arrived = time.time()
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
            token = proxy._began()
            sent = time.time()
            self._hung_up: float | None = None
            error, dropped = None, False
            try:
                status, reason, reply_headers, reply_body = self._upstream_call(token, headers, body)
            except _Dropped:
                dropped, status, reason, reply_headers, reply_body = True, 499, "Client Closed Request", [], b""
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                status, reason, reply_headers = 502, "Bad Gateway", [("Content-Type", "text/plain")]
                reply_body = f"recording proxy: upstream failed: {error}".encode()
            returned = time.time()
            if self._hung_up is None and _client_gone(self.connection):
                self._hung_up = returned
            abandoned = self._hung_up is not None or not self._reply(status, reason, reply_headers, reply_body)
            if abandoned:
                self.close_connection = True
            prompt, completion = _usage(status, reply_headers, reply_body)
            proxy._ended(token, Exchange(self.command, self.path, arrived, sent, returned, status, abandoned,
                                         dropped, self._hung_up, prompt, completion, error))

        def _upstream_call(self, token: object, headers, body: bytes):
            # A fresh connection per request: an idle kept-alive upstream connection would be
            # closed by the server's own keep-alive timeout and fail the next request.
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                conn.endheaders(body or None)
                self._wait_for_reply(token, conn.sock)
                response = conn.getresponse()
                reply_body = response.read()
                return response.status, response.reason, response.getheaders(), reply_body
            finally:
                conn.close()

        def _wait_for_reply(self, token: object, upstream: socket.socket) -> None:
            """Block until the upstream reply starts, watching the client meanwhile."""
            deadline = time.monotonic() + proxy.upstream_timeout
            watched = [upstream, self.connection]
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no upstream reply in {proxy.upstream_timeout:g}s")
                readable, _, _ = select.select(watched, [], [], min(left, 0.1))
                if upstream in readable:
                    return
                if self.connection in readable:
                    watched = [upstream]  # gone, or (never with the OpenAI client) sent more
                    if _client_gone(self.connection):
                        self._hung_up = time.time()
                if self._hung_up is not None and not proxy._is_oldest(token):
                    raise _Dropped()  # the caller closes the connection; the server skips it

        def _reply(self, status: int, reason: str, headers, body: bytes) -> bool:
            """Write the reply; False when the client turned out to be gone."""
            try:
                self.send_response_only(status, reason)
                for key, value in headers:
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.wfile.flush()
                return True
            except (BrokenPipeError, ConnectionResetError):
                return False

    return Handler


def _client_gone(sock: socket.socket) -> bool:
    """The client closed its end: readable, and reading would give end of file (or a reset).
    The OpenAI client sends nothing more on a connection until it has read the reply, so a
    readable socket here means a hang-up (its own time-out)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _usage(status: int, headers, body: bytes) -> tuple[int, int]:
    if status != 200:
        return 0, 0
    encoding = next((v.lower() for k, v in headers if k.lower() == "content-encoding"), "")
    try:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        usage = json.loads(body).get("usage") or {}
    except (ValueError, OSError, AttributeError, zlib.error):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def busy_seconds(exchanges: list[Exchange]) -> float:
    """Time with at least one request outstanding upstream (dropped ones left out: the server
    never worked on them, and an older request was outstanding all the while)."""
    return union_seconds([(e.sent, e.returned) for e in exchanges if not e.dropped])


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total
