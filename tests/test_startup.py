"""Commands that need no model start without importing torch (`import localglm` is lazy): each is
run in a fresh interpreter, which then reports whether torch got imported. Behaviour, not timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Runs localglm's main() on argv, then prints one JSON line: the exit status and whether torch was imported.
PROBE = """
import json, sys
from localglm.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:  # argparse's --help / --version
    rc = e.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}))
"""


def run_cli(*argv: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small routing trace in `localglm record-trace`'s format."""
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    head = {"format": "localglm-trace", "version": 1, "n_experts": 8, "top_k": 2, "moe_layers": [1, 2], "expert_bytes": 100, "model": "m"}
    lines = [json.dumps(head)] + [json.dumps({"s": s, "l": layer, "e": [[s % 8, (3 * s + layer) % 8]]}) for s in range(20) for layer in (1, 2)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_localglm_does_not_import_torch() -> None:
    code = "import sys, localglm; print('torch' in sys.modules); localglm.LocalGLMError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    code = "import sys, localglm; localglm.load; print('torch' in sys.modules, callable(localglm.load), 'load' in dir(localglm))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["True", "True", "True"]
    code = "import localglm; localglm.nothing_here"
    assert "has no attribute 'nothing_here'" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["generate", "--help"], ["serve", "--help"], ["quantize", "--help"]])
def test_help_and_version_start_without_torch(argv: list[str]) -> None:
    assert run_cli(*argv) == {"rc": 0, "torch": False}


def test_inspect_a_checkpoint_directory_without_torch(tiny_dir: Path) -> None:
    assert run_cli("inspect", str(tiny_dir)) == {"rc": 0, "torch": False}
    assert run_cli("inspect", str(tiny_dir / "config.json")) == {"rc": 0, "torch": False}


def test_plan_a_checkpoint_directory_without_torch(tiny_dir: Path) -> None:
    """Sizes and the placement need no torch; only a machine with NVIDIA's driver asks torch for its GPU's memory."""
    assert run_cli("plan", str(tiny_dir)) == {"rc": 0, "torch": False}
    assert run_cli("plan", str(tiny_dir), "--gpu-mem", "8G", "--experts", "2") == {"rc": 0, "torch": False}


@pytest.mark.parametrize("command", ["inspect", "plan"])
@pytest.mark.parametrize("gguf", ["glm4_moe_lite_llamacpp_bf16.gguf", "glm_moe_dsa_llamacpp_q8_0.gguf"])
def test_inspect_and_plan_a_gguf_without_torch(command: str, gguf: str) -> None:
    """A GGUF's header through the gguf package (numpy), not torch (files written by llama.cpp's converter)."""
    assert run_cli(command, str(DATA / gguf)) == {"rc": 0, "torch": False}


def test_simulate_a_trace_without_torch(trace_file: Path) -> None:
    assert run_cli("simulate", str(trace_file), "--json") == {"rc": 0, "torch": False}


def test_commands_that_load_a_model_still_import_torch(tiny_dir: Path) -> None:
    """The probe can see torch: a command that runs the model imports it."""
    assert run_cli("generate", str(tiny_dir), "-p", "hi", "-n", "1", "-q", "--threads", "1") == {"rc": 0, "torch": True}
