"""The command line: generate (text, stats line, --stats-json), inspect, make-tiny, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localglm.cli import main

STATS_KEYS = {"prompt_tokens", "prompt_tok_s", "decode_tokens", "decode_tok_s", "ttft_s", "peak_rss_bytes"}


def test_generate_stats_json_is_last_stdout_line(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["generate", str(tiny_dir), "-p", "def f(", "-n", "6", "--temperature", "0", "--ignore-eos", "--stats-json", "-q", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    stats = json.loads(out[-1])
    assert STATS_KEYS <= set(stats)
    assert stats["decode_tokens"] == 6 and stats["prompt_tokens"] > 0 and stats["peak_rss_bytes"] > 0


def test_generate_chat_prints_text_then_stats_line(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["generate", str(tiny_dir), "-p", "hello", "--chat", "--no-think", "-n", "4", "--seed", "1", "-q"])
    assert rc == 0
    captured = capsys.readouterr()
    last = captured.err.rstrip("\n").splitlines()[-1]  # the stats line is on stderr: stdout is only the reply
    assert "prompt:" in last and "decode:" in last and "ttft:" in last and "peak RSS" in last
    assert "prompt:" not in captured.out


def test_generate_takes_the_prompt_after_the_model(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`localglm generate MODEL "TEXT"` (as `ollama run` takes it) is `-p TEXT`, token for token."""
    common = ["-n", "5", "--temperature", "0", "--ignore-eos", "-q", "--threads", "1"]
    assert main(["generate", str(tiny_dir), "-p", "def f(", *common]) == 0
    with_flag = capsys.readouterr().out
    assert main(["generate", str(tiny_dir), "def f(", *common]) == 0
    assert capsys.readouterr().out == with_flag


def test_inspect_prints_counts(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    for word in ("parameters total", "active per token", "routed experts", "4-bit", "KV cache"):
        assert word in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "/no/such/model", "-p", "x", "-q"], "/no/such/model"),
        (["generate", "{tiny}", "-q"], "-p"),
        (["generate", "{tiny}", "-p", "x", "--top-p", "7", "-q"], "--top-p 7"),
        (["generate", "{tiny}", "-p", "x", "-n", "0", "-q"], "max-new-tokens"),
        (["generate", "{tiny}", "x", "-p", "y", "-q"], "not both"),
        (["generate", "def f(x):", "-q"], "localglm generate -p 'def f(x):'"),  # a prompt where MODEL goes: said so
        (["inspect", "/no/such/model"], "config.json"),
        (["make-tiny", "{tiny}"], "already exists"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv: list[str], needle: str, tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main([a.replace("{tiny}", str(tiny_dir)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("localglm: error:") and "\n" not in err and needle in err


def test_make_tiny_and_generate_as_a_subprocess(tmp_path: Path) -> None:
    """The real entry point, as a user runs it."""
    out = tmp_path / "m"
    run = lambda *a: subprocess.run([sys.executable, "-m", "localglm", *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run("make-tiny", str(out), "--num-hidden-layers", "2", "--n-routed-experts", "4", "--chat-style", "glm47")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    r = run("generate", str(out), "-p", "x", "-n", "3", "--stats-json", "-q")
    assert r.returncode == 0, r.stderr
    assert STATS_KEYS <= set(json.loads(r.stdout.strip().splitlines()[-1]))
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "make-tiny" in r.stdout


def test_every_model_command_takes_the_offload_and_quantize_flags(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """generate offloads to the simulated device with the same greedy text; chat and serve parse the
    same flags into the same load options; budget flags without --offload are refused in one line."""
    from localglm.cli import build_parser, load_options
    from offload.trace import Trace

    base = ["-p", "def f(", "-n", "6", "--temperature", "0", "--ignore-eos", "--stats-json", "-q"]
    assert main(["generate", str(tiny_dir), *base]) == 0
    plain = capsys.readouterr().out.rstrip("\n").splitlines()
    trace = tmp_path / "run.jsonl"
    args = ["--offload", "sim", "--gpu-mem", "64MiB", "--cache-policy", "lru", "--trace", str(trace)]
    assert main(["generate", str(tiny_dir), *base, *args]) == 0
    offloaded = capsys.readouterr().out.rstrip("\n").splitlines()
    assert offloaded[:-1] == plain[:-1]  # the text
    backend = json.loads(offloaded[-1])["backend"]
    assert backend["offload"] == "sim" and backend["policy"] == "lru"
    assert Trace.load(trace).calls  # the backend recorded the run
    parser = build_parser()
    for cmd in ("chat", "serve", "record-trace"):
        extra = ["-o", str(tmp_path / "t.jsonl")] if cmd == "record-trace" else []
        ns = parser.parse_args([cmd, str(tiny_dir), *extra, "--offload", "sim", "--gpu-mem", "64MiB", "--experts", "4"])
        opts = load_options(ns)
        assert opts["offload"] == "sim" and opts["gpu_mem"] == "64MiB" and opts["experts_bits"] == "4" and opts["prefetch"]
    from tui.command import options_from_args

    chat = options_from_args(parser.parse_args(["chat", str(tiny_dir), "--offload", "cuda", "--no-prefetch"]))
    assert chat.device == "cuda" and chat.load_options == {"offload": "cuda", "prefetch": False}
    assert main(["generate", str(tiny_dir), *base, "--gpu-mem", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-mem: these flags need --offload" in err
