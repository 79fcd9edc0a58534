"""Loading checkpoints: layouts, dtypes, FP8, and named errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import localglm
from localglm.errors import CheckpointError, ConfigError, LocalGLMError
from localglm.checkpoint.safetensors import save_safetensors_sharded
from localglm.checkpoint.source import SafetensorsSource
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny

IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7]])


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_and_single_file_load_identically(tiny_fp32_dir: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    for f in tiny_fp32_dir.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, single / f.name)
    with SafetensorsSource(tiny_fp32_dir) as src:
        save_safetensors_sharded(((n, src.get(n).clone()) for n in src.names()), single)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    assert len(list(tiny_fp32_dir.glob("model-*.safetensors"))) > 1
    a = localglm.load(tiny_fp32_dir).logits(IDS)
    b = localglm.load(single).logits(IDS)
    assert torch.equal(a, b)


def _reference_dequant(w8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = w8.shape
    s = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return w8.float() * s


def test_fp8_block_scaled_checkpoint_loads_exactly(tmp_path: Path) -> None:
    """GLM-4.5-FP8 layout: e4m3 weights + weight_scale_inv blocks, shapes not multiples of 128."""
    spec = dict(hidden_size=160, moe_intermediate_size=96, intermediate_size=200, seed=3)
    src_dir = make_tiny(tmp_path / "f32", TinySpec(dtype="float32", **spec))
    fp8_dir = make_tiny(tmp_path / "fp8", TinySpec(dtype="fp8", **spec))
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    # Rebuild the checkpoint by dequantizing by hand into float32: our loader must give the same logits.
    manual = tmp_path / "manual"
    shutil.copytree(fp8_dir, manual)
    for f in manual.glob("model*"):
        f.unlink()
    with SafetensorsSource(fp8_dir) as src:
        raw = set(src.raw_names())
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in raw
        tensors = []
        for n in src.names():
            t = src.raw(n)
            if t.dtype == torch.float8_e4m3fn:
                t = _reference_dequant(t, src.raw(n + "_scale_inv"))
            tensors.append((n, t.float().clone()))
    save_safetensors_sharded(tensors, manual)
    cfg.pop("quantization_config")
    (manual / "config.json").write_text(json.dumps(cfg))
    got = localglm.load(fp8_dir, dtype="float32").logits(IDS)
    want = localglm.load(manual, dtype="float32").logits(IDS)
    assert torch.equal(got, want)
    assert localglm.load(fp8_dir).dtype == torch.bfloat16  # fp8 checkpoints compute in bf16 by default
    # and it is still the same model as the unquantized source (e4m3 keeps ~3 mantissa bits)
    ref = localglm.load(src_dir, dtype="float32").logits(IDS)
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.95


def test_missing_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(tiny_dir, tmp_path / "m")
    with SafetensorsSource(d) as src:
        tensors = [(n, src.get(n).clone()) for n in src.names() if n != "model.layers.1.mlp.experts.3.up_proj.weight"]
    for f in d.glob("model*"):
        f.unlink()
    save_safetensors_sharded(tensors, d, max_shard_bytes=200_000)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        localglm.load(d)


def test_wrong_shape_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model-0000.-of-00004.safetensors has shape \(32, 64\), expected \(48, 64\)"):
        localglm.load(d)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_weights_are_refused(dtype: torch.dtype, tiny_dir: Path, tmp_path: Path) -> None:
    """A weight stored as integers (here lm_head) was converted to the compute dtype without a word, giving a model
    of garbage; load and quantize now name the tensor and its dtype (quantize before writing anything)."""
    from localglm.quantize import quantize_checkpoint

    d = _copy_model(tiny_dir, tmp_path / "m")
    with SafetensorsSource(d) as src:
        tensors = [(n, src.get(n).clone().to(dtype) if n == "lm_head.weight" else src.get(n).clone()) for n in src.names()]
    for f in d.glob("model*"):
        f.unlink()
    save_safetensors_sharded(tensors, d, max_shard_bytes=200_000)
    with pytest.raises(CheckpointError, match=rf"lm_head\.weight .* is stored as {dtype}, not a floating-point weight"):
        localglm.load(d)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight .* not a floating-point weight"):
        quantize_checkpoint(d, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_missing_shard_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(tiny_dir, tmp_path / "m")
    (d / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):
        localglm.load(d)


def test_truncated_shard_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(tiny_dir, tmp_path / "m")
    shard = d / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as exc:
        localglm.load(d)
    assert "model-00003-of-00004.safetensors" in str(exc.value) and "model.layers" in str(exc.value)


def test_bad_paths_and_options(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LocalGLMError, match="no such file"):
        localglm.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json"):
        localglm.load(tmp_path)
    with pytest.raises(LocalGLMError, match="dtype"):
        localglm.load(tiny_dir, dtype="int3")
    with pytest.raises(LocalGLMError, match="unknown option"):
        localglm.load(tiny_dir, bogus=1)


def test_mtp_layer_is_present_and_ignored(tiny_dir: Path) -> None:
    with SafetensorsSource(tiny_dir) as src:
        assert any(n.startswith("model.layers.3.eh_proj") for n in src.names())
    m = localglm.load(tiny_dir)
    assert len(m.net.w.layers) == m.config.num_hidden_layers == 3
