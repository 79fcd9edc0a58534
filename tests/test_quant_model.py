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
from localglm.layers.experts import QuantizedExperts
from localglm.quantize import partial_dir, quantize_checkpoint
from localglm.checkpoint.quantized_dir import MANIFEST, VERSION, QuantizedSource, blob_name
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny
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
        with localglm.checkpoint.source.SafetensorsSource(src) as ss:
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
    assert not part.exists()  # a failed run removes its partial output
    with pytest.raises(LocalGLMError):
        localglm.load(out)
    part.mkdir()  # what a killed run leaves: no manifest, no config, nothing loadable
    (part / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(LocalGLMError):
        localglm.load(part)
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
    # quantized on the fly: no weight error to read, and the report says so rather than leaving the line out
    assert main(["eval", str(src), "--experts", "4", "--ref", str(src), "--random-tokens", "64", "--ctx", "32"]) == 0
    assert "`localglm quantize` MODEL first" in capsys.readouterr().out
    saved = tmp_path / "gen"
    rc = main(["generate", str(src), "--experts", "4", "--save-quantized", str(saved), "-p", "hi", "-n", "3", "-q", "--ignore-eos"])
    assert rc == 0 and (saved / MANIFEST).is_file()


def test_generate_reports_the_expert_kernels(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quant.native import native_status

    assert main(["generate", str(src), "-p", "hi", "--max-new-tokens", "3", "--experts", "4", "--stats-json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["backend"]["kernels"] == native_status()


def _mapped_file(address: int) -> Path | None:
    """The file mapped at `address` in this process (Linux /proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            return Path(parts[5]).resolve() if len(parts) == 6 and parts[5].startswith("/") else None
    return None


def test_mapped_experts_are_views_of_the_files_and_give_the_same_numbers(q4: Path, src: Path) -> None:
    """mmap=True leaves every expert blob a read-only view of its shard (nothing copied) and the
    logits stay bit for bit those of the copied experts; only a quantized directory can be mapped."""
    copied = localglm.load(q4, mmap=False)
    mapped = localglm.load(q4, mmap=True)
    qe = mapped.net.experts
    assert qe.mapped and not copied.net.experts.mapped
    assert qe.nbytes == copied.net.experts.nbytes
    for views in qe.blobs.values():
        assert isinstance(views, list)
        assert {_mapped_file(v.data_ptr()).parent for v in views} == {q4.resolve()}  # in the shards' mappings
    assert _mapped_file(next(iter(copied.net.experts.blobs.values())).data_ptr()) is None
    assert torch.equal(mapped.logits(IDS), copied.logits(IDS))
    text = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert mapped.generate_text("def f(", **text) == copied.generate_text("def f(", **text)
    with pytest.raises(LocalGLMError, match="needs a localglm quantized directory"):
        localglm.load(src, mmap=True)


def test_offloading_maps_what_cpu_mem_cannot_hold(q4: Path, src: Path, tmp_path: Path) -> None:
    """A --cpu-mem too small for every expert: the plan's share goes to host RAM, the rest stays in the
    mapped files, and the tokens are those of the in-memory run. A float checkpoint cannot do that and
    says so in one line."""
    ref = localglm.load(q4)
    text = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    want = ref.generate_text("def f(", **text)
    blob = max(lay.nbytes for lay in ref.net.experts.layouts.values())
    k = ref.config.num_experts_per_tok
    cpu_mem = 2 * k * blob + 5 * blob  # staging + five experts
    m = localglm.load(q4, offload="sim", gpu_mem="4MiB", cpu_mem=cpu_mem, stats_path=tmp_path / "s.npz")
    be = m.net.experts
    total = len(be.moe_layers) * be.n_experts
    assert be.experts_mapped == total - 5
    assert m.generate_text("def f(", **text) == want
    assert m.last_stats.backend["experts_mapped"] == total - 5
    with pytest.raises(LocalGLMError, match="memory-mapped on disk needs a localglm quantized directory"):
        c = ref.config
        fp32 = 3 * c.hidden_size * c.moe_intermediate_size * 4
        localglm.load(src, offload="sim", gpu_mem="4MiB", cpu_mem=2 * k * fp32 + 5 * fp32, stats_path=tmp_path / "f.npz")


def test_the_hottest_experts_go_to_host_ram_and_the_rest_stay_mapped() -> None:
    from offload.backend import host_from_mapped
    from offload.device import SimulatedDevice
    from offload.router_stats import RouterStats

    views = {layer: [torch.full((16,), 10 * layer + e, dtype=torch.uint8) for e in range(4)] for layer in (1, 2)}
    stats = RouterStats([1, 2], 4, 1)
    stats.update(2, torch.tensor([[3], [3], [3], [1]]))  # layer 2: expert 3 hottest, then 1
    stats.update(1, torch.tensor([[0], [0]]))
    host = host_from_mapped(views, stats, 3, SimulatedDevice(1 << 20))
    copied = {(layer, e) for layer in host for e in range(4) if host[layer][e] is not views[layer][e]}
    assert copied == {(2, 3), (1, 0), (2, 1)}
    assert all(torch.equal(host[layer][e], views[layer][e]) for layer in host for e in range(4))
    spread = host_from_mapped(views, RouterStats([1, 2], 4, 1), 3, SimulatedDevice(1 << 20))  # no profile: even
    assert {(layer, e) for layer in spread for e in range(4) if spread[layer][e] is not views[layer][e]} == {(1, 0), (2, 0), (1, 1)}
