"""SafetensorsSource (lazy reader) and save_safetensors_sharded (writer): layouts, FP8, and every user error."""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localglm.errors import CheckpointError
from localglm.checkpoint.safetensors import quantize_fp8_blockwise, save_safetensors_sharded
from localglm.checkpoint.source import SafetensorsSource, TensorSource

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _model_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A few GLM-named tensors; float ones in `dtype`, the router bias in fp32 as real checkpoints have it."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 32, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(48, generator=g).to(dtype),
        "model.layers.0.mlp.gate.weight": torch.randn(8, 32, generator=g).to(dtype),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(32, 24, generator=g).to(dtype),
        "model.norm.weight": torch.ones(32, dtype=dtype),
        "lm_head.weight": torch.randn(64, 32, generator=g).to(dtype),
    }


def _write_raw_safetensors(path: Path, header: Mapping[str, object], data: bytes) -> None:
    """Hand-made file for the cases the real writer refuses to produce."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # pad like the real writer, so data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _error(excinfo: pytest.ExceptionInfo[CheckpointError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def _sharded(tmp_path: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = 6000) -> Path:
    out = tmp_path / "sharded"
    files = save_safetensors_sharded(tensors, out, max_shard_bytes=shard_bytes)
    assert len(files) > 2, "test needs several shards"
    return out


# ---------------------------------------------------------------------------- plain layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_and_sharded_load_identically(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _model_tensors(dtype)
    single = tmp_path / "single"
    assert save_safetensors_sharded(tensors, single) == [single / "model.safetensors"]
    sharded = _sharded(tmp_path, tensors)
    assert (sharded / "model.safetensors.index.json").is_file()

    unindexed = tmp_path / "unindexed"  # a plain directory of shards, no index
    unindexed.mkdir()
    for shard in sharded.glob("*.safetensors"):
        (unindexed / shard.name).write_bytes(shard.read_bytes())

    paths = [single, single / "model.safetensors", sharded, sharded / "model.safetensors.index.json", unindexed]
    for path in paths:
        with SafetensorsSource(path) as src:
            assert isinstance(src, TensorSource)
            assert src.names() == sorted(tensors)
            for name, ref in tensors.items():
                assert name in src
                info = src.info(name)
                assert (info.shape, info.dtype, info.stored_dtype, info.scale) == (tuple(ref.shape), ref.dtype, ref.dtype, None)
                assert info.nbytes == ref.numel() * ref.element_size()
                got = src.get(name, expected_shape=tuple(ref.shape))
                assert got.dtype == ref.dtype and torch.equal(got, ref)
            assert "model.layers.1.mlp.gate.weight" not in src


def test_get_converts_dtype_and_handles_other_dtypes(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(5, 3, dtype=torch.bfloat16),
        "i64": torch.arange(7, dtype=torch.int64),
        "i32": torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(10, dtype=torch.uint8),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_safetensors_sharded(tensors, tmp_path)
    with SafetensorsSource(tmp_path) as src:
        for name, ref in tensors.items():
            assert torch.equal(src.get(name), ref), name
        converted = src.get("w", dtype=torch.float32)
        assert converted.dtype == torch.float32 and torch.equal(converted, tensors["w"].float())
        converted.add_(1)  # a converted tensor is a fresh, writable copy
        assert torch.equal(src.get("w"), tensors["w"])


def test_misaligned_data_from_other_writers(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = {"v": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    path = tmp_path / "odd.safetensors"
    _write_raw_safetensors(path, header, b"\x00" + values.numpy().tobytes())
    assert _data_start(path) % 8 == 0  # so the tensor at data offset 1 is misaligned for float32
    with SafetensorsSource(path) as src:
        assert torch.equal(src.get("v"), values)


def test_listing_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _model_tensors(torch.float32)
    out = _sharded(tmp_path, tensors)
    for shard in out.glob("*.safetensors"):  # garbage over every data region, sizes unchanged
        raw = bytearray(shard.read_bytes())
        start = _data_start(shard)
        raw[start:] = b"\xa5" * (len(raw) - start)
        shard.write_bytes(bytes(raw))

    def no_mmap(*args: object, **kwargs: object) -> None:
        raise AssertionError("listing must not map tensor data")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    with SafetensorsSource(out) as src:
        assert src.names() == sorted(tensors)
        assert {n: src.info(n).shape for n in src.names()} == {n: tuple(t.shape) for n, t in tensors.items()}
        with pytest.raises(AssertionError, match="must not map"):
            src.get("lm_head.weight")


def test_tensors_outlive_close(tmp_path: Path) -> None:
    tensors = _model_tensors(torch.float16)
    save_safetensors_sharded(tensors, tmp_path)
    with SafetensorsSource(tmp_path) as src:
        kept = src.get("lm_head.weight")
    assert torch.equal(kept, tensors["lm_head.weight"])
    with pytest.raises(RuntimeError, match="after close"):
        src.get("lm_head.weight")


# ---------------------------------------------------------------------------- FP8


def _reference_block_dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The obvious loop over blocks, independent of the reader's vectorised expansion."""
    out = torch.empty(q.shape, dtype=torch.float32)
    b0, b1 = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def _assert_within_fp8_rounding(deq: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    """e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus subnormal spacing 2**-9 times the block scale."""
    scale_full = scale.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    bound = w.abs() * 2**-4 + scale_full * 2**-9 + 1e-12
    assert bool(((deq.float() - w).abs() <= bound).all())


@pytest.mark.parametrize(
    ("shape", "block", "config"),
    [
        ((300, 200), (128, 128), FP8_CONFIG),  # neither dim a multiple of 128
        ((130, 385), (128, 128), {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}),  # default block
        ((50, 70), (16, 32), {**FP8_CONFIG, "weight_block_size": [16, 32]}),
    ],
)
def test_fp8_block_scaled_dequantizes(tmp_path: Path, shape: tuple[int, int], block: tuple[int, int], config: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[1])  # blocks with very different ranges
    w[: block[0], : block[1]] = 0  # an all-zero block
    q, scale = quantize_fp8_blockwise(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors = {name: q, name + "_scale_inv": scale, "model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=q.numel())  # weight and its scale in different shards
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "quantization_config": config}))

    reference = _reference_block_dequant(q, scale, block)
    with SafetensorsSource(tmp_path) as src:
        assert src.names() == sorted([name, "model.norm.weight"])
        assert name + "_scale_inv" not in src
        info = src.info(name)
        assert (info.dtype, info.stored_dtype, info.scale, info.shape) == (torch.bfloat16, torch.float8_e4m3fn, name + "_scale_inv", shape)
        default = src.get(name, expected_shape=shape)
        assert default.dtype == torch.bfloat16 and torch.equal(default, reference.to(torch.bfloat16))
        exact = src.get(name, dtype=torch.float32)
        assert torch.equal(exact, reference)
        _assert_within_fp8_rounding(exact, w, scale, block)
        assert torch.equal(src.raw(name + "_scale_inv"), scale)
        with pytest.raises(CheckpointError, match="quantization scale"):
            src.info(name + "_scale_inv")


def test_fp8_stacked_experts_and_explicit_config(tmp_path: Path) -> None:
    w = torch.randn(3, 40, 50)
    q, scale = quantize_fp8_blockwise(w, (16, 16))
    assert scale.shape == (3, 3, 4)
    save_safetensors_sharded({"experts.w": q, "experts.w_scale_inv": scale}, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))  # block 128: wrong here
    with pytest.raises(CheckpointError, match="experts.w_scale_inv"):
        SafetensorsSource(tmp_path)
    with SafetensorsSource(tmp_path, quantization_config={**FP8_CONFIG, "weight_block_size": [16, 16]}) as src:
        got = src.get("experts.w", dtype=torch.float32)
    for e in range(3):
        assert torch.equal(got[e], _reference_block_dequant(q[e], scale[e], (16, 16)))


def test_compressed_tensors_scales(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, 12, generator=g)
    channel_scale = (w.abs().amax(dim=1, keepdim=True) / 448).float()
    q_channel = (w / channel_scale).to(torch.float8_e4m3fn)
    tensor_scale = torch.tensor([w.abs().max() / 448])
    q_tensor = (w / tensor_scale).to(torch.float8_e4m3fn)
    tensors = {
        "a.weight": q_channel,
        "a.weight_scale": channel_scale,
        "a.input_scale": torch.tensor([0.5]),
        "b.weight": q_tensor,
        "b.weight_scale": tensor_scale,
        "attn.k_scale": torch.tensor(1.0),
        "norm.weight": torch.ones(12),
    }
    save_safetensors_sharded(tensors, tmp_path)
    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}, "targets": ["Linear"]}},
    }
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    with SafetensorsSource(tmp_path) as src:
        assert src.names() == ["a.weight", "b.weight", "norm.weight"]
        assert torch.equal(src.get("a.weight", dtype=torch.float32), q_channel.float() * channel_scale)
        assert torch.equal(src.get("b.weight", dtype=torch.float32), q_tensor.float() * tensor_scale)
        assert src.get("a.weight").dtype == torch.bfloat16
        assert (src.get("a.weight", dtype=torch.float32) - w).abs().max() <= channel_scale.max() * 32


# ---------------------------------------------------------------------------- errors


def test_error_missing_path_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(tmp_path / "nowhere")
    _error(excinfo, "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(tmp_path / "empty")
    _error(excinfo, "empty", "no model.safetensors")


def test_error_malformed_index(tmp_path: Path) -> None:
    out = _sharded(tmp_path, _model_tensors(torch.float32))
    index = out / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"lm_head.weight": ')
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, "model.safetensors.index.json", "malformed index JSON")
    index.write_text('{"weight_map": ["lm_head.weight"]}')
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, "model.safetensors.index.json", "weight_map")


def test_error_index_names_missing_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path, _model_tensors(torch.float32))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["lm_head.weight"]
    (out / shard).unlink()
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    holders = sorted(n for n, f in weight_map.items() if f == shard)
    message = _error(excinfo, shard, "missing")
    assert any(h in message for h in holders)


def test_error_index_lists_tensor_not_in_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path, _model_tensors(torch.float32))
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.9.mlp.gate.weight"] = data["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, "model.layers.9.mlp.gate.weight", data["weight_map"]["lm_head.weight"])


def _first_shard_and_tensor(out: Path) -> tuple[Path, str]:
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = sorted(weight_map)[0]
    return out / weight_map[name], name


def test_error_unreadable_header(tmp_path: Path) -> None:
    out = _sharded(tmp_path, _model_tensors(torch.float32))
    shard, name = _first_shard_and_tensor(out)
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\x00\xff{["  # not JSON any more
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, shard.name, name, "header unreadable")

    shard.write_bytes(b"\x01\x02")  # shorter than the length prefix
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, shard.name, name, "header unreadable")


def test_error_header_length_beyond_file(tmp_path: Path) -> None:
    out = _sharded(tmp_path, _model_tensors(torch.float32))
    shard, name = _first_shard_and_tensor(out)
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 10)
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(out)
    _error(excinfo, shard.name, name, "header length", "beyond the file size")


def test_error_truncated_file_names_first_affected_tensor(tmp_path: Path) -> None:
    tensors = _model_tensors(torch.float32)
    save_safetensors_sharded(tensors, tmp_path)
    path = tmp_path / "model.safetensors"
    header = json.loads(path.read_bytes()[8:_data_start(path)])
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    cut_in = by_offset[-3]  # cut inside the third-last tensor: it and the two after it are gone
    cut_at = _data_start(path) + header[cut_in]["data_offsets"][0] + 4
    with path.open("r+b") as f:
        f.truncate(cut_at)
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(tmp_path)
    message = _error(excinfo, "model.safetensors", cut_in, "truncated")
    assert "3 tensor(s)" in message


def test_error_file_shrinks_after_open(tmp_path: Path) -> None:
    save_safetensors_sharded(_model_tensors(torch.float32), tmp_path)
    path = tmp_path / "model.safetensors"
    with SafetensorsSource(tmp_path) as src:
        with path.open("r+b") as f:
            f.truncate(_data_start(path) + 4)
        with pytest.raises(CheckpointError) as excinfo:
            src.get("lm_head.weight")
    _error(excinfo, "model.safetensors", "lm_head.weight", "shrank")


def test_error_get_missing_tensor_suggests_close_names(tmp_path: Path) -> None:
    save_safetensors_sharded(_model_tensors(torch.float32), tmp_path)
    with SafetensorsSource(tmp_path) as src, pytest.raises(CheckpointError) as excinfo:
        src.get("model.layers.0.self_attn.q_proj.weights")
    _error(excinfo, "model.safetensors", "model.layers.0.self_attn.q_proj.weights", "close names: model.layers.0.self_attn.q_proj.weight")


def test_error_expected_shape_mismatch(tmp_path: Path) -> None:
    save_safetensors_sharded(_model_tensors(torch.float32), tmp_path)
    with SafetensorsSource(tmp_path) as src, pytest.raises(CheckpointError) as excinfo:
        src.get("lm_head.weight", expected_shape=(32, 64))
    file = tmp_path / "model.safetensors"
    assert str(excinfo.value) == f"tensor lm_head.weight in {file} has shape (64, 32), expected (32, 64)"


def test_error_fp8_weight_without_scale(tmp_path: Path) -> None:
    q, _ = quantize_fp8_blockwise(torch.randn(8, 8))
    save_safetensors_sharded({"x.weight": q, "y.weight": torch.ones(2)}, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    with SafetensorsSource(tmp_path) as src:
        assert torch.equal(src.get("y.weight"), torch.ones(2))  # the rest stays readable
        with pytest.raises(CheckpointError) as excinfo:
            src.get("x.weight")
    _error(excinfo, "model.safetensors", "x.weight", "no scale tensor")


def test_error_unsupported_dtype(tmp_path: Path) -> None:
    header = {
        "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "odd": {"dtype": "F4", "shape": [4], "data_offsets": [8, 10]},
    }
    _write_raw_safetensors(tmp_path / "weird.safetensors", header, bytes(10))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(tmp_path)
    _error(excinfo, "weird.safetensors", "odd", "unsupported dtype 'F4'")


def test_error_bad_offsets_and_duplicates(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    _write_raw_safetensors(tmp_path / "a.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(tmp_path / "a.safetensors")
    _error(excinfo, "a.safetensors", "tensor w", "needs 16")

    dup = tmp_path / "dup"
    dup.mkdir()
    for stem in ("a", "b"):
        _write_raw_safetensors(dup / f"{stem}.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError) as excinfo:
        SafetensorsSource(dup)
    _error(excinfo, "a.safetensors", "b.safetensors", "tensor w")


# ---------------------------------------------------------------------------- writer


def test_writer_streams_shards_like_hugging_face(tmp_path: Path) -> None:
    tensors = _model_tensors(torch.float32)
    big = torch.randn(100, 40)  # 16000 bytes: larger than a shard, so it gets one of its own (as does the embedding)
    seen_temp_midway: list[bool] = []

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for i, (name, t) in enumerate(tensors.items()):
            if i == len(tensors) - 1:
                seen_temp_midway.append(any(p.name.endswith(".tmp") for p in tmp_path.iterdir()))
            yield name, t
        yield "big.weight", big

    files = save_safetensors_sharded(stream(), tmp_path, max_shard_bytes=6000, metadata={"origin": "test"})
    assert seen_temp_midway == [True], "full shards must be written while the stream is still running"
    shards, index_path = files[:-1], files[-1]
    assert index_path == tmp_path / "model.safetensors.index.json"
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files), "no temp files may remain"

    index = json.loads(index_path.read_text())
    assert set(index) == {"metadata", "weight_map"}
    expected = {**tensors, "big.weight": big}
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 6000 or len(part) == 1  # only a tensor bigger than a shard may overflow it, alone
        loaded.update(part)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_writer_replaces_previous_checkpoint_and_single_file(tmp_path: Path) -> None:
    tensors = _model_tensors(torch.bfloat16)
    _sharded(tmp_path, tensors)
    files = save_safetensors_sharded(tensors, tmp_path / "sharded", max_shard_bytes=10**9)
    assert files == [tmp_path / "sharded" / "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["model.safetensors"]
    with SafetensorsSource(tmp_path / "sharded") as src:
        assert src.names() == sorted(tensors)


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in _model_tensors(torch.float32).items():
            yield name, t
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_safetensors_sharded(failing(), tmp_path, max_shard_bytes=6000)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="given twice"):
        save_safetensors_sharded([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fp8_checkpoint_survives_safetensors_reference_reader(tmp_path: Path) -> None:
    q, scale = quantize_fp8_blockwise(torch.randn(130, 129))
    save_safetensors_sharded({"w.weight": q, "w.weight_scale_inv": scale}, tmp_path)
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["w.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(loaded["w.weight"].view(torch.uint8), q.view(torch.uint8))
    assert re.fullmatch(r"model\.safetensors", os.listdir(tmp_path)[0])
