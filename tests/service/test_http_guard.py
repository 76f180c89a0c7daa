"""``api.http_guard``'s early answers, against uvicorn in a thread serving a tiny ASGI app: what the
protocol writes itself, what it leaves to the app, and what becomes of the body it does not need."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.responses import Response

from service.api.http_guard import guarded_protocol
from tests.processes import read_response

HEADER_TIMEOUT_S = 0.5
KEEP_ALIVE_S = 1.0  # shorter than /slow; long enough for a loaded host to send the next request in time


class App:
    """Answers every request it sees ``200 app <path>`` after reading its body; ``/slow`` after 1.5 s."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.refused: list[str] = []  # what the protocol counted as refusals (its on_refuse)

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/slow":
            await asyncio.sleep(1.5)
        body = b"app " + scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def refuse_classify(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> Response | None:
    """What ``api.shedding`` does when the front-end is full: POST /classify gets a 503 at once."""
    if method != b"POST" or path != b"/classify":
        return None
    rid = dict(headers).get(b"x-request-id", b"none").decode()
    return Response(b'{"error": "full"}', 503, {"Retry-After": "1", "X-Request-ID": rid}, "application/json")


@contextmanager
def serving(app: App) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = guarded_protocol(HEADER_TIMEOUT_S, 16_384, app.refused.append, answer_early=refuse_classify)
    config = uvicorn.Config(
        app, http=protocol, ws="none", lifespan="off", log_level="warning", timeout_keep_alive=KEEP_ALIVE_S
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def post(path: str, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n%s\r\n"
        % (path.encode(), version, len(body), extra)
        + body
    )


def read_until(s: socket.socket, end: bytes, timeout: float = 5) -> bytes:
    """What the server sends until it ends with ``end`` (answers that may share a segment)."""
    s.settimeout(timeout)
    data = b""
    while not data.endswith(end):
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    return data


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_an_early_answer_skips_the_app_and_its_body_is_discarded_on_a_kept_alive_connection() -> None:
    """Two refusals with 300 KB bodies, then a request the app answers, on one connection: the refusals
    never reach the app, and their bodies are consumed exactly (not parsed as the next request)."""
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        big = b"\xff\xd8" + b"\0" * 300_000
        for i in range(2):
            s.sendall(post("/classify?tier=fast", big, b"X-Request-ID: early-%d\r\n" % i))
            answer = read_response(s, 5)
            head = answer.lower()
            assert answer.startswith("HTTP/1.1 503 Service Unavailable\r\n"), answer
            assert f"x-request-id: early-{i}" in head and "retry-after: 1" in head and "date: " in head
            assert "connection: close" not in head and answer.endswith('{"error": "full"}')
        s.sendall(post("/other", b"abc"))
        assert read_response(s, 5).endswith("app /other")
    assert app.paths == ["/other"]


def test_a_request_in_the_same_read_as_a_discarded_body_is_not_cut_by_the_keep_alive_timer() -> None:
    """The end of a discarded body arms the idle connection's keep-alive timer; a request whose bytes
    came in the same read must not be closed by it while the app answers (/slow outlasts the timer)."""
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(post("/classify", b"\0" * 1000) + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until(s, b"app /slow").startswith(b"HTTP/1.1 503")
    assert app.paths == ["/slow"]


def test_a_request_without_keep_alive_is_closed_once_its_body_is_read() -> None:
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(post("/classify", b"\0" * 100_000, version=b"1.0"))
        answer = read_response(s, 5)
        assert answer.startswith("HTTP/1.1 503") and "connection: close" in answer.lower()
        assert closed_by_server(s, 5)
    assert app.paths == []


def test_after_expect_100_continue_the_connection_is_closed_at_once(caplog) -> None:
    """The client waits for 100 Continue before its body; after a final answer it sends none (and one
    that sends it anyway, in the same read as its headers, costs no error)."""
    app = App()
    with serving(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(post("/classify", b"\0" * 50_000, b"Expect: 100-continue\r\n")[:-50_000])
            answer = read_response(s, 5)
            assert answer.startswith("HTTP/1.1 503") and "connection: close" in answer.lower()
            assert closed_by_server(s, 5)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(post("/classify", b"\0" * 5_000, b"Expect: 100-continue\r\n"))
            assert read_response(s, 5).startswith("HTTP/1.1 503")
            assert closed_by_server(s, 5)
    assert app.paths == [] and app.refused == []  # the stray body is not a malformed request
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_a_body_that_stops_after_an_early_answer_is_cut_off_at_the_header_deadline() -> None:
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(post("/classify", b"\0" * 100_000)[:-50_000])  # half the body, then nothing
        assert read_response(s, 5).startswith("HTTP/1.1 503")
        start = time.monotonic()
        assert closed_by_server(s, 5)
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 1.0


def test_a_request_pipelined_behind_a_running_one_is_left_to_the_app_in_order() -> None:
    """An early answer written while the previous answer is still being made would overtake it."""
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + post("/classify", b"\0" * 1000))
        answers = read_until(s, b"app /classify")
        assert answers.count(b"HTTP/1.1 200") == 2 and answers.index(b"app /slow") < answers.index(
            b"/classify"
        )
    assert app.paths == ["/slow", "/classify"]
