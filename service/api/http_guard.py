"""uvicorn's httptools protocol with the two guards it lacks against slow or hostile clients.

- **Header deadline**: a connection must deliver a request's complete headers within
  ``header_timeout_s`` of connecting (or of its previous response): 408, connection closed. uvicorn's
  keep-alive timer stops at the first byte of a request, so a client trickling headers a byte at a
  time would otherwise hold the connection forever.
- **Header size**: request line plus headers beyond ``max_header_bytes``: 431, connection closed
  (httptools itself accepts a 1 MB header line).

- **Write deadline**: an answer the client does not take (its window stays shut while the front-end
  holds more than the transport's high-water mark of it) must resume within ``write_timeout_s``, else
  the connection is aborted (``close`` would wait for the buffer to drain, which never happens). A
  client that pipelines many requests and reads nothing otherwise held its connection, and the answer
  in memory, for as long as it liked.

The two refusals happen before the app runs, so nothing is admitted or counted in flight; they are
counted in ``tome_rejections_total`` (``timeout``, ``too_large``) through ``on_refuse``. The service
may answer before it has read a request's body (an early 503 or 400); uvicorn then keeps the connection
and parses the rest of that body, so those bytes are not the next request's headers: the size guard
starts counting only once the body is complete, and a header deadline that passes while the body is
still arriving just closes the connection (its answer has been sent). Pipelined requests (HTTP/1.1 lets a
client send the next before the answer) are sized one by one, and one whose headers are already in is not
timed again when the answer before it completes.

**Malformed requests**: a request httptools cannot parse is a JSON 400 in the service's error shape,
counted as a ``bad_request`` rejection and logged at DEBUG. uvicorn answered it in plain text and logged a
WARNING for each: one client could write thousands of log lines a second and no metric showed it. An
``Upgrade:`` the service does not follow (it serves no WebSocket: ``ws="none"``) is ignored at DEBUG too.

A request with a body that asks to switch protocols (``Connection: Upgrade`` and ``Upgrade:``, e.g. the
``Upgrade: h2c`` of ``curl --http2``) is a 400 saying so, connection closed: the parser hands everything
after its headers to the new protocol, so its body never reached the app (a misleading 422 "empty body"),
and ``Upgrade: websocket`` passed the connection to a WebSocket handshake that never answered nor timed
out. The service switches to no protocol; an Upgrade on a request without a body is ignored as before.

When a connection ends, uvicorn marks only its newest request disconnected (``self.cycle``: with pipelining,
one still queued), not the one whose answer is being written, which then writes to the closed transport
(uvloop raises: an ERROR traceback for each pipelining client that leaves mid-answer). The protocol keeps
the request it is running and marks that one too.

**Early answers**: with ``answer_early`` (``api.shedding``), a request whose headers are in while nothing
else runs on its connection is offered to it first; an answer it returns (a 503 under overload) is written
at once, without an ASGI task, scope or middleware, and the request's body is read and discarded (closing
with a body unread would reset the connection, and the client could lose the answer). The rest of that
body must arrive within ``header_timeout_s``, like any body after an early answer. The connection is then
kept alive, or closed when the request or the answer says so; after an ``Expect: 100-continue`` no body
follows, so it is closed at once.

It also reads a connection's addresses from the transport's ``sockname``/``peername``: uvicorn asks for
the ``socket``, which uvloop builds anew for every connection (measured: 22% of a front-end's event
loop with one connection per request).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools
from starlette.responses import Response
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import is_ssl

log = logging.getLogger(__name__)

READ_CHUNK_MARGIN = 256 * 1024  # bytes fed in one read may run past the headers into the body

# (method, path without its query, lower-cased headers) -> an answer to write at once, or None to go on
EarlyAnswer = Callable[[bytes, bytes, list[tuple[bytes, bytes]]], Response | None]


def _address(info: object) -> tuple[str, int] | None:
    if isinstance(info, list | tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """A request's headers (uvicorn lowercases the names) announce a body."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
        for name, value in headers
    )


def _closes(response: Response) -> bool:
    return any(name == b"connection" and b"close" in value.lower() for name, value in response.raw_headers)


def _wire(response: Response, default_headers: list[tuple[bytes, bytes]], close: bool) -> bytes:
    """``response`` (a whole body) as HTTP/1.1 bytes, uvicorn's default headers (date, server) first."""
    headers = [*default_headers, *response.raw_headers]
    if close and not _closes(response):
        headers.append((b"connection", b"close"))
    lines = b"".join(b"%s: %s\r\n" % header for header in headers)
    status = response.status_code
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, HTTPStatus(status).phrase.encode(), lines, response.body)


def guarded_protocol(
    header_timeout_s: float,
    max_header_bytes: int,
    on_refuse: Callable[[str], None],
    write_timeout_s: float | None = None,
    new_request_id: Callable[[], str] | None = None,
    answer_early: EarlyAnswer | None = None,
) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=..., ws="none")`` with these limits (no write deadline
    when ``write_timeout_s`` is None); its refusals carry a ``new_request_id()`` like the app's errors;
    ``answer_early`` may answer a request as soon as its headers are in (see the module's docstring)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._awaiting_headers = True
            self._header_bytes = 0
            self._raw_bytes = 0
            self._oversized = False
            self._body_pending = False  # between the headers and the end of a request's body
            self._write_timer: asyncio.TimerHandle | None = None
            self._running: RequestResponseCycle | None = None  # the request being answered
            self._upgrade_with_body: bytes | None = None  # the Upgrade asked by a request with a body
            self._discarding = False  # the body of a request answered early is being read and dropped
            self._close_after_body = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # HttpToolsProtocol.connection_made, with the addresses read cheaply
            self.connections.add(self)
            self.transport = transport
            self.flow = FlowControl(transport)
            self.server = _address(transport.get_extra_info("sockname"))
            self.client = _address(transport.get_extra_info("peername"))
            self.scheme = "https" if is_ssl(transport) else "http"
            self._expect_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._cancel_write_timer()
            running = self._running
            if running is not None and not running.response_complete:
                running.disconnected = True  # uvicorn marks only self.cycle, the newest request
                running.message_event.set()
            super().connection_lost(exc)

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def pause_writing(self) -> None:
            super().pause_writing()
            if write_timeout_s is not None and self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout_s, self._write_stalled)

        def resume_writing(self) -> None:
            self._cancel_write_timer()
            super().resume_writing()

        def _cancel_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_stalled(self) -> None:
            self._write_timer = None
            on_refuse("timeout")
            self.transport.abort()  # close() would wait for a buffer the client never takes

        def _expect_headers(self) -> None:
            self._awaiting_headers, self._header_bytes, self._raw_bytes, self._oversized = True, 0, 0, False
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            if self._awaiting_headers and not self.transport.is_closing():
                if self._body_pending:  # the rest of an answered request's body: nothing to say
                    on_refuse("timeout")
                    self.transport.close()
                    return
                self._refuse(408, "timeout", "request headers did not arrive in time")

        def _refuse(self, status: int, code: str, message: str) -> None:
            on_refuse(code)
            error: dict[str, Any] = {"error": {"code": code, "message": message}}
            headers: dict[str, str] = {}
            if new_request_id is not None:
                error["request_id"] = headers["x-request-id"] = new_request_id()
            response = Response(json.dumps(error), status, headers, media_type="application/json")
            self.transport.write(_wire(response, self.server_state.default_headers, close=True))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers and not self._body_pending:
                self._raw_bytes += len(data)
                if self._raw_bytes > max_header_bytes + READ_CHUNK_MARGIN:
                    self._refuse(431, "too_large", f"request headers are over {max_header_bytes} bytes")
                    return
            self._feed(data)
            if self._oversized and not self.transport.is_closing():
                self._refuse(431, "too_large", f"request headers are over {max_header_bytes} bytes")
            if self._upgrade_with_body is not None and not self.transport.is_closing():
                upgrade = self._upgrade_with_body.decode("latin-1")[:40]
                self._refuse(
                    400,
                    "bad_request",
                    f"a request with a body cannot ask to switch protocols (Upgrade: {upgrade}), and this "
                    "service switches to none: send it without the Upgrade header (curl: --http1.1)",
                )

        def _feed(self, data: bytes) -> None:
            """``HttpToolsProtocol.data_received``, a request the parser rejects answered by ``_refuse``."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as e:
                log.debug("malformed HTTP request from %s: %s", self.client, e)
                self._refuse(400, "bad_request", f"malformed HTTP request: {e}")
            except httptools.HttpParserUpgrade:  # with ws="none" an Upgrade is never followed
                if self._upgrade_with_body is None:
                    log.debug("Upgrade ignored from %s", self.client)

        def on_message_begin(self) -> None:
            self._header_bytes, self._oversized = 0, False  # per request: pipelined ones share a read
            self._upgrade_with_body = None
            # a discarded body that ends in this read armed the keep-alive timer (on_message_complete);
            # uvicorn cancels it only when a read begins, and this request came in the same read
            self._unset_keepalive_if_required()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            if self._header_bytes > max_header_bytes:
                self._oversized = True
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._body_pending = True
            self._cancel_header_timer()
            if self._oversized:
                return  # data_received answers 431 once the parser returns
            if self.parser.should_upgrade() and _has_body(self.headers):
                self._upgrade_with_body = next((v for n, v in self.headers if n == b"upgrade"), b"")
                return  # data_received answers 400 once the parser returns
            if answer_early is not None and self._answered_early(answer_early):
                return
            super().on_headers_complete()

        def _answered_early(self, answer_early: EarlyAnswer) -> bool:
            if not (self.cycle is None or self.cycle.response_complete) or self.pipeline:
                return False  # an answer is still being written on this connection: the app answers it
            path = self.url.split(b"?", 1)[0]
            response = answer_early(self.parser.get_method(), path, self.headers)
            if response is None:
                return False
            close = not self.parser.should_keep_alive() or _closes(response) or self.expect_100_continue
            self.transport.write(_wire(response, self.server_state.default_headers, close))
            self._discarding, self._close_after_body = True, close
            if self.expect_100_continue:  # the client sends no body after a final answer
                self.transport.close()
            else:
                self._expect_headers()  # the rest of the body within header_timeout_s (_headers_too_slow)
            return True

        def on_body(self, body: bytes) -> None:
            if self._discarding or self._oversized or self._upgrade_with_body is not None:
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._body_pending = False
            if self._discarding:
                self._discarding = False
                if self._close_after_body:
                    self.transport.close()
                else:
                    self.on_response_complete()  # keep-alive timer, the next request's header deadline
                return
            if self._oversized or self._upgrade_with_body is not None:
                return
            super().on_message_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # the next request's headers are in: it starts now
            super().on_response_complete()
            if not self.transport.is_closing() and not pipelined:
                self._expect_headers()

    return GuardedHttpToolsProtocol
