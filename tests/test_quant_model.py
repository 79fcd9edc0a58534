"""Quantized GLM checkpoints: quantize -> load -> generate, on-the-fly loading, crash safety, CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import localglm
from localglm.cli import main
from localglm.errors import LocalGLMError
from localglm.experts import QuantizedExperts
from localglm.quantize import partial_dir, quantize_checkpoint
from localglm.quantized_source import MANIFEST, VERSION, QuantizedSource, blob_name
from localglm.tiny import TinySpec, make_tiny
from quant.formats import QuantTensor
from quant.recipe import Recipe


# Quantizing small tensors is overhead-bound: every test here runs on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 8, 200, 41, 17]])


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("qsrc") / "model", TinySpec(dtype="float32", max_shard_bytes=200_000))


@pytest.fixture(scope="module")
def ref_logits(src: Path) -> torch.Tensor:
    return localglm.load(src).logits(IDS)


def _kl(ref: torch.Tensor, q: torch.Tensor) -> float:
    lr, lq = ref.log_softmax(-1), q.log_softmax(-1)
    return float((lr.exp() * (lr - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def q4(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q4") / "q4"
    quantize_checkpoint(src, out, Recipe.from_options({"experts": 4}), max_shard_bytes=150_000)
    return out


def test_quantized_dir_layout(q4: Path, src: Path) -> None:
    man = json.loads((q4 / MANIFEST).read_text())
    assert man["format"] == "localglm-quant" and man["recipe"]["bits"]["experts"] == 4
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"):
        assert (q4 / f).is_file(), f
    with QuantizedSource(q4) as qs:
        lay = qs.expert_layout(1)
        blob = qs.expert_blob(1, 3)
        assert blob.shape == (lay.nbytes,) and blob.dtype == torch.uint8  # one contiguous blob per expert
        assert blob_name(1, 3) in qs.st
        # the TensorSource view: float tensors under hub names, close to the originals
        with localglm.tensor_source.SafetensorsSource(src) as ss:
            for name in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
                w, d = ss.get(name), qs.get(name)
                assert d.shape == w.shape and float((d - w).norm() / w.norm()) < 0.1


@pytest.mark.parametrize("bits,max_kl", [(8, 0.005), (4, 0.05), (2, 0.5)])
def test_quantize_load_generate(bits: int, max_kl: float, src: Path, ref_logits: torch.Tensor, tmp_path: Path, q4: Path) -> None:
    out = q4 if bits == 4 else quantize_checkpoint(src, tmp_path / f"q{bits}", Recipe.from_options({"experts": bits})).out
    m = localglm.load(out)
    assert isinstance(m.net.experts, QuantizedExperts)
    assert isinstance(m.net.w.layers[0].attn.qkv_weight, QuantTensor)  # attention 8-bit by default
    kl = _kl(ref_logits, m.logits(IDS))
    assert kl < max_kl, kl
    text = m.generate_text("hello", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert isinstance(text, str)


def test_on_the_fly_matches_directory_and_save_quantized(src: Path, q4: Path, tmp_path: Path) -> None:
    from_dir = localglm.load(q4).logits(IDS)
    fly = localglm.load(src, experts_bits=4).logits(IDS)
    assert torch.allclose(fly, from_dir, atol=1e-5)
    saved = tmp_path / "saved"
    m = localglm.load(src, experts_bits=4, save_quantized=saved)
    assert (saved / MANIFEST).is_file() and m.path == saved
    assert torch.allclose(m.logits(IDS), from_dir, atol=1e-5)
    stamp = (saved / MANIFEST).stat().st_mtime_ns
    localglm.load(src, experts_bits=4, save_quantized=saved)  # same source and recipe: reused, not redone
    assert (saved / MANIFEST).stat().st_mtime_ns == stamp
    localglm.load(src, experts_bits=8, save_quantized=saved)  # another recipe: redone
    assert json.loads((saved / MANIFEST).read_text())["recipe"]["bits"]["experts"] == 8


def test_older_format_version_says_to_requantize(q4: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(q4, old)
    man = json.loads((old / MANIFEST).read_text())
    man["version"] = VERSION - 1  # version 1 had per-row q8
    (old / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(LocalGLMError, match=r"format version 1 is not supported .*re-run `localglm quantize`"):
        localglm.load(old)


def test_interrupted_quantize_leaves_nothing_loadable_and_rerun_succeeds(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"

    class Boom(Exception):
        pass

    seen = []

    def progress(done: int, total: int, name: str) -> None:
        seen.append(name)
        if len(seen) == 20:
            raise Boom

    with pytest.raises(Boom):
        quantize_checkpoint(src, out, Recipe(), progress=progress, max_shard_bytes=50_000)
    assert not out.exists()
    part = partial_dir(out)
    assert part.exists() and not (part / MANIFEST).exists() and not (part / "config.json").exists()
    with pytest.raises(LocalGLMError):
        localglm.load(part)
    with pytest.raises(LocalGLMError):
        localglm.load(out)
    quantize_checkpoint(src, out, Recipe())  # re-run: starts over cleanly
    assert not part.exists() and (out / MANIFEST).is_file()
    localglm.load(out).logits(IDS)
    with pytest.raises(LocalGLMError, match="exists"):
        quantize_checkpoint(src, out, Recipe())
    quantize_checkpoint(src, out, Recipe.from_options({"experts": 8}), overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["recipe"]["bits"]["experts"] == 8


def test_bad_input_gives_one_line_errors(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, msg in (
        (["quantize", str(src), str(tmp_path / "x"), "--experts", "3"], "bits must be one of 2, 4, 8 or 16"),
        (["quantize", str(src), str(tmp_path / "x"), "--layers", "0-1:bogus=4"], "unknown tensor class 'bogus'"),
        (["quantize", str(tmp_path / "nope"), str(tmp_path / "x")], "no such file"),
        (["quantize", str(src), str(src)], "OUT must differ"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("localglm: error:") and msg in err and "\n" not in err
    with pytest.raises(LocalGLMError, match="bits must be one of"):
        localglm.load(src, experts_bits=3)
    assert not (tmp_path / "x").exists()


def test_cli_quantize_eval_and_generate_flags(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["quantize", str(src), str(out), "--experts", "2", "--layers", "1-1:experts=8", "--report", "-q"]) == 0
    text = capsys.readouterr().out
    assert "relative error" in text and "experts" in text
    man = json.loads((out / MANIFEST).read_text())
    assert man["experts"]["layouts"]["1"]["gate_up"] == "q8" and man["experts"]["layouts"]["2"]["gate_up"] == "q2"
    assert main(["eval", str(out), "--ref", str(src), "--random-tokens", "64", "--ctx", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kl"] > 0 and res["ppl"] > 1 and res["weight_error"]["experts"] > 0
    saved = tmp_path / "gen"
    rc = main(["generate", str(src), "--experts", "4", "--save-quantized", str(saved), "-p", "hi", "-n", "3", "-q", "--ignore-eos"])
    assert rc == 0 and (saved / MANIFEST).is_file()


def test_generate_reports_the_expert_kernels(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quant.native import native_status

    assert main(["generate", str(src), "-p", "hi", "--max-new-tokens", "3", "--experts", "4", "--stats-json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["backend"]["kernels"] == native_status()
