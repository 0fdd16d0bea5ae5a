"""Local HTTP servers that speak the OpenAI and Anthropic protocols, for tests.

They let a test exercise a provider's real SDK end to end on loopback: no network, no key.

Usage::

    from tests.http_fakes import FakeOpenAIServer, FakeAnthropicServer  # run from the repo root

    script = [("status", 429), ("ok", "hello")]
    with FakeOpenAIServer(script) as server:
        provider = OpenAIProvider(base_url=server.base_url)  # .../v1
        ...
        server.requests[0].path  # "/v1/chat/completions"
        server.requests[0].body  # the JSON the client sent, as a dict

Each request consumes the next behaviour of the script; once the script is used up every
request is answered ``("ok", "ok")``. A path the server does not serve gets a 404 in the
provider's error format, is recorded, and consumes nothing. Behaviours:

- ``("ok", text)``: a well-formed reply whose content is ``text``, with token usage.
- ``("status", code)``: an error reply with that HTTP status and the provider's error JSON.
- ``("sleep", seconds)``: wait, then reply ``ok`` (makes a client with a short time-out give up).
- ``("garbage", raw_bytes)``: status 200, content type JSON, body ``raw_bytes`` verbatim.

``server.requests`` lists every request received, in order, as ``RecordedRequest`` records
(method, path, headers, body). ``server.base_url`` ends in ``/v1`` for OpenAI (what the
OpenAI SDK expects) and is the bare origin for Anthropic (the SDK appends ``/v1/messages``).
OpenAI also answers ``/chat/completions`` without the ``/v1`` prefix, as local servers do;
``server.origin`` (``http://127.0.0.1:<port>``) reaches it and stays readable after stop.
Outside a ``with`` block call ``start()`` and ``stop()``. Successful replies report
``PROMPT_TOKENS`` and ``COMPLETION_TOKENS`` as usage. A 401 from the OpenAI fake echoes a
masked key as OpenAI does, so tests can check that providers scrub it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

Behaviour = tuple[str, Any]

PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or the raw text when the body was not JSON


class _FakeServer:
    """The shared machinery: a threaded server, a script, a request log. Subclasses say which
    paths they serve and how their replies and error bodies look."""

    paths: tuple[str, ...] = ()
    url_suffix = ""

    def __init__(self, script: Sequence[Behaviour] = ()) -> None:
        self._script = list(script)
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._origin: str | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "_FakeServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True  # a sleeping handler must not block shutdown
        host, port = self._httpd.server_address[:2]
        self._origin = f"http://{host}:{port}"
        # A short poll interval makes stop() quick: shutdown waits for the next poll.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "_FakeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>``; still readable after stop, for asserting on messages."""
        if self._origin is None:
            raise RuntimeError("server not started: use it as a context manager or call start()")
        return self._origin

    @property
    def base_url(self) -> str:
        return self.origin + self.url_suffix

    # -- per-request logic ------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_behaviour(self, request: RecordedRequest) -> Behaviour:
        with self._lock:
            self.requests.append(request)
            return self._script.pop(0) if self._script else ("ok", "ok")

    def _respond(self, behaviour: Behaviour, request: RecordedRequest) -> tuple[int, bytes]:
        kind, arg = behaviour
        if kind == "sleep":
            time.sleep(arg)
            return 200, _json(self.ok_body("ok", request))
        if kind == "ok":
            return 200, _json(self.ok_body(arg, request))
        if kind == "status":
            return arg, _json(self.error_body(arg, request))
        if kind == "garbage":
            return 200, arg if isinstance(arg, bytes) else str(arg).encode()
        raise ValueError(f"unknown fake-server behaviour {kind!r}")

    def ok_body(self, text: str, request: RecordedRequest) -> dict:
        raise NotImplementedError

    def error_body(self, status: int, request: RecordedRequest) -> dict:
        raise NotImplementedError

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real APIs

            def do_POST(self) -> None:  # noqa: N802 (stdlib name)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                path = self.path.split("?", 1)[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = RecordedRequest("POST", path, headers, body)
                if path not in server.paths:
                    # Recorded but not scripted: a wrong endpoint is what a test wants to see.
                    server._record(request)
                    self._send(404, _json(server.error_body(404, request)))
                    return
                behaviour = server._next_behaviour(request)
                status, payload = server._respond(behaviour, request)
                self._send(status, payload)

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out test); nothing to tell it

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


class FakeOpenAIServer(_FakeServer):
    """Serves ``POST /v1/chat/completions`` (and ``/chat/completions``) like the OpenAI API."""

    paths = ("/v1/chat/completions", "/chat/completions")
    url_suffix = "/v1"

    def ok_body(self, text: str, request: RecordedRequest) -> dict:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model(request),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            },
        }

    def error_body(self, status: int, request: RecordedRequest) -> dict:
        kind, code, message = _OPENAI_ERRORS.get(
            status, ("server_error", None, "The server had an error processing your request.")
        )
        if status == 401:  # OpenAI echoes a masked key; providers must scrub it from messages
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            message = f"Incorrect API key provided: {key[:8]}{'*' * 12}{key[-4:]}."
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class FakeAnthropicServer(_FakeServer):
    """Serves ``POST /v1/messages`` like the Anthropic API. ``base_url`` is the bare origin."""

    paths = ("/v1/messages",)
    url_suffix = ""

    def ok_body(self, text: str, request: RecordedRequest) -> dict:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": _model(request),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS},
        }

    def error_body(self, status: int, request: RecordedRequest) -> dict:
        kind, message = _ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
        return {"type": "error", "error": {"type": kind, "message": message}}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _model(request: RecordedRequest) -> str:
    body = request.body
    return str(body.get("model", "fake")) if isinstance(body, dict) else "fake"


# Error bodies as each provider really sends them (type, code, message).
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    503: ("server_error", None, "The engine is currently overloaded."),
}

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "model: not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed size."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    529: ("overloaded_error", "Overloaded"),
}
