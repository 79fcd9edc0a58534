"""The command line under misuse: nothing the user did not ask to delete is lost, read-only and full
disks end in one line with nothing half-written left behind, absurd flags are refused or capped
before anything is allocated, and the flags mean the same in every command."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from localglm.quantize import quantize_checkpoint
from quant.recipe import Recipe
from tests.probes import leftovers, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
MANIFEST = "localglm_quant.json"


@pytest.fixture(scope="module")
def quantized(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("q") / "q2", Recipe.from_options({"experts": 2})).out


# ---- quantize --overwrite: only what a previous quantize wrote ------------------------------------------------
def test_overwrite_never_deletes_the_source_inside_out(tiny_dir: Path, tmp_path: Path) -> None:
    """`quantize DIR/src DIR --overwrite` with DIR an earlier quantized output: DIR/src must survive."""
    out = quantize_checkpoint(tiny_dir, tmp_path / "q", Recipe()).out
    src = shutil.copytree(tiny_dir, out / "src")
    before = snapshot(src)
    o = run_cli("quantize", src, out, "--overwrite", "-q")
    assert src.is_dir() and snapshot(src) == before, "data lost: the source was deleted"
    assert o.kind == "clean" and "src" in o.err, o.why()


def test_overwrite_keeps_files_quantize_did_not_write(tiny_dir: Path, tmp_path: Path) -> None:
    out = quantize_checkpoint(tiny_dir, tmp_path / "q", Recipe()).out
    (out / "notes.txt").write_text("my notes")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("x")
    o = run_cli("quantize", tiny_dir, out, "--overwrite", "--experts", "8", "-q")
    assert (out / "notes.txt").read_text() == "my notes" and (out / "runs" / "log.txt").is_file(), "data lost: unrelated files deleted"
    assert o.kind == "clean" and "notes.txt" in o.err, o.why()


def test_overwrite_replaces_a_previous_output(tiny_dir: Path, tmp_path: Path) -> None:
    out = quantize_checkpoint(tiny_dir, tmp_path / "q", Recipe()).out
    o = run_cli("quantize", tiny_dir, out, "--overwrite", "--experts", "8", "-q")
    assert o.kind == "ok", o.why()
    assert json.loads((out / MANIFEST).read_text())["recipe"]["bits"]["experts"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial or old directory left


def test_a_recipe_choice_that_changes_nothing_is_a_one_line_warning(tiny_dir: Path, tmp_path: Path) -> None:
    """--indexer on a model without DSA, or an override past the last layer, quantizes as asked and says so
    (a recipe may be reused across models; silence would let a typo in --layers go unnoticed)."""
    o = run_cli("quantize", tiny_dir, tmp_path / "q", "--indexer", "8", "--layers", "40-50:experts=8", "--experts", "4", "-q")
    assert o.kind == "ok", o.why()
    warned = [line for line in o.err.splitlines() if line.startswith("localglm: warning:")]
    assert len(warned) == 2 and "no indexer tensors" in warned[0] and "40-50:experts=8" in warned[1], o.err
    assert "experts=4" not in o.err  # a choice that matched stays quiet
    o = run_cli("generate", tiny_dir, "--indexer", "8", "-p", "hi", "-n", "1")
    assert o.kind == "ok" and "no indexer tensors" in o.err, o.why()


def test_drafting_flags_without_an_mtp_layer_are_a_warning(tiny_dir: Path) -> None:
    """Before: --draft, --draft-fixed and --draft-vocab on a model decoding without drafts were silently ignored."""
    o = run_cli("generate", tiny_dir, "-p", "hi", "-n", "2", "-q", "--draft", "2", "--no-mtp")
    assert o.kind == "ok" and "--draft: --no-mtp leaves the MTP layer out" in o.err, o.why()
    o = run_cli("generate", tiny_dir, "-p", "hi", "-n", "2", "-q", "--draft", "0")
    assert o.kind == "ok" and "warning" not in o.err, o.why()  # 0: no drafts, as asked


def test_quantize_refuses_out_inside_src(tiny_dir: Path, tmp_path: Path) -> None:
    """`quantize SRC SRC/q` wrote a model directory into the source (which gained a folder nobody asked for,
    and a later run over SRC could take OUT's shards for its own): refused before anything is written.
    (`quantize SRC/x SRC`, SRC inside OUT, is refused as well: test_overwrite_never_deletes_the_source_inside_out.)"""
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    before = snapshot(src)
    for out in (src / "q", src / "sub" / "q"):
        o = run_cli("quantize", src, out, "-q")
        assert o.kind == "clean" and "inside the source" in o.err and str(out) in o.err and "\n" not in o.err.strip(), o.why()
        assert snapshot(src) == before and sorted(os.listdir(src)) == sorted(os.listdir(tiny_dir)), "wrote into the source"
    assert sorted(os.listdir(tmp_path)) == ["src"], "half-written output"


@pytest.mark.parametrize("dropped", ["model.layers.1.mlp.experts.3.", "model.layers.3.mlp.experts.3.", "lm_head.weight"], ids=["expert", "mtp-expert", "lm-head"])
def test_quantize_refuses_a_source_loading_would_refuse(dropped: str, tiny_dir: Path, tmp_path: Path) -> None:
    """A checkpoint lacking a whole routed expert (of a main layer or the MTP block) or lm_head was quantized
    into a directory that every later command refused ("expert blob ... is missing"): quantize streams what
    SRC holds. It now fails before writing, naming the tensor, as loading SRC does."""
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(dropped)}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    o = run_cli("quantize", src, tmp_path / "q", "-q")
    assert o.kind == "clean" and dropped in o.err and "not found" in o.err, o.why()
    assert sorted(os.listdir(tmp_path)) == ["src"], "half-written output"


# ---- read-only and full disks ---------------------------------------------------------------------------
def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_full(path: str, *_: Any, **__: Any) -> None:
    Path(path).write_bytes(b"\0" * 100)  # a disk fills up mid-file
    _enospc()


@pytest.fixture
def readonly(monkeypatch: pytest.MonkeyPatch) -> Any:
    """readonly(root): creating anything under root fails with EROFS, as on a read-only mount (tests run as root,
    so chmod would not stop them)."""

    def arm(root: Path) -> None:
        root = Path(root).resolve()
        real_mkdir, real_open, real_os_open = os.mkdir, builtins.open, os.open

        def inside(p: Any) -> bool:
            try:
                return Path(os.fsdecode(p)).resolve().is_relative_to(root)
            except (TypeError, ValueError):
                return False

        def refuse(p: Any) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

        def mkdir(p: Any, *a: Any, **k: Any) -> None:
            refuse(p) if inside(p) else real_mkdir(p, *a, **k)

        def open_(p: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if isinstance(p, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(p):
                refuse(p)
            return real_open(p, mode, *a, **k)

        def os_open(p: Any, flags: int, *a: Any, **k: Any) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(p):
                refuse(p)
            return real_os_open(p, flags, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)

    return arm


def _one_line_and_nothing_left(o: Any, parent: Path, before: set[str], *needles: str) -> None:
    assert o.kind == "clean" and all(n in o.err for n in needles), o.why()
    left = leftovers(parent, before)
    assert not left, f"half-written: {left}"


def test_quantize_on_a_full_disk(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, path, **k: _half_then_full(path))
    o = run_cli("quantize", tiny_dir, tmp_path / "q", "-q")
    _one_line_and_nothing_left(o, tmp_path, set(), "No space left")


def test_quantize_into_a_read_only_directory(tiny_dir: Path, tmp_path: Path, readonly: Any) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    readonly(ro)
    o = run_cli("quantize", tiny_dir, ro / "q", "-q")
    _one_line_and_nothing_left(o, ro, set(), "Read-only")


def test_export_gguf_on_a_full_disk(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localglm.checkpoint import gguf_writer

    monkeypatch.setattr(gguf_writer, "_pad", _enospc)
    o = run_cli("export-gguf", tiny_dir, tmp_path / "m.gguf", "-q")
    _one_line_and_nothing_left(o, tmp_path, set(), "No space left")


def test_export_gguf_into_a_read_only_directory(tiny_dir: Path, tmp_path: Path, readonly: Any) -> None:
    readonly(tmp_path)
    o = run_cli("export-gguf", tiny_dir, tmp_path / "m.gguf", "-q")
    _one_line_and_nothing_left(o, tmp_path, set(), "Read-only")


@pytest.mark.parametrize("name,data", [("chat_template.jinja", b"{{ x }}\x90\xff"), ("tokenizer_config.json", b'{"a": ')])
def test_export_gguf_names_a_broken_tokenizer_file(name: str, data: bytes, tiny_dir: Path, tmp_path: Path) -> None:
    """gguf.SpecialVocab reads these files itself and raised a bare UnicodeDecodeError (found by a fuzzer)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / name).write_bytes(data)
    o = run_cli("export-gguf", src, tmp_path / "out" / "m.gguf", "-q")
    assert o.kind == "clean" and name in o.err, o.why()
    assert not (tmp_path / "out").exists()


def test_make_tiny_on_a_full_disk_and_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: Any) -> None:
    import safetensors.torch

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", lambda t, path, **k: _half_then_full(path))
        o = run_cli("make-tiny", tmp_path / "m")
    _one_line_and_nothing_left(o, tmp_path, set(), "No space left")
    readonly(tmp_path)
    o = run_cli("make-tiny", tmp_path / "m")
    _one_line_and_nothing_left(o, tmp_path, set(), "Read-only")


def test_save_quantized_on_a_full_disk(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, path, **k: _half_then_full(path))
    o = run_cli("generate", tiny_dir, "-p", "x", "-n", "1", "-q", "--save-quantized", tmp_path / "q")
    _one_line_and_nothing_left(o, tmp_path, set(), "No space left")


def test_record_trace_to_a_read_only_or_full_disk(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readonly: Any) -> None:
    from offload import trace

    with monkeypatch.context() as m:
        m.setattr(trace.TraceRecorder, "record", lambda self, *a: _enospc())
        o = run_cli("record-trace", tiny_dir, "-o", tmp_path / "t.jsonl", "-p", "x", "-n", "2", "-q")
    assert o.kind == "clean" and "No space left" in o.err, o.why()
    (tmp_path / "ro").mkdir()
    readonly(tmp_path / "ro")
    o = run_cli("record-trace", tiny_dir, "-o", tmp_path / "ro" / "t.jsonl", "-p", "x", "-n", "2", "-q")
    assert o.kind == "clean" and "t.jsonl" in o.err, o.why()


# ---- absurd flags ---------------------------------------------------------------------------------------------
def test_threads_are_capped_at_the_cores(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.set_num_threads(1000000) segfaults on the first matmul: never pass more than the cores."""
    asked: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), real(min(n, 2)))[1])
    cores = os.cpu_count() or 1
    for argv in (["generate", tiny_dir, "-p", "x", "-n", "1", "-q"], ["quantize", tiny_dir, tmp_path / "q", "-q"]):
        asked.clear()
        o = run_cli(*argv, "--threads", "1000000")
        assert all(n <= cores for n in asked), f"crash: torch.set_num_threads({max(asked)}) segfaults"
        assert o.kind == "ok", o.why()
        assert f"localglm: warning: --threads 1000000 is more than the {cores} usable cores" in o.err, o.why()
    o = run_cli("generate", tiny_dir, "-p", "x", "-n", "1", "-q", "--threads", "0")
    assert o.kind == "clean" and "--threads" in o.err, o.why()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--seed", str(2**70)], "--seed"),
        # Before: a traceback from the sampler (1e-320 overflows the seen tokens' logits to inf), or 1e30 accepted.
        (["generate", "{tiny}", "-p", "x", "-n", "2", "-q", "--temperature", "1", "--repetition-penalty", "1e-320"], "--repetition-penalty 1e-320: out of range (0.001 to 1000"),
        (["generate", "{tiny}", "-p", "x", "-n", "2", "-q", "--temperature", "1", "--repeat-penalty", "1e30"], "--repetition-penalty"),
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--ctx", "1000000000"], "--ctx"),
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--ctx", "0"], "--ctx"),  # was read as "the default", as plan and inspect do not
        (["quantize", "{tiny}", "{tmp}/q", "-q", "--max-shard-size", "0"], "--max-shard-size"),
        (["quantize", "{tiny}", "{tmp}/q", "-q", "--max-shard-size", "-5M"], "--max-shard-size"),
        (["eval", "{tiny}", "--ref", "{tiny}", "--text", "{tmp}/missing.txt"], "missing.txt"),
        (["eval", "{tiny}", "--ref", "{tiny}", "--random-tokens", "3000", "--ctx", "2500", "--no-weights"], "max_position_embeddings"),
        (["eval", "{tiny}", "--ref", "{tiny}", "--random-tokens", "16", "--max-tokens", "-1", "--no-weights"], "--max-tokens"),
        (["make-tiny", "{tmp}/m", "--hidden-size", "-5"], "hidden_size"),
        (["make-tiny", "{tmp}/m", "--num-experts-per-tok", "50"], "num_experts_per_tok"),
        (["make-tiny", "{tmp}/m", "--vocab-size", "10"], "vocab_size"),
        (["make-tiny", "{tmp}/m", "--num-hidden-layers", "0"], "num_hidden_layers"),
        (["plan", "{tiny}", "--experts", "7", "--gpu-mem", "0", "--cpu-mem", "1GiB"], "--experts"),
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--router", "4"], "--router 4"),  # named "router:", not the flag
        (["plan", "{tiny}", "--gpu-mem", "0.5", "--cpu-mem", "1GiB"], "--gpu-mem 0.5: bytes are counted whole"),  # was quietly CPU-only
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--offload", "sim", "--gpu-mem", "1.5"], "--gpu-mem 1.5: bytes"),
        (["plan", "{tiny}", "--ctx", "0", "--gpu-mem", "0", "--cpu-mem", "1GiB"], "--ctx"),
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--offload", "sim"], "--gpu-mem"),
        (["generate", "{tiny}", "-p", "x", "-n", "1", "-q", "--offload", "sim", "--gpu-mem", "lots"], "--gpu-mem"),
    ],
)
def test_absurd_flags_are_one_line(argv: list[str], needle: str, tiny_dir: Path, tmp_path: Path) -> None:
    before = set(os.listdir(tmp_path))
    o = run_cli(*(a.replace("{tiny}", str(tiny_dir)).replace("{tmp}", str(tmp_path)) for a in argv))
    assert o.kind == "clean" and needle in o.err, o.why()
    assert "gpu_mem=" not in o.err and "'2MiB'" not in o.err  # CLI syntax, not Python's
    assert not leftovers(tmp_path, before), f"half-written: {leftovers(tmp_path, before)}"


@pytest.mark.parametrize("name", ["GLM-4.5-Air", "GLM-4.7-Flash", "GLM-4.5"])
def test_the_minimum_a_plan_error_states_works(name: str, tmp_path: Path) -> None:
    """"needs at least X" is rounded up, so X as printed works (it used to be rounded to nearest, and
    `--cpu-mem 5.01GiB` was then refused as needing at least 5.01 GiB)."""
    cfg = json.loads((Path(__file__).parent / "data" / "real_configs.json").read_text())[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for flag, budgets in (("--gpu-mem", ["4MiB", "512GiB"]), ("--cpu-mem", ["0", "1GiB"])):
        o = run_cli("plan", tmp_path, "--gpu-mem", budgets[0], "--cpu-mem", budgets[1])
        assert o.kind == "clean" and f"{flag} " in o.err and "needs at least " in o.err, o.why()
        need = o.err.split("needs at least ")[1].split(" (")[0].replace(" ", "")
        budgets[flag == "--cpu-mem"] = need
        o = run_cli("plan", tmp_path, "--gpu-mem", budgets[0], "--cpu-mem", budgets[1])
        assert o.kind == "ok", f"suggested {flag} {need}, which is refused: " + o.why()


def test_ctx_above_the_models_maximum_is_refused(tiny_dir: Path) -> None:
    """No RoPE scaling is implemented, so positions past max_position_embeddings (2048 here) are refused."""
    for argv in (["generate", tiny_dir, "-p", "x", "-n", "1", "-q", "--ctx", "4096"], ["plan", tiny_dir, "--ctx", "4096", "--gpu-mem", "0", "--cpu-mem", "1GiB"]):
        o = run_cli(*argv)
        assert o.kind == "clean" and "max_position_embeddings" in o.err and "2048" in o.err, o.why()


def test_ctx_beyond_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    o = run_cli("make-tiny", tmp_path / "m", "--max-position-embeddings", str(2**31 - 1))
    assert o.kind == "ok", o.why()
    o = run_cli("generate", tmp_path / "m", "-p", "x", "-n", "1", "-q", "--ctx", "1000000000")
    assert o.kind == "clean" and "KV cache" in o.err and "--ctx" in o.err, o.why()


def test_eval_against_another_vocabulary(tiny_dir: Path, tmp_path: Path) -> None:
    o = run_cli("make-tiny", tmp_path / "other", "--vocab-size", "600")
    assert o.kind == "ok", o.why()
    o = run_cli("eval", tiny_dir, "--ref", tmp_path / "other", "--random-tokens", "16", "--ctx", "8", "--no-weights")
    assert o.kind == "clean" and "vocab" in o.err, o.why()


def test_make_tiny_refusal_keeps_an_existing_output(tiny_dir: Path, tmp_path: Path) -> None:
    out = shutil.copytree(tiny_dir, tmp_path / "m")
    before = snapshot(out)
    o = run_cli("make-tiny", out, "--overwrite", "--num-experts-per-tok", "50")
    assert o.kind == "clean" and snapshot(out) == before, o.why()


_TRACE_HEAD = {"format": "localglm-trace", "version": 1, "n_experts": 8, "top_k": 2, "moe_layers": [1, 2]}


@pytest.mark.parametrize(
    ("lines", "needle"),
    [([b"\xff\xfe"], "not UTF-8"), ([b"[1]"], "first line"), ([{**_TRACE_HEAD, "n_experts": 10**12}], "'n_experts'"),
     ([{**_TRACE_HEAD, "moe_layers": 5}], "'moe_layers'"), ([{**_TRACE_HEAD, "expert_bytes": "x"}], "'expert_bytes'"),
     ([_TRACE_HEAD, {"s": 0, "l": 1, "e": [[100, 200]]}], "t.jsonl:2"), ([_TRACE_HEAD, {"s": 0, "l": 1, "e": [[-1, 0]]}], "t.jsonl:2"),
     ([_TRACE_HEAD, b'{"s": Infinity, "l": 1, "e": [[1, 2]]}'], "t.jsonl:2"), ([_TRACE_HEAD, {"s": 0, "l": 1, "e": [[1, 2]]}], "--half-life")],  # fmt: skip
    ids=["not-utf8", "header-list", "huge-n-experts", "layers-int", "bytes-str", "id-too-big", "id-negative", "step-inf", "half-life-0"],
)
def test_simulate_refuses_a_broken_trace_in_one_line(lines: list[Any], needle: str, tmp_path: Path) -> None:
    """A trace's header sizes the simulator's arrays and its ids index them: a wrong type, an absurd size, an id
    outside the header's experts (a negative one counted from the end) or --half-life 0 used to escape as a
    Python error (AttributeError, MemoryError, IndexError, ZeroDivisionError...)."""
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    o = run_cli("simulate", f, *(["--half-life", "0"] if needle == "--half-life" else []))
    assert o.kind == "clean" and needle in o.err, o.why()


@pytest.mark.parametrize(
    ("meta", "counts"), [("[1]", (2, 8)), ('{"moe_layers": [1, 2], "n_experts": "x", "top_k": 2, "tokens": 1}', (2, 8)),
                         ('{"moe_layers": [1, 2], "n_experts": 8, "top_k": 2, "tokens": 1}', (3, 5))],  # fmt: skip
    ids=["meta-list", "n-experts-str", "counts-shape"],
)
def test_a_corrupt_router_stats_profile_is_ignored_or_one_line(meta: str, counts: tuple[int, int], tiny_dir: Path, tmp_path: Path) -> None:
    """The profile offloading saves beside the model: one of the wrong shape or types used to escape RouterStats.load
    as a TypeError / ValueError, so `generate --offload` crashed instead of starting afresh, and `simulate --stats`
    printed a traceback."""
    import numpy as np

    from offload.router_stats import PROFILE_NAME

    model = shutil.copytree(tiny_dir, tmp_path / "m", ignore=shutil.ignore_patterns(PROFILE_NAME))
    np.savez(model / PROFILE_NAME, meta=np.array(meta), counts=np.zeros(counts), cooc=np.zeros((1, 8, 8)))
    o = run_cli("generate", model, "-p", "x", "-n", "1", "-q", "--offload", "sim", "--gpu-mem", "1GiB", "--cache-policy", "stat")
    assert o.kind == "ok", o.why()
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(_TRACE_HEAD) + "\n")
    np.savez(tmp_path / "s.npz", meta=np.array(meta), counts=np.zeros(counts), cooc=np.zeros((1, 8, 8)))
    o = run_cli("simulate", trace, "--stats", tmp_path / "s.npz", "--policies", "stat")
    assert o.kind == "clean" and "s.npz" in o.err, o.why()


@pytest.mark.parametrize("bw", [{"ram": 0}, {"ram": "x"}, {"h2d": -1}, {"measured": 5}, [1]], ids=["zero", "str", "negative", "measured-int", "list"])
def test_plan_refuses_bandwidths_the_cost_model_cannot_divide_by(bw: Any, tiny_dir: Path, tmp_path: Path) -> None:
    """A --bandwidths file with a zero or non-number rate raised ZeroDivisionError / TypeError inside the cost
    model (and a negative one planned negative times)."""
    f = tmp_path / "bw.json"
    f.write_text(json.dumps(bw))
    o = run_cli("plan", tiny_dir, "--bandwidths", f, "--gpu-mem", "1GiB", "--cpu-mem", "1GiB")
    assert o.kind == "clean" and "--bandwidths" in o.err and "bw.json" in o.err, o.why()


# ---- one vocabulary: inspect and plan on every input; plan's ctx is generate's ------------------------------------
def test_inspect_and_plan_read_a_gguf(tiny_dir: Path, tmp_path: Path) -> None:
    from localglm.checkpoint.gguf import export_gguf

    f = export_gguf(tiny_dir, tmp_path / "m.gguf", "q8_0")[0]
    o = run_cli("inspect", f)
    assert o.kind == "ok" and "parameters total" in o.out and "Q8_0" in o.out, o.why()
    o = run_cli("plan", f, "--gpu-mem", "0", "--cpu-mem", "1GiB", "--json")
    assert o.kind == "ok", o.why()
    assert abs(json.loads(o.out)["expert_bits"] - 8.5) < 0.01  # Q8_0's 8.5 bits per weight, as stored


def test_plan_reads_the_always_used_bits_a_gguf_keeps_as_stored(tiny_dir: Path, tmp_path: Path) -> None:
    """A GGUF loads its K-quant / Q4_0 weights as stored (no float copy): plan prices them at their stored
    bits, not bf16, and agrees with what loading actually holds. Q8_0 and float tensors are dequantized
    without a recipe, so those classes stay the planner's to choose."""
    import localglm
    from localglm.checkpoint.gguf import export_gguf
    from quant.formats import QuantTensor

    f = export_gguf(tiny_dir, tmp_path / "m.gguf", "q4_0")[0]  # every weight Q4_0 but lm_head (Q8_0)
    o = run_cli("plan", f, "--gpu-mem", "0", "--cpu-mem", "1GiB", "--json")
    assert o.kind == "ok", o.why()
    plan = json.loads(o.out)
    assert plan["dense_bits"] == {"attn": 4.5, "shared": 4.5, "dense": 4.5, "embed": 4.5, "lm_head": 16}, plan["dense_bits"]
    planned = {i["what"].split(" (")[0]: i["bytes"] for i in plan["items"]}
    model = localglm.load(f)
    layers = model.net.w.layers
    attn = [w for layer in layers for w in (layer.attn.qkv_weight, layer.attn.o_weight)]
    assert all(isinstance(w, QuantTensor) for w in attn) and isinstance(model.net.w.embed, QuantTensor)
    held = sum(w.buf.numel() for w in attn)
    assert abs(planned["attention"] - held) / held < 0.05, (planned["attention"], held)  # q/k/v biases beside the blocks
    assert planned["embeddings"] == model.net.w.embed.buf.numel()
    o = run_cli("plan", _data_dir() / "glm4_moe_kquant_mix.gguf", "--gpu-mem", "0", "--cpu-mem", "1GiB", "--attn", "8")
    assert o.kind == "ok" and "attn q8" in o.out and "lm_head 6.56 bits/weight" in o.out, o.why() + o.out
    o = run_cli("inspect", _data_dir() / "glm4_moe_kquant_mix.gguf")
    assert o.kind == "ok" and "lm_head 6.56" in o.out and "Q2_K" in o.out, o.why()


def _data_dir() -> Path:
    return Path(__file__).parent / "data"


def test_inspects_held_types_are_the_loaders() -> None:
    from localglm.model_info import GGUF_HELD_TYPES
    from quant.kquants import GGML_TYPES

    assert set(GGML_TYPES) == GGUF_HELD_TYPES


def test_plan_uses_a_quantized_directorys_stored_bits(quantized: Path) -> None:
    o = run_cli("plan", quantized, "--gpu-mem", "0", "--cpu-mem", "1GiB", "--json")
    assert o.kind == "ok", o.why()
    plan = json.loads(o.out)
    stored = json.loads((quantized / MANIFEST).read_text())["stats"]["class_bits_per_weight"]["experts"]  # q2 on tiny rows
    assert abs(plan["expert_bits"] - stored) < 0.01, f"accepted: planned {plan['expert_bits']} bits for experts stored at {stored:.2f}"
    assert plan["dense_bits"]["attn"] == 4  # q4 as stored (the 2-bit recipe's attention), not bf16
    o = run_cli("plan", quantized, "--gpu-mem", "0", "--cpu-mem", "1GiB", "--experts", "4")
    assert o.kind == "clean" and "--experts" in o.err, o.why()
    o = run_cli("inspect", quantized)
    assert o.kind == "ok" and "q2" in o.out, o.why()


def test_export_gguf_from_a_quantized_directory_names_the_float_checkpoint(quantized: Path, tiny_dir: Path, tmp_path: Path) -> None:
    o = run_cli("export-gguf", quantized, tmp_path / "m.gguf", "-q")
    assert o.kind == "clean" and "export from the float checkpoint" in o.err and str(tiny_dir) in o.err, o.why()
    assert not list(tmp_path.iterdir())


def test_plan_defaults_to_generates_context(tiny_dir: Path) -> None:
    import localglm

    o = run_cli("plan", tiny_dir, "--gpu-mem", "0", "--cpu-mem", "1GiB", "--json")
    assert o.kind == "ok", o.why()
    assert json.loads(o.out)["ctx"] == localglm.load(tiny_dir).ctx


# ---- output discipline -------------------------------------------------------------------------------------------
def test_generate_stats_line_goes_to_stderr(tiny_dir: Path) -> None:
    o = run_cli("generate", tiny_dir, "-p", "def f(", "-n", "4", "--temperature", "0", "--ignore-eos", "-q")
    assert o.kind == "ok", o.why()
    assert "decode:" not in o.out and "decode:" in o.err
    assert not o.out.startswith("\n") and "\n\n" not in o.out
    o = run_cli("generate", tiny_dir, "-p", "def f(", "-n", "4", "--temperature", "0", "--ignore-eos", "-q", "--stats-json")
    assert json.loads(o.out.strip().splitlines()[-1])["decode_tokens"] == 4 and "decode:" in o.err


def test_long_commands_report_progress_lines_when_not_on_a_tty(tiny_dir: Path, tmp_path: Path) -> None:
    o = run_cli("quantize", tiny_dir, tmp_path / "q")
    assert o.kind == "ok", o.why()
    lines = [line for line in o.err.splitlines() if line.strip()]
    assert lines and all("\x1b" not in line and "\r" not in line for line in lines)
    assert any("quantiz" in line and "%" in line for line in lines), o.err
    o = run_cli("export-gguf", tiny_dir, tmp_path / "m.gguf")
    assert o.kind == "ok" and any("%" in line for line in o.err.splitlines()), o.err
    o = run_cli("generate", tiny_dir, "-p", "x", "-n", "1")
    assert o.kind == "ok" and "\n\n" not in o.err and any("load" in line for line in o.err.splitlines()), o.err


def test_the_readme_model_table_comes_from_plan() -> None:
    """benchmarks/model_table.py: one row per runnable published config and expert width, from `localglm plan`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_table", Path(__file__).parent.parent / "benchmarks" / "model_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.table()
    rows = [line for line in table.splitlines() if line.startswith("| GLM-4.5-Air |")]
    assert [r.split(" | ")[1] for r in rows] == ["2", "4", "8"]
    disk = [float(r.split(" | ")[2]) for r in rows]
    assert disk[0] < disk[1] < disk[2]
    assert "Not yet runnable" not in table  # every published GLM (GLM-5.x included) is runnable and listed
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    assert block in readme, "README's model table has drifted from `localglm plan`: run python benchmarks/model_table.py and paste it"


@pytest.mark.parametrize("overwrite", [False, True])
def test_writers_never_replace_a_device_or_a_link(overwrite: bool, tmp_path: Path) -> None:
    """`make-tiny /dev/null` renamed the device aside, put the checkpoint in its place and deleted the device
    (found by a hostile-input sweep, run as root). A FIFO stands in for the device node here: it is neither a
    file nor a directory. Every writer refuses in one line and leaves the path as it was."""
    fifo = tmp_path / "node.gguf"
    os.mkfifo(fifo)
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    flag = ["--overwrite"] if overwrite else []
    for args in (["make-tiny", fifo, *flag], ["make-tiny", link, *flag]):
        o = run_cli(*args)
        assert o.kind == "clean" and "not a directory" in o.err, o.why()
    src = run_cli("make-tiny", tmp_path / "src")
    assert src.rc == 0, src.why()
    o = run_cli("export-gguf", tmp_path / "src", fifo, "-q", *flag)
    assert o.kind == "clean" and "not a regular file" in o.err, o.why()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "node.gguf", "src"]


def test_a_trace_never_overwrites_what_is_not_a_trace(tiny_dir: Path, tmp_path: Path) -> None:
    """`--trace model/config.json` replaced the config and `record-trace -o model/shard` a shard (a memory-mapped
    one then killed the run with SIGBUS): a trace goes only where nothing is, or over an earlier trace."""
    model = shutil.copytree(tiny_dir, tmp_path / "m")
    before = snapshot(model)
    shard = sorted(model.glob("*.safetensors"))[0]
    for args in (["generate", model, "-p", "x", "-n", "2", "-q", "--trace", model / "config.json"],
                 ["record-trace", model, "-o", shard, "-p", "x", "-n", "2", "-q"], ["record-trace", model, "-o", model, "-p", "x", "-q"]):  # fmt: skip
        o = run_cli(*args)
        assert o.kind == "clean" and "refusing" in o.err, o.why()
    assert snapshot(model) == before
    trace = tmp_path / "t.jsonl"
    for _ in range(2):  # a new path, then the same trace again
        o = run_cli("record-trace", model, "-o", trace, "-p", "x", "-n", "2", "-q")
        assert o.rc == 0 and trace.read_text().startswith('{"format": "localglm-trace"'), o.why()


def test_make_tiny_overwrites_only_an_earlier_make_tiny_output(tmp_path: Path) -> None:
    """`make-tiny DIR --overwrite` deleted whatever DIR held; now only an earlier make-tiny output is replaced."""
    mine = tmp_path / "v"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("x")
    o = run_cli("make-tiny", mine, "--overwrite")
    assert o.kind == "clean" and "not a make-tiny checkpoint" in o.err and (mine / "notes.txt").read_text() == "x", o.why()
    out = tmp_path / "m"
    assert run_cli("make-tiny", out).rc == 0 and run_cli("make-tiny", out, "--overwrite", "--seed", "3").rc == 0
    (out / "notes.txt").write_text("x")
    o = run_cli("make-tiny", out, "--overwrite")
    assert o.kind == "clean" and "notes.txt" in o.err and (out / "notes.txt").exists(), o.why()


@pytest.mark.parametrize(("flag", "value", "needle"), [("--hidden-size", 99999999, "available memory"), ("--num-hidden-layers", 10**7, "num_hidden_layers"),
                                                       ("--vocab-size", 2**31 - 1, "available memory"), ("--vocab-size", 10**7, "corpus")])  # fmt: skip
def test_make_tiny_refuses_an_absurd_size_before_allocating(flag: str, value: int, needle: str, tmp_path: Path) -> None:
    """These died in torch's allocator, spent minutes before safetensors refused the header, or aborted the
    process in the tokenizer trainer's allocator, leaving its temporary directory behind."""
    o = run_cli("make-tiny", tmp_path / "m", flag, value)
    assert o.kind == "clean" and needle in o.err, o.why()
    assert list(tmp_path.iterdir()) == []


def test_outputs_have_a_plain_folders_modes(tiny_dir: Path, tmp_path: Path) -> None:
    """make-tiny and quantize published mkdtemp's 0700 folder with 0600 files: readable by their owner only."""
    from localglm.checkpoint.writing import process_umask

    mask = process_umask()
    assert run_cli("make-tiny", tmp_path / "m").rc == 0
    assert run_cli("quantize", tiny_dir, tmp_path / "q", "--experts", "4").rc == 0
    for out in (tmp_path / "m", tmp_path / "q"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}, out
