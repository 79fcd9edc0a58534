"""Corrupt and hostile files: shards, indexes, quantized manifests and shards, GGUF metadata, generation
configs. Each is refused with one line naming the file (or, for a garbage generation_config.json, loads
with a warning); nothing escapes as a traceback, and nothing outside the model directory is read."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import localglm
from localglm.errors import LocalGLMError
from localglm.quantize import quantize_checkpoint
from quant.recipe import Recipe
from tests.probes import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
MANIFEST = "localglm_quant.json"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def quantized(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("q") / "q2", Recipe.from_options({"experts": 2})).out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _loads_or_refuses(path: Path, *needles: str) -> None:
    """`localglm.load(path)` must refuse in one line that names every needle (a traceback fails the probe)."""
    try:
        localglm.load(path)
    except LocalGLMError as exc:
        msg = str(exc)
        assert "\n" not in msg and all(n in msg for n in needles), f"unclear: {msg}"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {type(exc).__name__}: {str(exc)[:200]}")
    pytest.fail(f"accepted: {path} loaded")


# ---- safetensors and the index ----------------------------------------------------------------------------
def _index(model: Path) -> dict:
    return json.loads((model / "model.safetensors.index.json").read_text())


def _rewrite_index(model: Path, change: Callable[[dict], None]) -> None:
    idx = _index(model)
    change(idx)
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_index_paths_may_not_leave_the_model_directory(tiny_dir: Path, tmp_path: Path, how: str) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(model.glob("model-*.safetensors"))[0]
    shutil.move(first, outside / first.name)  # the real shard, now outside: reading it would "work"
    target = f"../outside/{first.name}" if how == "relative" else str(outside / first.name)
    _rewrite_index(model, lambda idx: idx["weight_map"].update({k: target for k, v in idx["weight_map"].items() if v == first.name}))
    _loads_or_refuses(model, "model.safetensors.index.json", target)


def test_index_naming_etc_passwd_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    _rewrite_index(model, lambda idx: idx["weight_map"].update({"model.norm.weight": "../../../../../../../../etc/passwd"}))
    _loads_or_refuses(model, "../../../../../../../../etc/passwd")


def test_overlapping_data_offsets_are_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    f = _safetensors(tmp_path / "model.safetensors", header, bytes(24))
    from localglm.checkpoint.source import SafetensorsSource

    try:
        SafetensorsSource(f)
    except LocalGLMError as exc:
        assert "overlap" in str(exc) and "model.safetensors" in str(exc) and "\n" not in str(exc), f"unclear: {exc}"
        return
    pytest.fail("accepted: overlapping data_offsets")


@pytest.mark.parametrize(
    ("name", "header", "data"),
    [
        ("deep-header", DEEP, b""),
        ("header-list", [], b""),
        ("bad-dtype", {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        ("negative-shape", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
        ("huge-shape", {"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, bytes(4)),
        ("past-end", {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(4)),
        ("offsets-strings", {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, bytes(4)),
        ("metadata-list", {"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "",
)
def test_corrupt_safetensors_headers(tmp_path: Path, name: str, header: object, data: bytes) -> None:
    from localglm.checkpoint.source import SafetensorsSource

    f = tmp_path / "model.safetensors"
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    try:
        SafetensorsSource(f)
    except LocalGLMError as exc:
        assert "model.safetensors" in str(exc) and "\n" not in str(exc), f"unclear: {exc}"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {type(exc).__name__}: {str(exc)[:200]}")
    pytest.fail(f"accepted: {name}")


@pytest.mark.parametrize(
    ("name", "text"),
    [("deep", DEEP), ("not-json", "{"), ("list", "[]"), ("map-list", '{"weight_map": []}'), ("empty-map", '{"weight_map": {}}'),
     ("non-string", '{"weight_map": {"a": 5}}'), ("missing-shard", '{"weight_map": {"model.norm.weight": "nope.safetensors"}}')],  # fmt: skip
    ids=lambda v: v if len(v) < 20 else "",
)
def test_corrupt_indexes(tiny_dir: Path, tmp_path: Path, name: str, text: str) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(text)
    _loads_or_refuses(model, "model.safetensors.index.json")


def test_truncated_and_emptied_shards(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _loads_or_refuses(model, shard.name)
    shard.write_bytes(b"")
    _loads_or_refuses(model, shard.name)
    shard.unlink()
    shard.mkdir()  # a directory where a shard should be
    _loads_or_refuses(model, shard.name)


# ---- quantized directories ------------------------------------------------------------------------------
def _data_region(shard: Path) -> tuple[int, int]:
    n = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    return 8 + n, shard.stat().st_size


def test_a_bit_flipped_quantized_shard_is_named(quantized: Path, tmp_path: Path) -> None:
    q = _copy(quantized, tmp_path / "q")
    shard = sorted(q.glob("*.safetensors"))[-1]
    begin, end = _data_region(shard)
    data = bytearray(shard.read_bytes())
    data[(begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    _loads_or_refuses(q, shard.name)


def test_no_verify_skips_the_checksums(quantized: Path, tmp_path: Path) -> None:
    """The opt-out for a model too big to read twice: a damaged shard then loads (the user asked)."""
    q = _copy(quantized, tmp_path / "q")
    shard = sorted(q.glob("*.safetensors"))[-1]
    begin, end = _data_region(shard)
    data = bytearray(shard.read_bytes())
    data[end - 1] ^= 0x01
    shard.write_bytes(bytes(data))
    localglm.load(q, verify=False)
    o = run_cli("generate", q, "-p", "x", "-n", "1", "-q", "--no-verify")
    assert o.kind == "ok", o.why()
    o = run_cli("generate", q, "-p", "x", "-n", "1", "-q")
    assert o.kind == "clean" and shard.name in o.err and "damaged" in o.err, o.why()


def _edit_manifest(q: Path, change: Callable[[dict], None]) -> None:
    man = json.loads((q / MANIFEST).read_text())
    change(man)
    (q / MANIFEST).write_text(json.dumps(man))


def _layout_q7(m: dict) -> None:
    m["experts"]["layouts"]["1"]["gate_up"] = "q7"


def _spec_q7(m: dict) -> None:
    m["tensors"][next(iter(m["tensors"]))]["spec"] = "q7"


def _dtype_f64(m: dict) -> None:
    m["experts"]["dtype"] = "float64"


def _count_str(m: dict) -> None:
    m["experts"]["count"]["1"] = "many"


def _tensors_list(m: dict) -> None:
    m["tensors"] = []


def _shape_str(m: dict) -> None:
    m["tensors"][next(iter(m["tensors"]))]["shape"] = "big"


def _recipe_bad(m: dict) -> None:
    m["recipe"] = {"bits": {"experts": 3}}


def _layer_key(m: dict) -> None:
    m["experts"]["layouts"]["one"] = m["experts"]["layouts"].pop("1")


MANIFEST_EDITS = [_layout_q7, _spec_q7, _dtype_f64, _count_str, _tensors_list, _shape_str, _recipe_bad, _layer_key]


@pytest.mark.parametrize("edit", MANIFEST_EDITS, ids=[e.__name__.strip("_") for e in MANIFEST_EDITS])
def test_corrupt_manifests(quantized: Path, tmp_path: Path, edit: Callable[[dict], None]) -> None:
    q = _copy(quantized, tmp_path / "q")
    _edit_manifest(q, edit)
    _loads_or_refuses(q, MANIFEST)


@pytest.mark.parametrize("text", [DEEP, "[]", "{", '{"format": "localglm-quant", "version": 2, "experts": 5}'], ids=["deep", "list", "not-json", "experts-int"])
def test_unreadable_manifests(quantized: Path, tmp_path: Path, text: str) -> None:
    q = _copy(quantized, tmp_path / "q")
    (q / MANIFEST).write_text(text)
    _loads_or_refuses(q, MANIFEST)


def test_manifest_layout_q7_through_the_cli(quantized: Path, tmp_path: Path) -> None:
    q = _copy(quantized, tmp_path / "q")
    _edit_manifest(q, _layout_q7)
    o = run_cli("generate", q, "-p", "x", "-n", "1", "-q")
    assert o.kind == "clean" and MANIFEST in o.err, o.why()


# ---- generation_config.json: garbage is warned about, never fatal --------------------------------------------
@pytest.mark.parametrize(
    ("name", "text"),
    [("not-json", "{"), ("list", "[1, 2]"), ("deep", DEEP), ("bad-type", '{"temperature": "hot"}'), ("out-of-range", '{"top_p": 7}'),
     ("nan", '{"temperature": NaN}')],  # fmt: skip
    ids=lambda v: v if len(v) < 20 else "",
)
def test_garbage_generation_config_warns(tiny_dir: Path, tmp_path: Path, name: str, text: str) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    (model / "generation_config.json").write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            localglm.load(model)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"traceback: {type(exc).__name__}: {str(exc)[:200]}")
    said = [str(w.message) for w in caught if "generation_config.json" in str(w.message)]
    assert said and "\n" not in said[0], f"accepted: {name} loaded without a warning"


def test_garbage_generation_config_is_one_warning_line_in_the_cli(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path / "m")
    (model / "generation_config.json").write_text("[1, 2]")
    o = run_cli("generate", model, "-p", "x", "-n", "1", "-q")
    warned = [line for line in o.err.splitlines() if "generation_config.json" in line]
    assert o.kind == "ok" and len(warned) == 1 and warned[0].startswith("localglm: warning:"), o.why()


# ---- GGUF files -------------------------------------------------------------------------------------------
def _gguf_bytes(n_nest: int) -> bytes:
    """A GGUF whose one metadata value is an array nested `n_nest` deep."""
    out = b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 0) + struct.pack("<Q", 1)
    key = b"general.architecture"
    out += struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)  # an array
    out += (struct.pack("<I", 9) + struct.pack("<Q", 1)) * n_nest + struct.pack("<I", 4) + struct.pack("<Q", 0)
    return out


@pytest.mark.parametrize(
    ("name", "data"),
    [("deep-array", _gguf_bytes(100_000)), ("bad-magic", b"GGUX" + bytes(40)), ("empty", b""), ("short", b"GGUF\x03\x00"),
     ("huge-count", b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 2**60) + struct.pack("<Q", 2**60))],  # fmt: skip
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_gguf_files(tmp_path: Path, name: str, data: bytes) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(data)
    for argv in (("inspect", f), ("generate", f, "-p", "x", "-n", "1", "-q")):
        o = run_cli(*argv)
        assert o.kind == "clean" and "model.gguf" in o.err, o.why()
