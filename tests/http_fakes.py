"""Local HTTP servers that speak the OpenAI and Anthropic protocols, for tests.

They let a test exercise a provider's real SDK end to end on loopback: no network, no key.

Usage::

    from tests.http_fakes import FakeOpenAIServer, FakeAnthropicServer  # run from the repo root

    script = [("status", 429, {"retry-after": "3"}), ("ok", "hello")]
    with FakeOpenAIServer(script) as server:
        provider = OpenAIProvider(base_url=server.base_url)  # .../v1
        ...
        server.requests[0].path  # "/v1/chat/completions"
        server.requests[0].body  # the JSON the client sent, as a dict

Each request consumes the next behaviour of the script when the server starts working on it;
once the script is used up every request is answered ``responder(request)`` when a responder
was given (a function of the ``RecordedRequest`` returning a behaviour), else ``("ok", "ok")``. A path the server does
not serve gets a 404 in the provider's error format, is recorded, and consumes nothing.
Behaviours:

- ``("ok", text)``: a well-formed reply whose content is ``text``, with token usage.
- ``("empty", None)``: a well-formed reply with no text (OpenAI content ``""``, Anthropic no
  content blocks), with usage: what a reasoning model that spent its budget thinking sends.
- ``("cutoff", text)``: like ``ok``, but cut off by the token limit (OpenAI finish_reason
  ``length``, Anthropic stop_reason ``max_tokens``).
- ``("reply", spec)``: a reply built from the dict ``spec``, every key optional:
  ``text`` (None for OpenAI's ``content: null``); ``reasoning`` (OpenAI: the message field
  named by ``reasoning_field``, default ``reasoning_content``); ``refusal`` (OpenAI);
  ``content`` (Anthropic: the list of content blocks, replacing ``text``; a thinking block
  is ``{"type": "thinking", "thinking": ..., "signature": ...}``); ``cut_off`` (True: the
  protocol's token-limit reason); ``finish_reason`` (OpenAI) or ``stop_reason`` (Anthropic)
  verbatim; ``usage``: overrides of the reported counts, for OpenAI ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``reasoning_tokens`` (the last two go into the
  ``*_tokens_details`` objects), for Anthropic ``input_tokens``, ``output_tokens``,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens``, ``thinking_tokens``.
- ``("status", code)`` or ``("status", code, headers)``: an error reply with that HTTP status,
  the provider's error JSON and the extra response headers (e.g. ``{"retry-after": "3"}``).
- ``("error", code, body)`` or ``("error", code, body, headers)``: an error reply whose JSON body
  is ``body`` verbatim (see the ``*_BODY`` constants for real servers' bodies).
- ``("context_window", None)``: the provider's own 400 for a prompt longer than the context.
- ``("sleep", seconds)``: wait, then reply ``ok`` (makes a client with a short time-out give up).
- ``("garbage", raw_bytes)``: status 200, content type JSON, body ``raw_bytes`` verbatim.

``one_at_a_time=True`` serves requests strictly one after another in order of arrival, the
way llama.cpp's server with one slot or Ollama on a laptop does: the others wait their turn.

``server.requests`` lists every request received, in order of arrival, as ``RecordedRequest``
records: method, path, headers, body, and what the server did with it: ``arrived``,
``started`` and ``ended`` (``time.monotonic()`` seconds: read, turn began, reply written or
found unwanted), ``abandoned`` (the client hung up before the reply was written) and
``usage`` ((prompt, completion) tokens a 200 reply reported, counting Anthropic cache reads
and writes into the prompt as the providers do). ``server.reported_usage()`` totals the usage
of the replies the client received. The server fills a record in while it works: call
``server.wait_idle()`` before reading ``ended`` or ``abandoned`` of a request the client gave up.

``server.base_url`` ends in ``/v1`` for OpenAI (what the OpenAI SDK expects) and is the bare
origin for Anthropic (the SDK appends ``/v1/messages``). OpenAI also answers
``/chat/completions`` without the ``/v1`` prefix, as local servers do; ``server.origin``
(``http://127.0.0.1:<port>``) reaches it and stays readable after stop. Outside a ``with``
block call ``start()`` and ``stop()``. Unless a spec says otherwise, successful replies report
``PROMPT_TOKENS`` and ``COMPLETION_TOKENS`` as usage. A 401 from the OpenAI fake echoes a
masked key as OpenAI does, so tests can check that providers scrub it.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

Behaviour = tuple  # (kind, argument[, more]): see the module docstring

PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7

# Whole error bodies of real servers, for ("error", status, body).
OPENAI_CONTEXT_WINDOW_BODY = {"error": {
    "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in "
               "130542 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
}}
VLLM_CONTEXT_WINDOW_BODY = {
    "object": "error", "type": "BadRequestError", "param": None, "code": 400,
    "message": "This model's maximum context length is 4096 tokens. However, you requested 4608 tokens "
               "(4096 in the messages, 512 in the completion). Please reduce the length of the messages or "
               "completion.",
}
LLAMA_CPP_CONTEXT_WINDOW_BODY = {"error": {
    "code": 400, "message": "the request exceeds the available context size, try increasing it",
    "type": "exceed_context_size_error", "n_prompt_tokens": 5012, "n_ctx": 4096,
}}
ANTHROPIC_CONTEXT_WINDOW_BODY = {"type": "error", "error": {
    "type": "invalid_request_error", "message": "prompt is too long: 208310 tokens > 200000 maximum",
}}
OPENAI_UNSUPPORTED_TEMPERATURE_BODY = {"error": {
    "message": "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) "
               "value is supported.",
    "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value",
}}


@dataclass
class RecordedRequest:
    """One request as received, and what became of it (filled in while the server works)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or the raw text when the body was not JSON
    arrived: float = 0.0
    started: float | None = None
    ended: float | None = None
    abandoned: bool = False
    usage: tuple[int, int] | None = None


class _FakeServer:
    """The shared machinery: a threaded server, a script, a request log. Subclasses say which
    paths they serve and how their replies and error bodies look."""

    paths: tuple[str, ...] = ()
    url_suffix = ""
    context_window_body: dict = {}  # the protocol's real 400 for a prompt too long

    def __init__(self, script: Sequence[Behaviour] = (), *, one_at_a_time: bool = False,
                 responder: Callable[[RecordedRequest], Behaviour] | None = None) -> None:
        self._script = list(script)
        self._responder = responder
        self.one_at_a_time = one_at_a_time
        self._lock = threading.Lock()
        self._turns = threading.Condition()  # tickets in order of arrival, for one_at_a_time
        self._next_ticket = 0
        self._serving = 0
        self._in_flight = 0
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

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is being handled (every record is complete)."""
        with self._turns:
            if not self._turns.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"fake server still busy after {timeout}s")

    def reported_usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens summed over the replies the client received."""
        with self._lock:
            delivered = [r.usage for r in self.requests if r.usage and not r.abandoned]
        return sum(u[0] for u in delivered), sum(u[1] for u in delivered)

    # -- per-request logic ------------------------------------------------------------------

    def _arrive(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
        with self._turns:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._turns:
            self._in_flight -= 1
            self._turns.notify_all()

    def _wait_turn(self) -> int | None:
        if not self.one_at_a_time:
            return None
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._serving == ticket)
        return ticket

    def _end_turn(self, ticket: int | None) -> None:
        if ticket is not None:
            with self._turns:
                self._serving += 1
                self._turns.notify_all()

    def _next_behaviour(self, request: RecordedRequest) -> Behaviour:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return self._responder(request) if self._responder else ("ok", "ok")

    def _respond(self, behaviour: Behaviour, request: RecordedRequest
                 ) -> tuple[int, bytes, dict[str, str], tuple[int, int] | None]:
        """(status, body, extra headers, usage reported) for one behaviour."""
        kind, arg, *more = behaviour
        spec: dict | None = None
        if kind == "sleep":
            time.sleep(arg)
            spec = {"text": "ok"}
        elif kind == "ok":
            spec = {"text": arg}
        elif kind == "empty":
            spec = {"text": ""}
        elif kind == "cutoff":
            spec = {"text": arg, "cut_off": True}
        elif kind == "reply":
            spec = dict(arg)
        if spec is not None:
            body, usage = self.reply_body(spec, request)
            return 200, _json(body), {}, usage
        if kind == "status":
            return arg, _json(self.error_body(arg, request)), (more[0] if more else {}), None
        if kind == "error":
            return arg, _json(more[0]), (more[1] if len(more) > 1 else {}), None
        if kind == "context_window":
            return 400, _json(self.context_window_body), {}, None
        if kind == "garbage":
            return 200, arg if isinstance(arg, bytes) else str(arg).encode(), {}, None
        raise ValueError(f"unknown fake-server behaviour {kind!r}")

    def reply_body(self, spec: dict, request: RecordedRequest) -> tuple[dict, tuple[int, int]]:
        """The protocol's 200 body for a reply spec, and the (prompt, completion) it reports."""
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
                request = RecordedRequest("POST", path, headers, body, arrived=time.monotonic())
                server._arrive(request)
                try:
                    if path not in server.paths:
                        # Recorded but not scripted: a wrong endpoint is what a test wants to see.
                        request.started = time.monotonic()
                        self._send(request, 404, _json(server.error_body(404, request)))
                        return
                    ticket = server._wait_turn()
                    try:
                        request.started = time.monotonic()
                        status, payload, extra, usage = server._respond(server._next_behaviour(request), request)
                        request.usage = usage
                        self._send(request, status, payload, extra)
                    finally:
                        server._end_turn(ticket)
                finally:
                    server._leave()

            def _send(self, request: RecordedRequest, status: int, payload: bytes,
                      extra: dict[str, str] | None = None) -> None:
                if self._client_gone():
                    request.abandoned = True
                else:
                    try:
                        self.send_response(status)
                        self.send_header("content-type", "application/json")
                        self.send_header("content-length", str(len(payload)))
                        for name, value in (extra or {}).items():
                            self.send_header(name, value)
                        self.end_headers()
                        self.wfile.write(payload)
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        request.abandoned = True  # the client gave up; nothing to tell it
                request.ended = time.monotonic()
                if request.abandoned:
                    self.close_connection = True

            def _client_gone(self) -> bool:
                """Whether the client closed its end while it waited (a time-out): with no
                request pipelined behind this one, a readable socket with nothing to read is
                one the client hung up."""
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


class FakeOpenAIServer(_FakeServer):
    """Serves ``POST /v1/chat/completions`` (and ``/chat/completions``) like the OpenAI API."""

    paths = ("/v1/chat/completions", "/chat/completions")
    url_suffix = "/v1"
    context_window_body = OPENAI_CONTEXT_WINDOW_BODY

    def reply_body(self, spec: dict, request: RecordedRequest) -> tuple[dict, tuple[int, int]]:
        message: dict[str, Any] = {"role": "assistant", "content": spec.get("text", "ok")}
        if spec.get("reasoning") is not None:
            message[spec.get("reasoning_field", "reasoning_content")] = spec["reasoning"]
        if "refusal" in spec:
            message["refusal"] = spec["refusal"]
        finish = spec.get("finish_reason", "length" if spec.get("cut_off") else "stop")
        counts = spec.get("usage", {})
        prompt = counts.get("prompt_tokens", PROMPT_TOKENS)
        completion = counts.get("completion_tokens", COMPLETION_TOKENS)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if "cached_tokens" in counts:
            usage["prompt_tokens_details"] = {"cached_tokens": counts["cached_tokens"]}
        if "reasoning_tokens" in counts:
            usage["completion_tokens_details"] = {"reasoning_tokens": counts["reasoning_tokens"]}
        body = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model(request),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
        return body, (prompt, completion)

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
    context_window_body = ANTHROPIC_CONTEXT_WINDOW_BODY

    def reply_body(self, spec: dict, request: RecordedRequest) -> tuple[dict, tuple[int, int]]:
        text = spec.get("text", "ok")
        content = spec["content"] if "content" in spec else ([{"type": "text", "text": text}] if text else [])
        stop = spec.get("stop_reason", "max_tokens" if spec.get("cut_off") else "end_turn")
        counts = spec.get("usage", {})
        usage: dict[str, Any] = {
            "input_tokens": counts.get("input_tokens", PROMPT_TOKENS),
            "output_tokens": counts.get("output_tokens", COMPLETION_TOKENS),
            "cache_read_input_tokens": counts.get("cache_read_input_tokens", 0),
            "cache_creation_input_tokens": counts.get("cache_creation_input_tokens", 0),
        }
        if "thinking_tokens" in counts:
            usage["output_tokens_details"] = {"thinking_tokens": counts["thinking_tokens"]}
        body = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": _model(request),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
        return body, (prompt, usage["output_tokens"])

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
