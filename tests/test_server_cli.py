"""`localglm serve` on the command line: defaults, one-line errors, and a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    assert err[-1].startswith(f"localglm: error: cannot listen on 127.0.0.1:{port}")


def test_serve_process_answers_and_stops_on_ctrl_c(tiny_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "localglm.cli", "serve", str(tiny_dir), "--port", str(port), "-q", "--threads", "1",
           "--model-name", "glm-test", "--temperature", "0", "--cache-ram", "64MiB"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == "glm-test"
        r = client.chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    assert f"serving glm-test (ctx 2048) at http://127.0.0.1:{port}" in err
    assert "conversations taking turns: set aside in up to 64.00 MiB of RAM (--cache-ram)" in err
