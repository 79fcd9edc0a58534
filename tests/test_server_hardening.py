"""`localglm serve` under hostile or broken input (issue 17, Server): each item has a test that failed before.

Loopback only, every loop bounded, small limits set through ServerSettings so nothing waits long.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import select
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import torch

import localglm
from localglm.cli import main
from localglm.sampling import NonFiniteLogitsError, Sampler, SamplingParams
from localglm.server import ServerSettings, create_app
from localglm.server import app as app_module
from localglm.server.app import host_allowed
from localglm.server.body import replace_lone_surrogates
from localglm.server.command import API_KEY_ENV, _allowed_hosts, api_key
from localglm.server.testing import ServerThread
from test_server import Env, _serve, _wait, one_torch_thread, user  # noqa: F401  (one_torch_thread: autouse)

LIMITS = dict(max_body_bytes=256 * 1024, body_timeout_s=0.6, header_timeout_s=0.6, max_idle_connections=4)
JSON = {"content-type": "application/json"}
POST_ROUTES = {
    "/v1/chat/completions": {"messages": user("hi"), "max_tokens": 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/messages": {"messages": user("hi"), "max_tokens": 1},
    "/v1/messages/count_tokens": {"messages": user("hi")},
}


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> localglm.Model:
    return localglm.load(tiny_dir)


@pytest.fixture(scope="module")
def env(model: localglm.Model) -> Iterator[Env]:
    with _serve(model, **LIMITS) as e:
        yield e


@pytest.fixture(scope="module")
def env64(tiny_dir: Path) -> Iterator[Env]:
    """A 64-token context and the default body cap (4 MiB)."""
    with _serve(localglm.load(tiny_dir, ctx=64)) as e:
        yield e


# ---- raw HTTP ----------------------------------------------------------------------------------
def connect(env: Env) -> socket.socket:
    return socket.create_connection((env.srv.host, env.srv.port), timeout=5)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and readable(sock, deadline - time.monotonic()):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (without waiting)."""
    if not readable(sock, 0):
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def raw_json(text: str) -> dict[str, Any]:
    """httpx arguments posting `text` as is (its json= refuses lone surrogates)."""
    return {"content": text.encode(), "headers": JSON}


# ---- 1. large bodies -----------------------------------------------------------------------------
def test_body_cap_suits_the_context() -> None:
    assert ServerSettings().body_limit(4096) == 4 * 2**20
    assert ServerSettings().body_limit(2**20) == 16 * 2**20  # 16 bytes per token of a 1M context
    assert ServerSettings(max_body_bytes=1000).body_limit(2**20) == 1000


def test_oversized_body_is_413_and_the_connection_closed(env: Env) -> None:
    body = json.dumps({"messages": user("x" * 300_000)})
    r = httpx.post(env.url + "/v1/messages", content=body, headers=JSON, timeout=10)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert r.json()["error"]["type"] == "request_too_large" and "--max-body" in r.json()["error"]["message"]


def test_a_client_that_writes_its_whole_body_first_still_reads_the_413(env: Env) -> None:
    """Python's http.client (under requests and many agents) sends the whole body before it reads: the server
    closed on the unread rest and the client saw a connection reset instead of the 413 that says --max-body."""
    import http.client

    conn = http.client.HTTPConnection(env.srv.host, env.srv.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=b" " * (5 << 20), headers=dict(JSON))
        r = conn.getresponse()
        assert r.status == 413 and b"--max-body" in r.read()
    finally:
        conn.close()
    assert env.health()["status"] == "ok"


def test_chunked_body_is_refused_as_soon_as_it_passes_the_cap(env: Env) -> None:
    """Before: a chunked body skipped the cap and was buffered whole, so no answer came until it ended."""
    cap = LIMITS["max_body_bytes"]
    piece = b"a" * 16384
    with connect(env) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        sent, answer = 0, b""
        for _ in range(16 * cap // len(piece)):  # never sends the final chunk
            with contextlib.suppress(OSError):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            if readable(s, 0.01):
                answer = read_all(s, 2)
                break
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 16 * cap


def test_prompt_far_longer_than_the_context_is_refused_before_tokenizing(env64: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = env64.model.tokenizer
    calls: list[int] = []
    real = tok.encode_prompt
    monkeypatch.setattr(tok, "encode_prompt", lambda p: calls.append(len(p.text)) or real(p))
    huge = user("word " * 40_000)  # 200 kB: far beyond 64 tokens x the longest token
    with pytest.raises(openai.BadRequestError) as e:
        env64.openai().chat.completions.create(model="m", messages=huge)
    assert e.value.code == "context_length_exceeded" and "at least" in e.value.message
    assert "maximum context length is 64 tokens" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as a:
        env64.anthropic().messages.create(model="m", max_tokens=5, messages=huge)
    assert "prompt is too long: at least" in a.value.message and "> 64 maximum" in a.value.message
    with pytest.raises(openai.BadRequestError):
        env64.openai().completions.create(model="m", prompt="word " * 40_000)
    assert calls == []
    # Just over the context: tokenized, and refused with the exact count.
    with pytest.raises(openai.BadRequestError) as e:
        env64.openai().chat.completions.create(model="m", messages=user("word " * 80))
    assert e.value.code == "context_length_exceeded" and "at least" not in e.value.message and len(calls) == 1


def test_big_prompt_is_tokenized_off_the_event_loop_and_memory_is_trimmed_after(env64: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(app_module, "_malloc_trim", lambda: trims.append)
    body = json.dumps({"messages": user("hello world, this is some text. " * 45_000)})  # 1.4 MB, about 0.8M tokens
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            t = time.perf_counter()
            httpx.get(env64.url + "/health", timeout=30)
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)

    pinger = threading.Thread(target=ping)
    pinger.start()
    t0 = time.perf_counter()
    try:
        r = httpx.post(env64.url + "/v1/messages/count_tokens", content=body, headers=JSON, timeout=60)
    finally:
        done.set()
        pinger.join(30)
    took = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["input_tokens"] > 500_000
    assert max(latencies) < max(0.5, took / 3), (max(latencies), took)  # before: /health waited for the whole tokenization
    deadline = time.monotonic() + 10
    while not trims and time.monotonic() < deadline:  # the trim runs after the reply is sent
        time.sleep(0.01)
    assert trims == [0]
    httpx.post(env64.url + "/v1/messages/count_tokens", json={"messages": user("small")}, timeout=10)
    assert trims == [0]  # small requests do not trim


def test_tokenizing_is_bounded_by_the_queue_and_one_at_a_time(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _serve(localglm.load(tiny_dir), queue_size=1) as env:
        tok = env.model.tokenizer
        active, peak = [0], [0]
        real = tok.encode_prompt

        def slow_encode(prompt: Any) -> list[int]:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            time.sleep(0.15)
            active[0] -= 1
            return real(prompt)

        monkeypatch.setattr(tok, "encode_prompt", slow_encode)
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda: codes.append(httpx.post(env.url + "/v1/messages/count_tokens", json={"messages": user("hi")}, timeout=30).status_code))
            for _ in range(4)
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert peak[0] == 1  # one tokenization at a time
        assert sorted(codes)[:2] == [200, 200] and set(codes) <= {200, 503}
        # A full queue answers 503 before tokenizing anything.
        gate = threading.Event()
        env.scripts.add("held", "x", gate=gate)
        env.scripts.add("queued", "y")
        held = threading.Thread(target=lambda: env.openai().chat.completions.create(model="m", messages=user("SCRIPT:held")))
        queued = threading.Thread(target=lambda: env.openai().chat.completions.create(model="m", messages=user("SCRIPT:queued")))
        held.start()
        _wait(lambda: env.health()["busy"])
        queued.start()
        _wait(lambda: env.health()["queue_waiting"] == 1)
        before = tok.encode_prompt
        monkeypatch.setattr(tok, "encode_prompt", lambda p: pytest.fail("tokenized while the queue was full"))
        try:
            r = httpx.post(env.url + "/v1/messages/count_tokens", json={"messages": user("more")}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        finally:
            monkeypatch.setattr(tok, "encode_prompt", before)
            gate.set()
        held.join(30)
        queued.join(30)


# ---- 2. lone surrogates and unexpected errors ------------------------------------------------------
def test_lone_surrogates_become_replacement_characters_on_every_route(env: Env) -> None:
    """Before: 500 "TextInputSequence must be str", and the next request on the connection was reset."""
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for path, body in POST_ROUTES.items():
            text = json.dumps(body).replace('"hi"', '"h\\ud800i\\udfff"')
            r = client.post(path, **raw_json(text))
            assert r.status_code == 200, (path, r.text)
        tools = [{"type": "function", "function": {"name": "t\ud800", "parameters": {}}}]
        r = client.post("/v1/chat/completions", **raw_json(json.dumps({"messages": user("hi"), "max_tokens": 1, "tools": tools})))
        assert r.status_code == 200
        assert client.get("/health").status_code == 200  # the same kept-alive connection

        def count(text: str) -> int:
            return client.post("/v1/messages/count_tokens", **raw_json('{"messages":[{"role":"user","content":"%s"}]}' % text)).json()["input_tokens"]

        assert count("a\\ud800b") == count("a\ufffdb")
        assert count("\\ud83d\\ude00") == count("😀")  # an escaped pair is one character
        assert count("\\\\ud800") == count("\\\\ud8" + "00")  # an escaped backslash, then text


def test_replace_lone_surrogates_in_json_text() -> None:
    assert replace_lone_surrogates(rb'"\ud800x"') == rb'"\ufffdx"'
    assert replace_lone_surrogates(rb'"\udc00\ud83d\ude00\uDBFF"') == rb'"\ufffd\ud83d\ude00\ufffd"'
    assert replace_lone_surrogates(rb'"\\ud800 \\\ud800"') == rb'"\\ud800 \\\ufffd"'
    assert replace_lone_surrogates(b'"plain"') == b'"plain"'


def test_unexpected_error_is_one_logged_500_and_the_connection_survives(model: localglm.Model) -> None:
    def broken_hook(endpoint: str, body: dict) -> Any:
        raise RuntimeError("boom")

    app = create_app(model, ServerSettings(), logits_processor_hook=broken_hook)
    with capture_logs() as records, ServerThread(app) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 1})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200
    assert len([r for r in records if r.levelno >= logging.ERROR]) == 1


def test_generate_with_invalid_utf8_is_a_warning_not_a_traceback(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", str(tiny_dir), "-n", "1", "-q", "--threads", "1", "--temperature", "0"]
    assert main([*argv, "-p", "a\udcffb"]) == 0  # how Python passes `-p $'a\xffb'`
    assert "not valid UTF-8" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\xfe\xffy")))
    assert main([*argv, "-p", "-", "--chat"]) == 0
    assert "stdin is not valid UTF-8" in capsys.readouterr().err


# ---- 3. NaN sampling -------------------------------------------------------------------------------
def test_tiny_temperature_samples_greedily(env: Env) -> None:
    assert SamplingParams(temperature=1e-45).greedy and not SamplingParams(temperature=0.01).greedy
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=1e-45))(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1e-5, seed=1))(logits * 1e30) == int(logits.argmax())  # no overflow to inf
    with pytest.raises(localglm.LocalGLMError, match="seed"):
        SamplingParams(seed=2**70)
    replies = [
        env.openai().chat.completions.create(model="m", messages=user("tiny"), max_tokens=4, temperature=t).choices[0].message.content
        for t in (1e-45, 0)
    ]
    assert replies[0] == replies[1]


@pytest.fixture(scope="module")
def nan_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its final norm's weights NaN (what a corrupt checkpoint gives)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(tiny_dir, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
            save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_nan_logits_are_one_clear_error(nan_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: torch.multinomial crashed (500 / a traceback)."""
    with pytest.raises(NonFiniteLogitsError, match="weights or the config"):
        Sampler(SamplingParams())(torch.tensor([0.0, float("nan")]))
    assert main(["generate", str(nan_dir), "-p", "hi", "-n", "2", "-q", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localglm: error: the model produced NaN logits") and "\n" not in err
    with _serve(localglm.load(nan_dir)) as env:
        # 422, not 500: the clients retry 5xx, and this fails the same way every time.
        with pytest.raises(openai.UnprocessableEntityError) as e:
            env.openai().chat.completions.create(model="m", messages=user("hi"), max_tokens=2)
        assert e.value.code == "non_finite_logits" and "NaN" in e.value.message
        with pytest.raises(anthropic.UnprocessableEntityError):
            env.anthropic().messages.create(model="m", max_tokens=2, messages=user("hi"))
        # Streams have sent 200 already: they end with an error event the clients raise.
        with pytest.raises(openai.APIError, match="NaN"):
            list(env.openai().chat.completions.create(model="m", messages=user("hi"), max_tokens=2, stream=True))
        with pytest.raises(anthropic.APIStatusError, match="NaN"):
            with env.anthropic().messages.stream(model="m", max_tokens=2, messages=user("hi")) as s:
                list(s.text_stream)
        assert env.health()["status"] == "ok"


# ---- 4. slow clients -------------------------------------------------------------------------------
def test_slow_request_head_gets_408_and_is_closed(env: Env) -> None:
    """Before: a head sent a byte at a time was held as long as the bytes kept coming (91 s)."""
    with connect(env) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        for _ in range(40):  # 4 s at most
            with contextlib.suppress(OSError):
                s.send(b"x")
            if readable(s, 0.1):
                break
        answer = read_all(s, 1)
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408") and took < 0.6 + 1.0, (answer[:60], took)


def test_idle_connections_are_capped_and_timed_out(env: Env) -> None:
    """Before: 300 idle sockets stayed open."""
    socks = [connect(env) for _ in range(10)]
    try:
        _wait(lambda: sum(map(is_closed, socks)) >= 10 - LIMITS["max_idle_connections"], timeout=2)
        assert not any(is_closed(s) for s in socks[-LIMITS["max_idle_connections"] :])  # the newest stay
        _wait(lambda: all(map(is_closed, socks)), timeout=0.6 + 2)
        assert env.health()["status"] == "ok"
    finally:
        for s in socks:
            s.close()


def test_slow_body_gets_408_and_is_closed(env: Env) -> None:
    with connect(env) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        t0 = time.monotonic()
        for _ in range(40):
            with contextlib.suppress(OSError):
                s.send(b" ")
            if readable(s, 0.1):
                break
        answer = read_all(s, 1)
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower() and took < 0.6 + 1.0


def test_client_gone_mid_upload_is_not_logged_as_an_error(env: Env) -> None:
    """Before: a 500 with two tracebacks."""
    with capture_logs() as records:
        with connect(env) as s:
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"mess")
            time.sleep(0.1)
        _wait(lambda: 'endpoint="/v1/messages",status="499"' in httpx.get(env.url + "/metrics", timeout=5).text, timeout=5)
    assert [r for r in records if r.levelno >= logging.WARNING] == []


# ---- 5. DNS rebinding and CSRF -------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(POST_ROUTES))
def test_only_json_bodies_are_accepted(env: Env, path: str) -> None:
    body = json.dumps(POST_ROUTES[path])
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(env.url + path, content=body, headers=headers, timeout=10)
        assert r.status_code == 415 and "application/json" in r.text, (kind, r.text)
    r = httpx.post(env.url + path, content=body, headers={"content-type": "Application/JSON; charset=utf-8"}, timeout=30)
    assert r.status_code == 200


def test_a_trailing_slash_and_a_compressed_body_get_json_errors(env: Env) -> None:
    """Before: a trailing slash got a 307 with an empty body (no answer for an API client), and a gzipped body
    "request body is not UTF-8 text"."""
    import gzip

    with httpx.Client(base_url=env.url, timeout=30) as client:
        r = client.post("/v1/chat/completions/", json={"messages": user("hi"), "max_tokens": 2})
        assert r.status_code == 404 and "without the trailing slash: /v1/chat/completions" in r.json()["error"]["message"], r.text
        body = gzip.compress(json.dumps({"messages": user("hi"), "max_tokens": 2}).encode())
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 415 and "Content-Encoding 'gzip'" in r.json()["error"]["message"], r.text
        assert client.get("/health").status_code == 200


def test_host_header_must_name_this_machine(env: Env) -> None:
    port = env.srv.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        r = httpx.get(env.url + "/v1/models", headers={"host": host}, timeout=10)
        assert r.status_code == 403 and "--allow-host" in r.json()["error"]["message"], host
    assert httpx.get(env.url + "/health", headers={"host": "evil.example"}, timeout=10).status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}", "LOCALHOST.", "app.localhost", "192.168.1.20:80"):
        assert httpx.get(env.url + "/v1/models", headers={"host": host}, timeout=10).status_code == 200, host
    allowed = frozenset({"my.lan"})
    assert host_allowed("my.lan:8080", allowed) and host_allowed("MY.LAN", allowed) and not host_allowed("other.lan", allowed)
    assert host_allowed("anything.example", frozenset({"*"})) and host_allowed(None, frozenset())


def test_serve_allows_the_name_it_binds(tiny_dir: Path) -> None:
    from localglm.cli import build_parser

    def hosts(*argv: str) -> tuple[str, ...]:
        return _allowed_hosts(build_parser().parse_args(["serve", str(tiny_dir), *argv]))

    assert hosts() == () and hosts("--host", "0.0.0.0") == () and hosts("--host", "::") == ()
    assert hosts("--host", "box.lan", "--allow-host", "a.lan", "--allow-host", "box.lan") == ("a.lan", "box.lan")


# ---- 6. API key out of `ps` ------------------------------------------------------------------------
def test_api_key_from_the_environment_or_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def args(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    key_file = tmp_path / "key"
    key_file.write_text("s3cret \nignored\n")
    assert api_key(args(api_key_file=str(key_file)), {}) == "s3cret"
    assert api_key(args(), {API_KEY_ENV: " fromenv "}) == "fromenv"
    assert api_key(args(api_key="flag"), {API_KEY_ENV: "fromenv"}) == "flag"
    assert api_key(args(), {}) is None
    (tmp_path / "empty").write_text("\n")
    for argv, text in (
        (["--api-key", "a", "--api-key-file", str(key_file)], "not both"),
        (["--api-key-file", str(tmp_path / "missing")], "cannot read"),
        (["--api-key-file", str(tmp_path / "empty")], "first line is empty"),
    ):
        assert main(["serve", "some/model", "-q", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err


# ---- 7. shutdown -----------------------------------------------------------------------------------
def test_shutdown_ends_active_streams_with_a_final_error(model: localglm.Model) -> None:
    """Before: streams were cut after the grace period with no final event."""
    with _serve(model) as env:
        env.scripts.add("forever", "tick", end=None, repeat_last=True, delay_s=0.01)
        lines: dict[str, list[str]] = {"openai": [], "anthropic": []}
        started = threading.Event()

        def stream(kind: str, path: str, body: dict) -> None:
            with httpx.stream("POST", env.url + path, json={**body, "stream": True}, timeout=30) as r:
                for line in r.iter_lines():
                    if line:
                        lines[kind].append(line)
                    if kind == "openai" and len(lines[kind]) == 4:  # the role chunk, then content
                        started.set()

        body = {"messages": user("SCRIPT:forever"), "max_tokens": 100_000}
        threads = [
            threading.Thread(target=stream, args=("openai", "/v1/chat/completions", body)),
            threading.Thread(target=stream, args=("anthropic", "/v1/messages", {**body, "model": "m"})),
        ]
        threads[0].start()
        assert started.wait(10)
        threads[1].start()  # queued behind the first
        _wait(lambda: env.health()["queue_waiting"] == 1)
        t0 = time.monotonic()
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 2  # well inside the grace period: the streams ended themselves
    data = [json.loads(x[6:]) for x in lines["openai"] if x.startswith("data: {")]
    assert data[-1]["error"]["code"] == "server_shutting_down" and lines["openai"][-1] == "data: [DONE]"
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data[1:-1]).startswith("tick")
    events = [x for x in lines["anthropic"] if x.startswith("event: ")]
    assert events[-1] == "event: error" and "overloaded_error" in lines["anthropic"][-1]


# ---- 8. hostile field values ----------------------------------------------------------------------
def _assert_400(r: httpx.Response, text: str, param: str | None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert text in err["message"], err
    if "param" in err:  # the OpenAI shape names the field
        assert err["param"] == param, err


def test_repetition_penalty_that_would_overflow_the_logits_is_400(env: Env) -> None:
    """Before: 500 from the engine (10**30: "int too big to convert"; 1e-320: inf logits, IndexError)."""
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for value in (10**30, 1e-320, 1e300):
            r = client.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, "repetition_penalty": value})
            _assert_400(r, "repetition_penalty", "repetition_penalty")
        r = client.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, "repetition_penalty": 1.3})
        assert r.status_code == 200, r.text


def test_json_nested_past_what_the_server_can_render_is_400(env: Env) -> None:
    """Before: 500 RecursionError, from rendering the prompt (nesting 600 deep parsed, but the template's
    recursive conversion overflowed) or from parsing a tool call's arguments string (nesting 100,000 deep)."""
    deep = json.loads('{"a":' * 600 + "1" + "}" * 600)
    call = {"function": {"name": "f", "arguments": deep}}
    bodies = {
        "/v1/chat/completions": [
            ({"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}], "max_tokens": 2}, None),
            ({"messages": user("hi"), "max_tokens": 2, "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]}, None),
            (
                {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}]}]},
                "messages[0].tool_calls[0].function.arguments",
            ),
        ],
        "/v1/messages": [
            ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": deep}]}], "max_tokens": 2}, None),
            ({"messages": user("hi"), "max_tokens": 2, "tools": [{"name": "f", "input_schema": deep}]}, None),
        ],
        "/v1/messages/count_tokens": [({"messages": user("hi"), "tools": [{"name": "f", "input_schema": deep}]}, None)],
    }
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for path, cases in bodies.items():
            for body, param in cases:
                r = client.post(path, **raw_json(json.dumps(body)))
                _assert_400(r, "nested too deeply", param)
        shallow = json.loads('{"a":' * 20 + "1" + "}" * 20)  # what a real nested schema reaches
        r = client.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2,
                                                      "tools": [{"type": "function", "function": {"name": "f", "parameters": shallow}}]})  # fmt: skip
        assert r.status_code == 200, r.text


def test_nan_and_infinity_are_named_in_the_error(env: Env) -> None:
    """Before: "temperature: expected a number, got a number" (Python's parser reads NaN and Infinity)."""
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for field_, literal, described in (("temperature", "NaN", "got NaN"), ("top_p", "-Infinity", "got an infinite number")):
            r = client.post("/v1/chat/completions", **raw_json('{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field_, literal)))
            _assert_400(r, f"{field_}: expected a number, {described}", field_)


def test_nan_anywhere_in_a_body_is_400_naming_it(env: Env) -> None:
    """Before: Responses' metadata {"a": NaN} was a 500 ("Out of range float values are not JSON compliant")
    when echoed back, a bare NaN in its stream's events, and a stored response that failed every GET."""
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for literal in ("NaN", "Infinity", "1e400"):
            r = client.post("/v1/responses", **raw_json('{"input": "hi", "max_output_tokens": 2, "metadata": {"a": %s}}' % literal))
            _assert_400(r, "metadata.a: expected a number, got", "metadata.a")
        call = {"function": {"name": "f", "arguments": '{"n": [1, NaN]}'}}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]})
        _assert_400(r, "arguments at n[1]: NaN is not a JSON number", "messages[0].tool_calls[0].function.arguments")
        assert client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "metadata": {"a": "1.5"}}).status_code == 200


@pytest.mark.parametrize("required", [True, 3, "a", ["a", []], [{"x": 1}]])
def test_a_tool_schema_whose_required_is_not_names_is_400(env: Env, required: Any) -> None:
    """Before: 500 "'bool' object is not iterable" from the tool-call grammar on every API that takes tools
    (and "required": "a" was read as the set of its letters)."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": required}
    cases = (
        ("/v1/chat/completions", {"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
         "tools[0].function.parameters.required"),
        ("/v1/messages", {"messages": user("hi"), "tools": [{"name": "f", "input_schema": schema}]}, "tools[0].input_schema.required"),
        ("/v1/responses", {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": schema}]}, "tools[0].parameters.required"),
        ("/api/chat", {"model": "m", "messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
         "tools[0].function.parameters.required"),
    )  # fmt: skip
    with httpx.Client(base_url=env.url, timeout=30) as client:
        for path, body, param in cases:
            r = client.post(path, json={**body, "max_tokens": 2})
            assert r.status_code == 400, (path, r.text)
            assert param in r.text, (path, r.text)


def test_integer_literal_past_pythons_digit_limit_is_400(env: Env) -> None:
    """Before: 500 "Exceeds the limit (4300 digits) for integer string conversion" (int() refuses longer literals)."""
    huge = "1" + "0" * 5000
    with httpx.Client(base_url=env.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", **raw_json('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % huge))
        _assert_400(r, "too many digits", None)
        call = {"function": {"name": "f", "arguments": '{"n": %s}' % huge}}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]})
        _assert_400(r, "too many digits", "messages[0].tool_calls[0].function.arguments")
        assert client.get("/health").status_code == 200


# ---- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_logs(names: tuple[str, ...] = ("uvicorn.error", "localglm.server")) -> Iterator[list[logging.LogRecord]]:
    """Records of the server's loggers (uvicorn's do not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)

