"""`localglm serve` on the command line: defaults, one-line errors, and a real server process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from localglm import default_model
from localglm.cli import build_parser, main


def test_serve_defaults_bind_loopback() -> None:
    args = build_parser().parse_args(["serve", "some/model"])
    assert (args.host, args.port, args.queue_size, args.api_key, args.no_think) == ("127.0.0.1", 8080, 16, None, False)
    args = build_parser().parse_args(["serve"])
    assert args.model is None


def test_serve_without_model_and_no_default_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localglm: error: no MODEL given") and "\n" not in err


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--port", "0"], "--port must be between"),
        (["--queue-size", "-1"], "--queue-size must be at least 0"),
        (["--api-key", " "], "--api-key must not be empty"),
    ],
)
def test_serve_bad_flags_are_one_line_errors(tiny_dir: Path, argv: list[str], text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tiny_dir), "-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and "\n" not in err


def test_serve_on_a_taken_port_is_one_line_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_dir), "-q", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # refused before the model loads: no "serving ... at" banner for a server that never listened
    assert err == [f"localglm: error: cannot listen on 127.0.0.1:{port}: Address already in use"], err


@dataclass
class Served:
    base: str
    port: int
    err: str = ""  # stderr, once the process has stopped
    returncode: int | None = None


@contextlib.contextmanager
def serve_process(model: Path, *flags: str) -> Iterator[Served]:
    """`localglm serve MODEL FLAGS` as its own process, up and answering /health; stopped with Ctrl+C after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "localglm.cli", "serve", str(model), "--port", str(port), "-q", "--threads", "1", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    served = Served(f"http://127.0.0.1:{port}", port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(served.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield served
    finally:
        proc.send_signal(signal.SIGINT)
        _, served.err = proc.communicate(timeout=60)
        served.returncode = proc.returncode


def test_serve_process_answers_and_stops_on_ctrl_c(tiny_dir: Path) -> None:
    with serve_process(tiny_dir, "--model-name", "glm-test", "--temperature", "0", "--cache-ram", "64MiB") as srv:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == "glm-test"
        r = client.chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("length", "stop")
    assert srv.returncode in (0, 130), srv.err
    assert f"serving glm-test (ctx 2048) at http://127.0.0.1:{srv.port}" in srv.err
    assert "conversations taking turns: set aside in up to 64.00 MiB of RAM (--cache-ram)" in srv.err


def test_a_restarted_server_restores_a_conversation_from_cache_dir(tiny_dir: Path, tmp_path: Path) -> None:
    """Stopped with Ctrl+C, the server writes its conversations under --cache-dir; started again, the
    conversation's next turn is restored from there instead of prefilled (cached_tokens), with the
    same reply a server that never stopped gives."""
    system = {"role": "system", "content": "You are a coding agent. " + " ".join(f"Rule {i}: keep files tidy." for i in range(30))}
    turn1 = [system, {"role": "user", "content": "list the files"}]

    def ask(srv: Served, messages: list[dict[str, str]]) -> tuple[str, int]:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content or "", r.usage.prompt_tokens_details.cached_tokens

    cache = tmp_path / "prompts"
    with serve_process(tiny_dir, "--cache-dir", str(cache), "--cache-disk", "64MiB") as srv:
        reply, _ = ask(srv, turn1)
        turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the tests?"}]
        uninterrupted, cached_live = ask(srv, turn2)
    assert srv.returncode in (0, 130), srv.err
    assert "saved prompts" in srv.err and str(cache) in srv.err
    assert cached_live > 100

    with serve_process(tiny_dir, "--cache-dir", str(cache), "--cache-disk", "64MiB") as srv:
        assert httpx.get(srv.base + "/metrics").text.count("localglm_prompt_cache_disk_entries 1") == 1
        again, cached = ask(srv, turn2)
        assert "localglm_prompt_cache_disk_loads_total 1" in httpx.get(srv.base + "/metrics").text
    assert "saved there before" in srv.err
    assert again == uninterrupted and cached >= cached_live  # the whole of turn 2's prompt was on disk


def test_cache_dir_errors_are_one_line_before_loading(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = [
        ("serve", ["--cache-dir", str(afile)], "--cache-dir"),
        ("serve", ["--cache-dir", ""], "--cache-dir: give a directory"),
        ("serve", ["--cache-dir", str(afile / "sub")], "--cache-dir"),
        ("serve", ["--cache-disk", "8GiB"], "--cache-disk: give --cache-dir"),
        ("serve", ["--cache-dir", str(tmp_path / "ok"), "--no-prefix-reuse"], "--cache-dir: nothing is reused"),
        ("serve", ["--cache-dir", str(tmp_path / "ok"), "--cache-disk", "lots"], "--cache-disk"),
        ("chat", ["--cache-dir", str(afile)], "--cache-dir"),
        ("chat", ["--cache-disk", "1GiB"], "--cache-disk: give --cache-dir"),
        ("chat", ["--cache-dir", str(tmp_path / "ok"), "--cache-disk", "0"], "--cache-disk 0: must be more than 0 bytes"),
    ]
    for command, argv, text in cases:
        assert main([command, str(tiny_dir), *(["-q"] if command == "serve" else []), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err, err
    assert afile.read_text() == "x"
