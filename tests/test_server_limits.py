"""A server no request can break: an unrepresentable value is a 400 while other requests complete,
huge prompts are refused at once with /health answering meanwhile, request bodies are bounded,
slow clients are disconnected (raw sockets), and requests cut off by the shutdown timeout get a
proper error body or a final error event and [DONE]."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from morserve.api.server import DrainingServer, create_app, uvicorn_config
from morserve.api.state import ServerSettings
from morserve.engine import AsyncLLMEngine, EngineArgs
from tests.test_server import ENGINE, MODEL, ThreadedServer, sse_events, wait_for, write_checkpoint

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
LIMITS = dict(max_request_body_bytes=12 << 20, header_read_timeout=1.0, body_read_timeout=1.0,
              keep_alive_timeout=0.5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("limits") / "tiny", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def srv(ckpt):
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL], **LIMITS)
    server = ThreadedServer(create_app(settings, lambda: AsyncLLMEngine.from_args(
        EngineArgs(model=str(ckpt), **ENGINE)))).start()
    yield server
    server.stop()


def _port(srv) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(closed by the server within `seconds`, what it sent before)."""
    sock.settimeout(0.2)
    got, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


# ---- issue 12, failure 1: one request must not kill the engine --------------------------------------
def test_top_k_2_63_is_a_400_while_other_requests_complete(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client.post, "/v1/completions", json={
            "model": MODEL, "prompt": f"keep going {i}", "max_tokens": 60, "ignore_eos": True}) for i in range(3)]
        time.sleep(0.1)
        for field, value in (("top_k", 2**63), ("seed", 2**64), ("n", 2**63), ("max_tokens", 2**63),
                             ("logprobs", 2**63), ("min_tokens", 2**63), ("temperature", 1e308 * 10)):
            body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value})
            r = client.post("/v1/completions", content=body.replace("Infinity", "1e999"),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field, (field, r.text)
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "top_k": 2**63, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
        for future in running:
            r = future.result()
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
        assert client.get("/health").status_code == 200 and srv.engine.error is None


# ---- failure 2: a 10 MB prompt --------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "a" * (10 << 20)}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * (10 << 20)}]}),
    ("/tokenize", {"model": MODEL, "prompt": "a" * (10 << 20)}),
])
def test_ten_megabyte_prompt_is_refused_fast_and_health_answers_meanwhile(srv, path, body):
    result: dict = {}

    def send():
        t0 = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            result["response"] = client.post(path, json=body)
        result["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=send)
    worker.start()
    latencies = []
    with httpx.Client(base_url=srv.url, timeout=5) as client:
        while worker.is_alive():
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
    worker.join()
    r = result["response"]
    assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "messages"), r.text[:300]
    assert "characters" in r.json()["error"]["message"]
    assert result["seconds"] < 5 and max(latencies, default=0) < 1.0, (result["seconds"], latencies)


def test_body_over_the_limit_is_413_without_reading_it(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/v1/completions", content=b"x" * ((12 << 20) + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
        assert "--max-request-body-bytes" in r.json()["error"]["message"]

        def chunks():                       # no Content-Length: counted as it arrives
            for _ in range(13):
                yield b" " * (1 << 20)
        r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    with socket.create_connection(("127.0.0.1", _port(srv))) as sock:      # never sends the body
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n")
        closed, got = _closed_within(sock, 3)
        assert closed and got.startswith(b"HTTP/1.1 413"), got[:100]


# ---- failure 4: slow clients ----------------------------------------------------------------------------
def test_slow_body_gets_408_and_is_closed(srv):
    with socket.create_connection(("127.0.0.1", _port(srv))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        sock.settimeout(0.3)
        got = b""
        while time.monotonic() - t0 < 4:
            try_send(sock, b" ")
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert time.monotonic() - t0 < 3


def try_send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_slow_headers_and_idle_keep_alive_connections_are_closed(srv):
    port = _port(srv)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        t0 = time.monotonic()
        for sock in socks:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        for _ in range(3):                              # one header line every 0.4 s
            time.sleep(0.4)
            for sock in socks:
                try_send(sock, b"X-Slow: 1\r\n")
        assert all(_closed_within(sock, 3)[0] for sock in socks)
        assert time.monotonic() - t0 < 6
    finally:
        for sock in socks:
            sock.close()
    with socket.create_connection(("127.0.0.1", port)) as sock:     # idle after one request
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        closed, got = _closed_within(sock, 3)
        assert closed and got.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 2.5
    with httpx.Client(base_url=srv.url, timeout=10) as client:    # a normal keep-alive client still works
        for _ in range(3):
            assert client.get("/health").status_code == 200


# ---- failure 3: shutdown timeout with requests in flight -----------------------------------------
def test_requests_cut_by_the_shutdown_timeout_get_an_error_body_and_done(ckpt):
    """The drain (what SIGTERM starts) times out with a stream and a plain request running."""
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL])
    app = create_app(settings, lambda: AsyncLLMEngine.from_args(EngineArgs(model=str(ckpt), **ENGINE)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn_config(app, log_level="warning"), app.state.server, shutdown_timeout=0.3)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and httpx.get(url + "/health").status_code == 200, 60, "not ready")
        long = {"model": MODEL, "prompt": "long", "max_tokens": 240, "ignore_eos": True, "n": 16}
        started = threading.Event()
        result: dict = {}

        def stream():
            with httpx.Client(timeout=60) as client, client.stream(
                    "POST", url + "/v1/completions", json={**long, "stream": True}) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
                result["events"] = sse_events(lines)

        def plain():
            result["plain"] = httpx.post(url + "/v1/completions", json=long, timeout=60)

        workers = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for w in workers:
            w.start()
        assert started.wait(60)
        server.handle_exit(signal.SIGTERM, None)
        for w in workers:
            w.join(60)
        events = result["events"]
        assert "error" in events[-1] and events[-1]["error"]["code"] == 503, events[-1]
        assert "shut down" in events[-1]["error"]["message"]
        assert all("error" not in e for e in events[:-1])
        r = result["plain"]
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError", r.text
        thread.join(30)
        assert not thread.is_alive()
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
