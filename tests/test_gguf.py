"""GGUF out (`export-gguf`) and in (`localglm.load("x.gguf")`): names, types, metadata, values, logits, errors."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import localglm
from localglm.checkpoint import gguf as gguf_glm4moe
from localglm.cli import main
from localglm.config import ModelConfig
from localglm.errors import CheckpointError, LocalGLMError
from localglm.layers.experts import InMemoryExperts, QuantizedExperts
from localglm.checkpoint.gguf import GGUFSource, export_gguf
from localglm.quantize import partial_dir, quantize_checkpoint
from localglm.checkpoint.quantized_dir import MANIFEST, QuantizedSource
from localglm.checkpoint.safetensors import save_safetensors_sharded
from localglm.checkpoint.source import SafetensorsSource
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny
from localglm.chat.tiny_tokenizer import corpus_text
from quant.formats import QuantSpec, QuantTensor
from localglm.checkpoint.gguf_file import GGUFModelFiles
from quant.recipe import Recipe

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QTYPE = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 478, 480, 300, 11]])


@pytest.fixture(scope="module")
def exports(tiny_fp32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_fp32_dir, out / f"tiny-{t}.gguf", t)[0] for t in TYPES}


@pytest.fixture(scope="module")
def reference(tiny_fp32_dir: Path) -> localglm.Model:
    return localglm.load(tiny_fp32_dir, dtype="float32")


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


def _expected_type(gguf_name: str, shape: tuple[int, ...], want: QT) -> QT:
    """The converter's rules, written out independently of the code under test."""
    if len(shape) == 1 or "norm" in gguf_name or gguf_name.endswith((".bias", "ffn_gate_inp.weight")):
        return QT.F32
    if want == QT.Q4_0 and gguf_name == "output.weight":
        return QT.Q8_0
    return want


def _round(x: torch.Tensor, qt: QT) -> torch.Tensor:
    """What storing float32 `x` as `qt` and reading it back gives."""
    if qt == QT.F32:
        return x
    if qt == QT.F16:
        return x.half().float()
    if qt == QT.BF16:
        return x.bfloat16().float()
    a = x.numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).reshape(a.shape))


def _hub_tensors_by_gguf_name(src: Path) -> dict[str, torch.Tensor]:
    """The original tensors under their GGUF names, experts stacked, by an independent name table."""
    out: dict[str, torch.Tensor] = {}
    attn = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}  # fmt: skip
    with SafetensorsSource(src) as s:
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for name in s.names():
            t = s.get(name).clone()
            parts = name.split(".")
            if name == "model.embed_tokens.weight":
                out["token_embd.weight"] = t
            elif name == "model.norm.weight":
                out["output_norm.weight"] = t
            elif name == "lm_head.weight":
                out["output.weight"] = t
            else:
                b = f"blk.{parts[2]}"
                rest = ".".join(parts[3:])
                if parts[3] == "self_attn":
                    out[f"{b}.{attn[parts[4]]}.{parts[5]}"] = t
                elif rest == "input_layernorm.weight":
                    out[f"{b}.attn_norm.weight"] = t
                elif rest == "post_attention_layernorm.weight":
                    out[f"{b}.post_attention_norm.weight"] = t
                elif rest == "mlp.gate.weight":
                    out[f"{b}.ffn_gate_inp.weight"] = t
                elif rest == "mlp.gate.e_score_correction_bias":
                    out[f"{b}.exp_probs_b.bias"] = t
                elif parts[4] == "experts":
                    experts.setdefault(f"{b}.ffn_{parts[6].split('_')[0]}_exps.weight", {})[int(parts[5])] = t
                elif parts[4] == "shared_experts":
                    out[f"{b}.ffn_{parts[5].split('_')[0]}_shexp.weight"] = t
                elif parts[3] == "mlp":
                    out[f"{b}.ffn_{parts[4].split('_')[0]}.weight"] = t
                elif rest in ("eh_proj.weight", "enorm.weight", "hnorm.weight"):
                    out[f"{b}.nextn.{rest}"] = t
                elif rest == "shared_head.norm.weight":
                    out[f"{b}.nextn.shared_head_norm.weight"] = t
                else:
                    raise AssertionError(f"unexpected tensor {name}")
        for name, es in experts.items():
            out[name] = torch.stack([es[e] for e in range(len(es))])
    return out


# --------------------------------------------------------------------------------------------
# GGUF out
# --------------------------------------------------------------------------------------------


def test_metadata_is_what_the_converter_writes(exports: dict[str, Path], tiny_fp32_dir: Path) -> None:
    f = _fields(exports["f32"])
    cfg = json.loads((tiny_fp32_dir / "config.json").read_text())
    tok = json.loads((tiny_fp32_dir / "tokenizer.json").read_text())
    a = "glm4moe."
    assert f["general.architecture"] == "glm4moe" and f["general.type"] == "model"
    expect = {
        "block_count": cfg["num_hidden_layers"] + 1, "nextn_predict_layers": 1, "context_length": 2048,
        "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 8,
        "expert_count": 8, "expert_used_count": 2, "expert_shared_count": 1, "expert_feed_forward_length": 32,
        "leading_dense_block_count": 1, "expert_gating_func": 2, "expert_weights_scale": 2.5,
        "expert_weights_norm": True, "expert_group_count": 1, "expert_group_used_count": 1,
        "rope.freq_base": 1e6,
    }  # fmt: skip
    for key, value in expect.items():
        assert f[a + key] == pytest.approx(value), key
    assert f[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == 0
    assert _fields(exports["q8_0"])["general.file_type"] == 7 and _fields(exports["q4_0"])["general.file_type"] == 2
    # tokenizer, as _set_vocab_glm + SpecialVocab write it
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    ids = {i: t for t, i in vocab.items()}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "glm4"
    assert f["tokenizer.ggml.tokens"] == [ids[i] for i in range(512)]
    special = {t["id"] for t in tok["added_tokens"]}
    assert f["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(512)]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    for key, text in (("bos", "[gMASK]"), ("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("eom", "<|observation|>"),
                      ("unknown", "<|endoftext|>"), ("padding", "<|endoftext|>")):  # fmt: skip
        assert f[f"tokenizer.ggml.{key}_token_id"] == vocab[text], key
    assert f["tokenizer.chat_template"] == (tiny_fp32_dir / "chat_template.jinja").read_text()


@pytest.mark.parametrize("kind", TYPES)
def test_reader_round_trips_names_shapes_values(kind: str, exports: dict[str, Path], tiny_fp32_dir: Path) -> None:
    original = _hub_tensors_by_gguf_name(tiny_fp32_dir)
    r = gguf.GGUFReader(exports[kind])
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(original)
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [64, 32, 8]  # ggml order of [E, out, in]
    for name, want in original.items():
        t = tensors[name]
        assert tuple(reversed(t.shape.tolist())) == tuple(want.shape), name
        qt = _expected_type(name, tuple(want.shape), QTYPE[kind])
        assert t.tensor_type == qt, name
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, qt), dtype=np.float32)).reshape(want.shape)
        if qt == QT.F32:
            assert torch.equal(got, want), name
        elif qt in (QT.F16, QT.BF16):
            assert torch.equal(got, _round(want, qt)), name
        else:  # same bytes as gguf's quantizer, and within its per-block error
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(want.numpy(), qt)), name
            blocks = want.reshape(-1, 32)
            err = (got.reshape(-1, 32) - blocks).abs().amax(1)
            amax = blocks.abs().amax(1)
            bound = amax / 8 if qt == QT.Q4_0 else amax / 127 * 0.6  # half a step, plus the f16 scale
            assert bool((err <= bound * 1.001 + 1e-7).all()), name
    for name in ("blk.1.exp_probs_b.bias", "blk.1.ffn_gate_inp.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.bias"):
        assert tensors[name].tensor_type == QT.F32


def test_chunked_streaming_writes_identical_bytes(tiny_fp32_dir: Path, exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_glm4moe, "CHUNK_ELEMENTS", 100)  # many row chunks per tensor, one per expert at least
    for kind in ("f32", "q8_0"):
        out = export_gguf(tiny_fp32_dir, tmp_path / f"chunked-{kind}.gguf", kind)[0]
        assert out.read_bytes() == exports[kind].read_bytes()


def test_no_mtp_drops_the_mtp_layer(tiny_fp32_dir: Path, reference: localglm.Model, tmp_path: Path) -> None:
    out = export_gguf(tiny_fp32_dir, tmp_path / "nomtp.gguf", "f32", mtp=False)[0]
    f = _fields(out)
    assert f["glm4moe.block_count"] == 3 and "glm4moe.nextn_predict_layers" not in f
    assert not any(t.name.startswith("blk.3.") for t in gguf.GGUFReader(out).tensors)
    assert torch.allclose(localglm.load(out).logits(IDS), reference.logits(IDS), rtol=1e-5, atol=1e-6)


def test_config_claiming_more_mtp_blocks_than_held_uses_the_real_count(tiny_fp32_dir: Path, tmp_path: Path) -> None:
    """num_nextn_predict_layers 3 with one MTP block (GLM checkpoints ship one): loading took the block but
    reported 3, and export wrote nextn_predict_layers 3 / block_count layers + 3 for a file of layers + 1 blocks."""
    src = shutil.copytree(tiny_fp32_dir, tmp_path / "claims3")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    (src / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": 3}))
    m = localglm.load(src, dtype="float32")
    assert m.config.num_nextn_predict_layers == 1 and m.speculation is not None
    out = export_gguf(src, tmp_path / "claims3.gguf", "f32")[0]
    f = _fields(out)
    assert f["glm4moe.block_count"] == cfg["num_hidden_layers"] + 1 and f["glm4moe.nextn_predict_layers"] == 1
    g = localglm.load(out, dtype="float32")
    assert g.config.num_nextn_predict_layers == 1 and g.config.num_hidden_layers == cfg["num_hidden_layers"] and g.speculation is not None


def test_rows_that_do_not_fit_blocks_fall_back_to_f16(tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "odd", TinySpec(dtype="float32", hidden_size=80, head_dim=16, num_attention_heads=5,
                                               num_key_value_heads=1, seed=4))  # fmt: skip
    out = export_gguf(src, tmp_path / "odd.gguf", "q8_0")[0]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == QT.F16  # rows of 80 (hidden)
    assert types["blk.0.attn_output.weight"] == QT.F16  # rows of 80 (5 heads x 16)
    assert types["blk.1.ffn_down_exps.weight"] == QT.Q8_0  # rows of 32 (moe_intermediate)
    ref = localglm.load(src, dtype="float32").logits(IDS)
    got = localglm.load(out, dtype="float32").logits(IDS)
    assert torch.nn.functional.cosine_similarity(ref, got, dim=-1).min() > 0.99


def test_interrupted_export_leaves_nothing(tiny_fp32_dir: Path, tmp_path: Path) -> None:
    def stop(done: int, total: int, name: str) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_fp32_dir, tmp_path / "half.gguf", "f16", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tiny_fp32_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(tiny_fp32_dir), str(out), "--type", "q8_0"]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert main(["export-gguf", str(tiny_fp32_dir), str(out), "--type", "q8_0", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localglm: error:") and "already exists" in err and "\n" not in err
    assert main(["export-gguf", str(tiny_fp32_dir), str(tmp_path / "s.gguf"), "-q", "--split-max-size", "300K"]) == 0
    assert len(list(tmp_path.glob("s-0000?-of-0000?.gguf"))) > 1
    with pytest.raises(SystemExit):
        main(["export-gguf", str(tiny_fp32_dir), str(out), "--type", "q2_k"])


# --------------------------------------------------------------------------------------------
# GGUF in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_gguf_source_presents_hub_names_and_values(kind: str, exports: dict[str, Path], tiny_fp32_dir: Path) -> None:
    with SafetensorsSource(tiny_fp32_dir) as hub, GGUFSource(exports[kind]) as src:
        assert src.names() == hub.names()
        for name in hub.names():
            want = hub.get(name)
            info = src.info(name)
            assert info.shape == tuple(want.shape), name
            gname = "output.weight" if name == "lm_head.weight" else info.gguf_name
            qt = _expected_type(gname, tuple(want.shape) if info.index is None else (8, *want.shape), QTYPE[kind])
            assert info.ggml_type == qt.name, name
            got = src.get(name, dtype=torch.float32, expected_shape=tuple(want.shape))
            assert torch.equal(got, _round(want, qt)), name
        e = "model.layers.2.mlp.experts.5.down_proj.weight"
        assert src.info(e).index == 5 and src.raw(e).numel() == src.info(e).nbytes
        with pytest.raises(CheckpointError, match="shape"):
            src.get(e, expected_shape=(1, 2))
        with pytest.raises(CheckpointError, match="not found"):
            src.info("model.layers.1.mlp.experts.99.up_proj.weight")


def test_load_f32_gguf_gives_the_same_model(exports: dict[str, Path], reference: localglm.Model) -> None:
    m = localglm.load(exports["f32"])
    assert m.config == reference.config and m.dtype == torch.float32
    a, b = m.logits(IDS), reference.logits(IDS)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    t0, t1 = reference.tokenizer, m.tokenizer
    text = corpus_text(60_000) + " héllo wörld 中文 🚀 <|user|>x[gMASK]<sop><think>"
    assert t1.encode(text) == t0.encode(text)
    assert t1.decode(t0.encode(text)) == t0.decode(t0.encode(text))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert t1.apply_chat_template(msgs) == t0.apply_chat_template(msgs)
    assert t1.stop_token_ids == t0.stop_token_ids and t1.special_tokens_map == t0.special_tokens_map
    assert t1.special_token_ids == t0.special_token_ids and t1.format == t0.format
    events = list(m.generate(messages=msgs, max_new_tokens=4, sampling=localglm.SamplingParams(temperature=0)))
    ref_events = list(reference.generate(messages=msgs, max_new_tokens=4, sampling=localglm.SamplingParams(temperature=0)))
    assert events[-1].token_ids == ref_events[-1].token_ids


def _rounded_checkpoint(src: Path, out: Path, kind: str) -> Path:
    """A safetensors copy of `src` (float32) whose weights are what an export as `kind` stores, read back."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model*"))
    with SafetensorsSource(src) as hub:
        def weights():
            for name in hub.names():
                w = hub.get(name).clone()
                one_d_or_router = w.dim() == 1 or name.endswith(("norm.weight", "mlp.gate.weight"))
                qt = QT.F32 if one_d_or_router else QTYPE[kind]
                if kind == "q4_0" and name == "lm_head.weight":
                    qt = QT.Q8_0
                yield name, _round(w, qt)

        save_safetensors_sharded(weights(), out)
    return out


@pytest.mark.parametrize("kind", ("f16", "bf16", "q8_0", "q4_0"))
def test_load_quantized_gguf_equals_its_rounded_weights(
    kind: str, exports: dict[str, Path], tiny_fp32_dir: Path, reference: localglm.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits from the GGUF equal those of a safetensors checkpoint holding the same rounded weights."""
    from quant import kquants

    # Q4_0 runs as stored (quant.kquants); its int8-activation kernel is checked in test_kquants: here every
    # product goes through the exact dequantize + fp32 GEMM path, so the logits compare the weights alone.
    monkeypatch.setattr(kquants, "NATIVE_MAX_ROWS", 0)
    rounded = _rounded_checkpoint(tiny_fp32_dir, tmp_path / "rounded", kind)
    m = localglm.load(exports[kind], dtype="float32")
    ref = localglm.load(rounded, dtype="float32")
    if kind == "q8_0":
        # Q8_0 experts are held packed (test_q8_0_experts_are_kept_packed checks their values exactly) and run
        # through the q8 kernels, which may round activations: give the reference the same experts, so the
        # logits compare everything else.
        assert isinstance(m.net.experts, QuantizedExperts)
        ref.net.experts = m.net.experts
    a, b = m.logits(IDS), ref.logits(IDS)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    if kind in ("f16", "bf16"):  # close to the unrounded model too
        assert torch.nn.functional.cosine_similarity(a, reference.logits(IDS), dim=-1).min() > 0.999


def _gguf_values(files: GGUFModelFiles, gguf_tensor: str, index: int | None = None) -> torch.Tensor:
    """What gguf-py's own dequantizer makes of a stored tensor (or of expert `index` of a stacked one)."""
    t = files.tensors[gguf_tensor]
    shape = t.shape[1:] if index is not None else t.shape
    raw = files.raw(gguf_tensor, index).reshape(shape[0], -1)
    return torch.from_numpy(gguf.quants.dequantize(raw, t.ggml_type).astype(np.float32))


def test_q8_0_experts_are_kept_packed(exports: dict[str, Path], tiny_fp32_dir: Path) -> None:
    """A Q8_0 GGUF's routed experts become q8 blobs from the stored blocks: values equal Q8_0's exactly."""
    from localglm.config import ModelConfig
    from localglm.quantize import load_quantized_experts

    cfg = ModelConfig.from_file(tiny_fp32_dir)
    files = GGUFModelFiles(exports["q8_0"])
    with GGUFSource(files) as src:
        qe = load_quantized_experts(cfg, src, None, torch.float32, torch.device("cpu"), keep_blobs=True)
        assert isinstance(qe, QuantizedExperts)
        inter = cfg.moe_intermediate_size
        for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            lay = qe.layouts[layer]
            assert lay.gate_up == lay.down == QuantSpec.for_bits(8)
            for e in (0, 5, cfg.n_routed_experts - 1):
                gu, dn = lay.unpack(qe.blobs[layer][e], torch.float32)
                got = {"gate": gu.dequantize()[:inter], "up": gu.dequantize()[inter:], "down": dn.dequantize()}
                for part, w in got.items():
                    want = _gguf_values(files, f"blk.{layer}.ffn_{part}_exps.weight", e)
                    assert torch.equal(w.view(torch.int32), want.view(torch.int32)), (layer, e, part)
        # experts asked at another width are re-quantized from the values; a float file keeps float experts
        q4 = load_quantized_experts(cfg, src, Recipe.from_options({"experts": 4}), torch.float32, torch.device("cpu"))
        assert q4.layouts[1].gate_up == QuantSpec.for_bits(4)
    with GGUFSource(exports["f16"]) as src:
        assert load_quantized_experts(cfg, src, None, torch.float32, torch.device("cpu")) is None


def test_q8_0_gguf_loads_packed_and_generates(exports: dict[str, Path]) -> None:
    m = localglm.load(exports["q8_0"])
    assert isinstance(m.net.experts, QuantizedExperts)
    assert isinstance(m.net.w.layers[0].attn.qkv_weight, torch.Tensor)  # no recipe: the rest as before (dequantized)
    text = m.generate_text("hello", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert isinstance(text, str)
    assert isinstance(localglm.load(exports["q8_0"], experts_bits=16).net.experts, InMemoryExperts)
    assert isinstance(localglm.load(exports["f16"]).net.experts, InMemoryExperts)


def test_q8_0_tensors_held_at_8_bits_are_not_requantized(exports: dict[str, Path]) -> None:
    """With a recipe, a Q8_0 tensor whose class gets 8 bits is taken packed: its values stay Q8_0's exactly."""
    m = localglm.load(exports["q8_0"], dtype="float32", experts_bits=8)
    assert isinstance(m.net.experts, QuantizedExperts)
    qkv, o = m.net.w.layers[0].attn.qkv_weight, m.net.w.layers[0].attn.o_weight
    assert isinstance(qkv, QuantTensor) and isinstance(o, QuantTensor)
    files = GGUFModelFiles(exports["q8_0"])
    want = torch.cat([_gguf_values(files, f"blk.0.attn_{p}.weight") for p in ("q", "k", "v")])
    assert torch.equal(qkv.dequantize(torch.float32), want)
    assert torch.equal(o.dequantize(torch.float32), _gguf_values(files, "blk.0.attn_output.weight"))
    files.close()


def test_split_gguf_loads(tiny_fp32_dir: Path, reference: localglm.Model, tmp_path: Path) -> None:
    parts = export_gguf(tiny_fp32_dir, tmp_path / "split.gguf", "f32", split_max_size=300_000)
    assert len(parts) >= 3 and all(p.name.startswith("split-0000") for p in parts)
    files = GGUFModelFiles(parts[-1])  # any part finds the set
    assert files.where == parts[0] and len(files.files) == len(parts)
    for part in (parts[0], parts[1]):
        assert torch.allclose(localglm.load(part).logits(IDS), reference.logits(IDS), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError) as exc:
        localglm.load(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path.name) in msg
    assert match in msg, msg
    return msg


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    _one_line_error(p, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _one_line_error(tmp_path / "empty.gguf", "not a GGUF file")


def test_truncated_gguf(exports: dict[str, Path], tmp_path: Path) -> None:
    data = exports["q8_0"].read_bytes()
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:5000])  # inside the token list
    _one_line_error(head, "truncated")
    tail = tmp_path / "tail.gguf"
    tail.write_bytes(data[:-1000])  # tensor data cut short
    msg = _one_line_error(tail, "truncated GGUF (tensor output.weight")
    assert "needs bytes up to" in msg


def _llama_gguf(p: Path) -> Path:
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    _one_line_error(_llama_gguf(tmp_path / "llama.gguf"), "architecture 'llama'")


def test_missing_split_part(tiny_fp32_dir: Path, tmp_path: Path) -> None:
    parts = export_gguf(tiny_fp32_dir, tmp_path / "s.gguf", "f32", split_max_size=300_000)
    parts[1].unlink()
    _one_line_error(parts[0], f"part {parts[1].name} is missing")


def test_unsupported_tensor_type(exports: dict[str, Path], tmp_path: Path) -> None:
    """An F32 tensor relabelled I32 (same size): a valid file whose weight localglm cannot dequantize."""
    data = bytearray(exports["f32"].read_bytes())
    name = b"blk.1.ffn_down_exps.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == QT.F32
    struct.pack_into("<I", data, type_at, QT.I32)
    p = tmp_path / "i32.gguf"
    p.write_bytes(bytes(data))
    msg = _one_line_error(p, "stored as I32")
    assert "blk.1.ffn_down_exps.weight" in msg


def _tensor_info_at(data: bytes | bytearray, name: bytes) -> tuple[int, int]:
    """Where tensor `name`'s table entry is in a GGUF's bytes: (start of its name field, position of its offset)."""
    start = data.index(struct.pack("<Q", len(name)) + name)
    at = start + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return start, at + 4 + 8 * n_dims + 4


def test_tensor_named_twice_is_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    """A tensor table naming one tensor twice (same-length rename) used to load, the later entry winning."""
    data = bytearray(exports["f32"].read_bytes())
    start, _ = _tensor_info_at(data, b"blk.1.ffn_gate_exps.weight")
    data[start + 8 : start + 8 + 26] = b"blk.1.ffn_down_exps.weight"
    p = tmp_path / "twice.gguf"
    p.write_bytes(bytes(data))
    msg = _one_line_error(p, "tensor blk.1.ffn_down_exps.weight appears twice")
    assert str(p) in msg


def test_overlapping_tensor_data_is_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    """A tensor whose offset points into another tensor's bytes (both in the file) is a corrupt file."""
    data = bytearray(exports["f32"].read_bytes())
    _, gate_off = _tensor_info_at(data, b"blk.1.ffn_gate_exps.weight")
    _, down_off = _tensor_info_at(data, b"blk.1.ffn_down_exps.weight")
    struct.pack_into("<Q", data, down_off, struct.unpack_from("<Q", data, gate_off)[0] + 32)
    p = tmp_path / "overlap.gguf"
    p.write_bytes(bytes(data))
    msg = _one_line_error(p, "tensor blk.1.ffn_down_exps.weight starts at byte")
    assert "inside tensor blk.1.ffn_gate_exps.weight" in msg and str(p) in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [("tokenizer.ggml.tokens", lambda n: list(range(n))), ("tokenizer.ggml.merges", lambda n: [1, 2]), ("tokenizer.ggml.merges", lambda n: ["zzzq yyyq"]),
     ("tokenizer.ggml.token_type", lambda n: 5), ("tokenizer.ggml.token_type", lambda n: ["a"] * n), ("tokenizer.chat_templates", lambda n: 5)],  # fmt: skip
    ids=["tokens-ints", "merges-ints", "merge-of-unknown-tokens", "token-type-int", "token-type-str", "template-names-int"],
)
def test_malformed_tokenizer_metadata_is_one_line(exports: dict[str, Path], key: str, value: Callable[[int], object]) -> None:
    """Tokenizer metadata of the wrong type, or merges of tokens the vocabulary lacks, used to escape as a
    TypeError / AttributeError / the tokenizers library's bare Exception; a malformed list of template names
    is ignored, like a non-string template."""
    from localglm.errors import TokenizerError

    with GGUFModelFiles(exports["f32"]) as files:
        files.metadata[key] = value(len(files.metadata["tokenizer.ggml.tokens"]))
        if key == "tokenizer.chat_templates":
            assert gguf_glm4moe.tokenizer_from_gguf(files).chat_template
            return
        with pytest.raises(TokenizerError) as exc:
            gguf_glm4moe.tokenizer_from_gguf(files)
    assert "\n" not in str(exc.value) and exports["f32"].name in str(exc.value) and key.split(".")[-1] in str(exc.value)


def test_broken_tokenizer_metadata_is_refused_before_any_weight_is_read(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer was built after every weight had loaded: on a 200 GB model, a long wait for a one-line error."""
    data = bytearray(exports["q8_0"].read_bytes())
    key = b"tokenizer.ggml.pre"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<IQ", data, at) == (8, 4) and data[at + 12 : at + 16] == b"glm4"
    data[at + 12 : at + 16] = b"xlm4"
    p = tmp_path / "badpre.gguf"
    p.write_bytes(bytes(data))

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was read before the tokenizer was checked")

    monkeypatch.setattr(GGUFModelFiles, "tensor", no_reads)
    monkeypatch.setattr(GGUFModelFiles, "raw", no_reads)
    from localglm.errors import TokenizerError

    with pytest.raises(TokenizerError) as exc:
        localglm.load(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and "tokenizer.ggml.pre 'xlm4' is not GLM's" in msg


def test_gguf_source_is_a_tensor_source(exports: dict[str, Path]) -> None:
    from localglm.checkpoint.source import TensorSource

    with GGUFSource(exports["q8_0"], dequant_dtype=torch.float16) as src:
        assert isinstance(src, TensorSource)
        name = "model.layers.1.mlp.experts.3.gate_proj.weight"
        info = src.info(name)
        assert info.dtype == torch.float16 and info.stored_dtype == torch.uint8 and info.ggml_type == "Q8_0"
        assert src.get(name).dtype == torch.float16 and name in src and "nope" not in src
        assert info.nbytes == 32 * 64 // 32 * 34  # one expert's Q8_0 blocks
        src.release_pages()


# --------------------------------------------------------------------------------------------
# localglm quantize FILE.gguf
# --------------------------------------------------------------------------------------------

Q4 = Recipe.from_options({"experts": 4})


@pytest.fixture(scope="module")
def hf_q4(tiny_fp32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint itself quantized with Q4: what quantizing its GGUFs is compared with."""
    return quantize_checkpoint(tiny_fp32_dir, tmp_path_factory.mktemp("hfq4") / "q4", Q4).out


def _stored(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized directory as stored (float ones in float32, to compare values across dtypes)."""
    with SafetensorsSource(d) as s:
        return {n: (t.float() if t.is_floating_point() else t.clone()) for n in s.names() for t in [s.get(n)]}


def _assert_same_stored(a: Path, b: Path) -> None:
    sa, sb = _stored(a), _stored(b)
    assert set(sa) == set(sb)
    for name, t in sa.items():
        assert torch.equal(t, sb[name]), name


def test_quantize_f32_gguf_equals_quantizing_the_checkpoint(
    exports: dict[str, Path], tiny_fp32_dir: Path, hf_q4: Path, reference: localglm.Model, tmp_path: Path, one_thread: None
) -> None:
    """An F32 GGUF holds the checkpoint's values: quantizing it stores exactly what quantizing the checkpoint does,
    with config, tokenizer and chat template written from the GGUF metadata."""
    seen: list[tuple[int, int, str]] = []
    res = quantize_checkpoint(exports["f32"], tmp_path / "q", Q4, progress=lambda d, t, n: seen.append((d, t, n)))
    out = res.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", MANIFEST, "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    )
    with SafetensorsSource(out) as s, SafetensorsSource(hf_q4) as h:
        assert s.names() == h.names()
        for name in h.names():
            a, b = s.get(name), h.get(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    man = json.loads((out / MANIFEST).read_text())
    assert man["source"] == {"path": str(exports["f32"]), "format": "gguf", "file_type": "ALL_F32", "parts": 1, "dtype": "float32"}
    hman = json.loads((hf_q4 / MANIFEST).read_text())
    assert man["recipe"] == hman["recipe"] and man["tensors"] == hman["tensors"] and man["experts"] == hman["experts"]
    assert ModelConfig.from_file(out) == ModelConfig.from_file(tiny_fp32_dir)
    # progress: bytes of the GGUF's tensors; the three slices of each expert one after another
    files = GGUFModelFiles(exports["f32"])
    total = sum(t.nbytes for t in files.tensors.values())
    files.close()
    assert res.source_bytes == total and all(t == total for _, t, _ in seen) and seen[-1][0] == total
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    experts = [n for _, _, n in seen if ".mlp.experts." in n]
    for i in range(0, len(experts), 3):
        assert [n.rsplit(".", 2)[1] for n in experts[i : i + 3]] == ["gate_proj", "up_proj", "down_proj"], experts[i]
        assert len({n.rsplit(".", 2)[0] for n in experts[i : i + 3]}) == 1
    # the model: the same logits; the tokenizer and template: the GGUF's, which are the original's
    m = localglm.load(out)
    assert torch.equal(m.logits(IDS), localglm.load(hf_q4).logits(IDS))
    t0, t1 = reference.tokenizer, m.tokenizer
    text = corpus_text(60_000) + " héllo wörld 中文 🚀 <|user|>x[gMASK]<sop><think>"
    assert t1.encode(text) == t0.encode(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert t1.apply_chat_template(msgs) == t0.apply_chat_template(msgs) and t1.chat_template == t0.chat_template
    assert t1.stop_token_ids == t0.stop_token_ids and t1.special_tokens_map == t0.special_tokens_map
    assert t1.special_token_ids == t0.special_token_ids and t1.format == t0.format
    assert isinstance(m.generate_text("hello", max_new_tokens=4, temperature=0, ignore_eos=True), str)


@pytest.mark.parametrize("kind", ("f16", "bf16"))
def test_quantize_f16_gguf_equals_quantizing_its_rounded_weights(
    kind: str, exports: dict[str, Path], tiny_fp32_dir: Path, hf_q4: Path, tmp_path: Path, one_thread: None
) -> None:
    """From an F16/BF16 GGUF: every stored value equals quantizing the checkpoint rounded to that type
    (float tensors stay in the GGUF's type), so the logits are the same; close to the unrounded model's."""
    out = quantize_checkpoint(exports[kind], tmp_path / "q", Q4).out
    rounded = quantize_checkpoint(_rounded_checkpoint(tiny_fp32_dir, tmp_path / "rounded", kind), tmp_path / "rq", Q4).out
    _assert_same_stored(out, rounded)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == {"f16": "float16", "bf16": "bfloat16"}[kind]
    a = localglm.load(out, dtype="float32").logits(IDS)
    assert torch.equal(a, localglm.load(rounded, dtype="float32").logits(IDS))
    assert torch.nn.functional.cosine_similarity(a, localglm.load(hf_q4).logits(IDS), dim=-1).min() > 0.99


def test_quantize_q8_0_gguf_takes_q8_0_packed(exports: dict[str, Path], hf_q4: Path, tmp_path: Path, one_thread: None) -> None:
    """Q8_0 tensors the recipe holds at q8 are stored as the GGUF has them (values exact); 4-bit experts are
    quantized from the dequantized Q8_0 values, as quantizing while loading the GGUF does."""
    gg = exports["q8_0"]
    out = quantize_checkpoint(gg, tmp_path / "q4", Q4).out
    man = json.loads((out / MANIFEST).read_text())
    assert man["source"]["file_type"] == "MOSTLY_Q8_0" and man["experts"]["layouts"]["1"]["gate_up"] == "q4"
    assert man["tensors"]["model.layers.0.self_attn.q_proj.weight"]["spec"] == "q8"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # as localglm.load(gguf) computes
    files = GGUFModelFiles(gg)
    with QuantizedSource(out) as qs:
        for hub, name in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"), ("lm_head.weight", "output.weight"),
                          ("model.embed_tokens.weight", "token_embd.weight"), ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight")):  # fmt: skip
            assert torch.equal(qs.get_quant(hub).dequantize(torch.float32), _gguf_values(files, name)), hub
    m = localglm.load(out, dtype="float32")
    assert torch.equal(m.logits(IDS), localglm.load(gg, dtype="float32", experts_bits=4).logits(IDS))
    assert torch.nn.functional.cosine_similarity(m.logits(IDS), localglm.load(hf_q4, dtype="float32").logits(IDS), dim=-1).min() > 0.99
    assert isinstance(localglm.load(out).generate_text("hello", max_new_tokens=4, temperature=0, ignore_eos=True), str)
    # experts at 8 bits: Q8_0 expert blocks become the blobs as they are; nothing differs from the GGUF
    res = quantize_checkpoint(gg, tmp_path / "q8", Recipe.from_options({"experts": 8}), report=True)
    assert set(res.class_error) >= {"experts", "attn", "embed", "lm_head"} and not any(res.class_error.values())
    with QuantizedSource(res.out) as qs:
        lay = qs.expert_layout(2)
        gu, dn = lay.unpack(qs.expert_blob(2, 5), torch.float32)
        want = torch.cat([_gguf_values(files, f"blk.2.ffn_{p}_exps.weight", 5) for p in ("gate", "up")])
        assert torch.equal(gu.dequantize(), want) and torch.equal(dn.dequantize(), _gguf_values(files, "blk.2.ffn_down_exps.weight", 5))
    files.close()
    # quantize-while-loading with save_quantized works from a GGUF too
    saved = tmp_path / "saved"
    assert localglm.load(gg, experts_bits=4, save_quantized=saved).path == saved
    assert json.loads((saved / MANIFEST).read_text())["source"]["path"] == str(gg)


def test_quantize_split_gguf(tiny_fp32_dir: Path, hf_q4: Path, tmp_path: Path, one_thread: None) -> None:
    parts = export_gguf(tiny_fp32_dir, tmp_path / "split.gguf", "f32", split_max_size=300_000)
    assert len(parts) >= 3
    out = quantize_checkpoint(parts[0], tmp_path / "q", Q4).out
    assert json.loads((out / MANIFEST).read_text())["source"]["parts"] == len(parts)
    _assert_same_stored(out, hf_q4)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_quantize_bad_gguf_gives_one_line_errors_and_writes_nothing(
    exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = exports["q8_0"].read_bytes()
    (tmp_path / "tail.gguf").write_bytes(data[:-1000])  # tensor data cut short
    (tmp_path / "head.gguf").write_bytes(data[:5000])  # inside the token list
    _llama_gguf(tmp_path / "llama.gguf")
    for name, match in (("tail.gguf", "truncated GGUF (tensor output.weight"), ("head.gguf", "truncated"), ("llama.gguf", "architecture 'llama'")):
        src, out = tmp_path / name, tmp_path / "out"
        with pytest.raises(LocalGLMError) as exc:
            quantize_checkpoint(src, out, Q4)
        msg = str(exc.value)
        assert "\n" not in msg and str(src) in msg and match in msg, msg
        assert not out.exists() and not partial_dir(out).exists()
        assert main(["quantize", str(src), str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("localglm: error:") and match in err and "\n" not in err
        assert not out.exists() and not partial_dir(out).exists()


def test_experts_in_types_not_run_as_stored_that_ram_cannot_hold_as_floats_are_requantized(
    exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF whose experts are in a type localglm does not run as stored (here Q4_0, hidden from
    quant.gguf_packed to stand for one) and would only fit dequantized in more RAM than there is loads
    with just its experts re-quantized to the nearest localglm bits, and says so, naming the type; with
    room, or when asked for floats, or for float files, nothing changes. Q4_0 itself runs as stored
    (tests/test_kquants.py)."""
    import localglm.loader as loader
    from quant.gguf_packed import PACKED_SPECS

    stored = localglm.load(exports["q4_0"], dtype="float32").net.experts
    assert isinstance(stored, QuantizedExperts) and {lay.gate_up.name for lay in stored.layouts.values()} == {"q4_0"}
    monkeypatch.delitem(PACKED_SPECS, "Q4_0")
    exact = localglm.load(exports["q4_0"], dtype="float32")
    assert not isinstance(exact.net.experts, QuantizedExperts)
    monkeypatch.setattr(loader, "_available_ram", lambda: 1 << 10)
    with pytest.warns(UserWarning, match=r"does not run Q4_0 as stored .* dequantized would take .* re-quantizing them to localglm q4"):
        m = localglm.load(exports["q4_0"], dtype="float32")
    qe = m.net.experts
    assert isinstance(qe, QuantizedExperts) and {lay.gate_up.bits for lay in qe.layouts.values()} == {4}
    assert type(m.net.w.layers[0].attn.qkv_weight) is torch.Tensor  # only the experts: the rest as stored
    a, b = m.logits(IDS).log_softmax(-1), exact.logits(IDS).log_softmax(-1)
    assert float((b.exp() * (b - a)).sum(-1).mean()) < 0.05
    assert not isinstance(localglm.load(exports["q4_0"], dtype="float32", experts_bits=16).net.experts, QuantizedExperts)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not isinstance(localglm.load(exports["f32"]).net.experts, QuantizedExperts)


@pytest.mark.parametrize("count", [10**6, 5])
def test_a_block_count_the_tensors_do_not_hold_is_refused(exports: dict[str, Path], tmp_path: Path, count: int) -> None:
    """block_count sizes gguf's tensor-name map: 10**6 hung `inspect`, and 5 in this 4-block file (3 layers + MTP)
    reported 4 layers without a word (a hostile-input sweep)."""
    from tests.probes import run_cli

    data = bytearray(exports["f32"].read_bytes())
    key = b"glm4moe.block_count"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 4 and int.from_bytes(data[at + 4 : at + 8], "little") == 4  # u32 4
    data[at + 4 : at + 8] = count.to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    for cmd in ("inspect", "generate"):
        o = run_cli(cmd, bad, *(["-p", "x", "-n", "1", "-q"] if cmd == "generate" else []))
        assert o.kind == "clean" and f"block_count is {count}, but the file's tensors hold 4 blocks" in o.err, o.why()



def copy_gguf(src: Path, dst: Path, *, key: str | None = None, tensor: str | None = None, halve: str | None = None,
              drop: Callable[[str], bool] | None = None) -> Path:
    """`src` written again without the metadata `key`, the `tensor` or the tensors `drop` picks, or with tensor
    `halve`'s outermost dimension halved."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k not in ("general.architecture", key):
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        d = np.asarray(t.data)
        if t.name != tensor and not (drop is not None and drop(t.name)):
            d = d[: d.shape[0] // 2] if t.name == halve else d
            w.add_tensor(t.name, np.ascontiguousarray(d), raw_dtype=None if t.tensor_type == GGMLQuantizationType.F32 else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"key": "glm4moe.expert_shared_count"}, "are not part of the model its metadata describes (blk.1.ffn_down_shexp.weight"),
        ({"key": "glm4moe.nextn_predict_layers"}, "are not part of the model its metadata describes (blk.3.nextn."),
        ({"tensor": "blk.3.nextn.eh_proj.weight"}, "its MTP block (blk.3) is incomplete: no eh_proj"),
        # the converter's --mtp: the draft head alone (blocks 0-2 left out)
        ({"drop": lambda name: name.startswith(("blk.0.", "blk.1.", "blk.2."))}, "holds only the MTP draft head"),
    ],
)
def test_tensors_the_metadata_leaves_out_are_refused(exports: dict[str, Path], tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    """As llama.cpp's tensor count does. Before: without expert_shared_count the shared experts were ignored, without
    nextn_predict_layers the MTP block ran as a fourth decoder layer: another model, without a word."""
    from tests.probes import run_cli

    bad = copy_gguf(exports["f32"], tmp_path / "bad.gguf", **change)
    for argv in (["generate", bad, "-p", "x", "-n", "1", "-q"], ["quantize", bad, tmp_path / "q", "-q"]):
        o = run_cli(*argv)
        assert o.kind == "clean" and needle in o.err, o.why()
    assert not (tmp_path / "q").exists()


def test_sampling_defaults_travel_in_general_sampling(tiny_fp32_dir: Path, exports: dict[str, Path], tmp_path: Path) -> None:
    """As llama.cpp's converter writes and llama.cpp applies them. Before: a GGUF looked for X.gguf/generation_config.json
    and sampled at top_p 1.0 where the checkpoint (and llama.cpp on the same file) uses 0.95."""
    from localglm.checkpoint.gguf_file import GGUFModelFiles

    with GGUFModelFiles(exports["f32"]) as files:
        assert files.metadata["general.sampling.top_p"] == pytest.approx(0.95) and files.metadata["general.sampling.temp"] == pytest.approx(0.6)
    assert localglm.load(exports["f32"]).default_sampling == localglm.load(tiny_fp32_dir).default_sampling
    converted = localglm.load(Path(__file__).parent / "data" / "glm_moe_dsa_llamacpp_q8_0.gguf").default_sampling  # the converter's own file
    assert (converted.temperature, converted.top_p) == (0.6, 0.95)
    bare = copy_gguf(exports["f32"], tmp_path / "bare.gguf", key="general.sampling.top_p")
    assert localglm.load(bare).default_sampling.top_p == localglm.SamplingParams().top_p == 1.0  # absent: the built-in default


@pytest.mark.parametrize(("key", "needle"), [("glm4moe.expert_count", "expert_count 96"), ("glm4moe.embedding_length", "embedding_length is 96")])
def test_header_widths_the_tensors_contradict_are_refused_by_inspect_too(exports: dict[str, Path], tmp_path: Path, key: str, needle: str) -> None:
    """`inspect` and `plan` read the header alone: expert_count 64 in an 8-expert file was reported as given."""
    from tests.probes import run_cli

    data = bytearray(exports["f32"].read_bytes())
    at = data.index(key.encode()) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 4 and int.from_bytes(data[at + 4 : at + 8], "little") != 96  # a u32, not 96
    data[at + 4 : at + 8] = (96).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    for argv in (["inspect", bad], ["plan", bad, "--gpu-mem", "0"], ["generate", bad, "-p", "x", "-n", "1", "-q"]):
        o = run_cli(*argv)
        assert o.kind == "clean" and needle in o.err, (argv[0], o.why())
