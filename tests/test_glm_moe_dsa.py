"""GLM-5.x (`glm_moe_dsa`: MLA + DeepSeek sparse attention + IndexShare) against transformers'
GlmMoeDsaForCausalLM, with the indexer's top-k below the sequence so the selection matters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import localglm
from tests.oracle import assert_cached_decode_matches, assert_close, assert_greedy_matches
from localglm.cli import main
from localglm.layers.dsa import DsaCache
from localglm.models.glm_moe_dsa.tiny import TinySpec
from localglm.tiny import make_tiny

transformers = pytest.importorskip("transformers")
DATA = Path(__file__).parent / "data"

VARIANTS = {
    "all-full": TinySpec(dtype="float32", index_topk=5),
    "shared-layers": TinySpec(dtype="float32", num_hidden_layers=4, indexer_pattern="FSFS", index_topk=6, seed=3),
    "wide-index": TinySpec(
        dtype="float32", num_hidden_layers=4, first_k_dense_replace=2, indexer_pattern="FSSF", index_n_heads=6, index_head_dim=24,
        index_topk=7, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, attention_bias=True, seed=5,
    ),
}  # fmt: skip



@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny(tmp_path_factory.mktemp(request.param) / "m", VARIANTS[request.param])
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return localglm.load(path, dtype="float32"), hf


@pytest.fixture(scope="module")
def dsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("dsa") / "m", TinySpec(num_hidden_layers=4, indexer_pattern="FSFS"))


def test_config_derives_indexer_types_as_transformers_does() -> None:
    from localglm.config import ModelConfig

    raw = json.loads((DATA / "real_configs.json").read_text())["GLM-5.2"]
    cfg = ModelConfig.from_dict(raw)
    ref = transformers.GlmMoeDsaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version", "dtype")})
    assert list(cfg.indexer_types) == ref.indexer_types and cfg.indexer_types.count("shared") == 57
    assert cfg.first_k_dense_replace == 3 and cfg.rope_theta == 8e6 and cfg.max_position_embeddings == 1_048_576


def test_logits_match_transformers_with_sparse_selection(pair) -> None:
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert_close(ours.logits(ids), ref)
    # the selection matters: the same model with the indexer's top-k above the sequence (dense) differs
    dense = localglm.load(ours.path, dtype="float32")
    dense.net.index_shape = dataclasses.replace(dense.net.index_shape, topk=1000)
    assert (dense.logits(ids) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_greedy_generation_matches_transformers(pair) -> None:
    ours, hf = pair
    assert_greedy_matches(ours, hf, 9, 16)


def test_cached_decode_selects_as_the_full_forward_does(pair) -> None:
    """Decode past index_topk reads the indexer-key cache of the full layers and the top-k latent rows."""
    ours = pair[0]
    cache = assert_cached_decode_matches(ours, n=16, prefill=3, split=10, cache_type=DsaCache)
    assert cache.index_keys.shape[0] == len(ours.config.index_layers)


def test_rope_interleave_false_runs_as_transformers_runs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers' GlmMoeDsa rotates interleaved pairs whatever rope_interleave says (every GLM-5.x config says
    true); we read the key and ran the half-split form, 0.76 of the logit scale away (a shape sweep)."""
    import logging

    path = make_tiny(tmp_path / "m", TinySpec(dtype="float32", index_topk=5))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_interleave": False}))
    with caplog.at_level(logging.WARNING, logger="localglm"):
        ours = localglm.load(path, dtype="float32")
    assert any("rope_interleave false ignored" in r.getMessage() for r in caplog.records)
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours.logits(ids), hf(ids).logits.float())


# Two indexer heads: ReLU zeroes both for many keys, so their scores tie at 0 and torch.topk keeps some of them by where
# its algorithm meets them, which depends on the row it runs on (layers/dsa.py).
TIES = TinySpec(dtype="float32", index_n_heads=2, index_topk=6, seed=2)


@pytest.fixture(scope="module")
def ties_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ties") / "m", TIES)


@pytest.mark.parametrize("layers", ["native", "torch"])
def test_greedy_matches_transformers_where_indexer_scores_tie(ties_dir: Path, layers: str) -> None:
    """A prompt chunk picks as transformers' forward does (each query's row padded to the chunk's end with masked
    keys); the native layers picked over each query's own keys, as a decode step, and went elsewhere on ties."""
    ours = localglm.load(ties_dir, dtype="float32")
    if layers == "torch":
        ours.net.fused_prefill = False
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(ties_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for seed, n in ((2, 12), (3, 20), (4, 20), (7, 20)):
        assert_greedy_matches(ours, hf, n, 10, seed=seed)


def test_a_long_chunk_in_native_pieces_picks_as_the_torch_layers_where_scores_tie(ties_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 2 top-k's a long chunk runs through the native layers in pieces (glm_moe_dsa/model.py); each piece's
    queries still break ties over the whole chunk's rows, as the torch layers over the chunk do."""
    from localglm.models.glm_moe_dsa import model as dsa_model

    monkeypatch.setattr(dsa_model, "PICKED_PIECE", 8)
    ids = torch.randint(0, TIES.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    out = []
    for native in (True, False):
        net = localglm.load(ties_dir, dtype="float32").net
        net.fused_prefill, net.fused_prefill_max = native, 4
        cache = net.new_cache(48)
        with torch.inference_mode():
            net.hidden_states(ids[:, :12], cache, 0)
            out.append(net.lm_head(net.hidden_states(ids[:, 12:], cache, 12)))  # 28 tokens at 12 = 2 x top-k: pieces of 8
    assert_close(out[0], out[1])


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_speculation_equals_plain_decoding_where_indexer_scores_tie(ties_dir: Path, monkeypatch: pytest.MonkeyPatch, kernels: str) -> None:
    """A verification's tokens pick as their decode steps do (`steps`), with the native kernels and without them
    (no compiler, a GPU): with the chunk's rows they kept other tied keys and greedy output changed."""
    import localglm.layers.dsa as dsa

    if kernels == "torch":
        monkeypatch.setattr(dsa, "native", lambda: None)
    m = localglm.load(ties_dir, dtype="float32", mtp=True, draft=3, draft_fixed=True)
    if kernels == "torch":
        m.net.fused_decode = m.net.fused_prefill = False
    greedy = localglm.SamplingParams(temperature=0)
    for seed in range(4):
        prompt = torch.randint(0, m.config.vocab_size, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        m.speculation.set_draft(0)
        plain = list(m.stream_tokens(prompt, max_new_tokens=16, sampling=greedy, reuse_prefix=False))
        for depth in (1, 3):
            m.speculation.set_draft(depth, adaptive=False)
            assert list(m.stream_tokens(prompt, max_new_tokens=16, sampling=greedy, reuse_prefix=False)) == plain, (seed, depth)


def test_within_index_topk_attention_is_dense_exactly(dsa_dir: Path) -> None:
    """Nothing is scored while the context fits the top-k: the result is the dense model's."""
    m = localglm.load(dsa_dir, dtype="float32")
    ids = torch.randint(0, m.config.vocab_size, (1, m.config.index_topk), generator=torch.Generator().manual_seed(4))
    sparse = m.logits(ids)
    m.net.index_shape = dataclasses.replace(m.net.index_shape, topk=10_000)
    assert torch.equal(m.logits(ids), sparse)


def test_the_cache_holds_latents_and_the_full_layers_indexer_keys(dsa_dir: Path) -> None:
    from localglm.model_info import kv_cache_bytes

    m = localglm.load(dsa_dir)
    cfg = m.config
    per_token = (cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + len(cfg.index_layers) * cfg.index_head_dim) * 2
    assert m.net.new_cache(64).nbytes == kv_cache_bytes(cfg, 64) == 64 * per_token


def test_quantize_keeps_the_indexer_and_router_precise(dsa_dir: Path, tmp_path: Path) -> None:
    from localglm.checkpoint.quantized_dir import MANIFEST

    out = tmp_path / "q"
    assert main(["quantize", str(dsa_dir), str(out), "--experts", "4", "-q"]) == 0
    quantized = set(json.loads((out / MANIFEST).read_text())["tensors"])
    assert "model.layers.1.self_attn.kv_b_proj.weight" in quantized
    assert not any(".indexer." in n for n in quantized) and "model.layers.1.mlp.gate.weight" not in quantized
    ref, q = localglm.load(dsa_dir, dtype="float32"), localglm.load(out, dtype="float32")
    ids = torch.randint(0, ref.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    lr, lq = ref.logits(ids).log_softmax(-1), q.logits(ids).log_softmax(-1)
    assert float((lr.exp() * (lr - lq)).sum(-1).mean()) < 0.05
    q8 = tmp_path / "q8"
    assert main(["quantize", str(dsa_dir), str(q8), "--experts", "4", "--indexer", "8", "-q"]) == 0
    assert "model.layers.0.self_attn.indexer.wq_b.weight" in json.loads((q8 / MANIFEST).read_text())["tensors"]


def test_gguf_export_reads_back_exactly(dsa_dir: Path, tmp_path: Path) -> None:
    from localglm.checkpoint.gguf import GGUFSource, export_gguf

    f = export_gguf(dsa_dir, tmp_path / "m.gguf", "f32")[0]
    with GGUFSource(f) as src:
        assert src.arch.model_type == "glm_moe_dsa"
        assert src.files.metadata["glm-dsa.attention.indexer.types"] == [True, False, True, False]
        assert "model.layers.2.self_attn.indexer.weights_proj.weight" in src
        assert "model.layers.1.self_attn.indexer.weights_proj.weight" not in src  # a shared layer has no indexer
    a, b = localglm.load(f, dtype="float32"), localglm.load(dsa_dir, dtype="float32")
    assert a.config == dataclasses.replace(b.config, torch_dtype="float32")
    ids = torch.randint(0, a.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_offload_sim_trace_and_make_tiny(dsa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    greedy = localglm.SamplingParams(temperature=0)
    prompt = list(range(5, 30))
    plain = list(localglm.load(dsa_dir).stream_tokens(prompt, max_new_tokens=6, sampling=greedy))
    m = localglm.load(dsa_dir, offload="sim", gpu_mem="8MiB", trace=tmp_path / "t.jsonl", stats_path=tmp_path / "s.npz")
    assert list(m.stream_tokens(prompt, max_new_tokens=6, sampling=greedy)) == plain
    out = tmp_path / "tiny"
    assert main(["make-tiny", str(out), "--arch", "glm_moe_dsa", "--indexer-pattern", "FSS", "--index-topk", "4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["indexer_types"] == ["full", "shared", "shared"] and cfg["index_topk"] == 4
    assert main(["inspect", str(out)]) == 0
    assert "DSA indexer 4 heads x 16, top-4, on 1 of 3 layers (2 share its selection)" in capsys.readouterr().out


def test_latent_rows_in_ram_on_a_device_too_small_for_the_cache(dsa_dir: Path) -> None:
    """Issue 14 item 3 on the simulated device: at a budget where the whole cache does not fit, the plan keeps
    the latent rows in RAM; decode gathers only the top-k rows a step, and the tokens are the plain run's."""
    from localglm.model_info import hostable_kv

    greedy, prompt, new = localglm.SamplingParams(temperature=0), [(i * 7) % 200 + 3 for i in range(40)], 8
    # The prompt through the torch ops on every run: rows kept in RAM are the torch path's (the fused
    # one does not read them), and a native prefill rounds otherwise, which a random bf16 model amplifies.
    ref = localglm.load(dsa_dir, ctx=2048)
    ref.net.fused_prefill = False
    plain = list(ref.stream_tokens(prompt, max_new_tokens=new, sampling=greedy))
    with pytest.raises(localglm.LocalGLMError, match="too small for this model at --ctx 2048"):
        localglm.load(dsa_dir, offload="sim", gpu_mem="2.6MiB", ctx=2048, kv="gpu")
    small = localglm.load(dsa_dir, offload="sim", gpu_mem="2.6MiB", ctx=2048)  # auto: the rows go to RAM
    assert small.net.experts.plan.kv_in_ram
    moved = {}
    for kv in ("gpu", "ram"):  # a budget where both fit at the same precision: the same tokens, fewer bytes on the device
        m = localglm.load(dsa_dir, offload="sim", gpu_mem="8MiB", ctx=2048, kv=kv)
        m.net.fused_prefill = False
        device, before = m.net.experts.device, m.net.experts.device.bytes_h2d
        assert list(m.stream_tokens(prompt, max_new_tokens=new, sampling=greedy)) == plain
        moved[kv] = device.bytes_h2d - before
    cfg = small.config
    host = hostable_kv(cfg)
    assert host is not None and host.rows_read == cfg.index_topk
    # prefill brings each layer's 40 rows once; each of the 7 decoded steps past the top-k brings top-k rows a layer
    assert moved["ram"] - moved["gpu"] == cfg.num_hidden_layers * host.row_bytes * (len(prompt) + (new - 1) * cfg.index_topk)


# llama.cpp's glm-dsa graph needs index_head_dim a power of two >= 64 (its Hadamard transform); with
# few indexer heads, keys whose every head's ReLU is 0 tie, and llama.cpp breaks those ties otherwise
# than torch.topk: 16 heads make exact ties vanishingly rare.
LLAMA_SPEC = dict(num_hidden_layers=4, indexer_pattern="FSFS", index_head_dim=64, index_n_heads=16, index_topk=6)


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_reads_the_gguf_llama_cpps_converter_writes(tmp_path: Path, kind: str) -> None:
    """tests/data/glm_moe_dsa_llamacpp_*.gguf: llama.cpp's convert_hf_to_gguf.py (0c1e57098) on this
    make-tiny checkpoint (tests/data/README.md): indexer tensors, indexer.types, kv_b split per head."""
    spec = TinySpec(dtype="bfloat16", qk_nope_head_dim=32, kv_lora_rank=32, v_head_dim=32, seed=13, **LLAMA_SPEC)
    ours = localglm.load(make_tiny(tmp_path / "m", spec), dtype="float32")
    theirs = localglm.load(DATA / f"glm_moe_dsa_llamacpp_{kind}.gguf", dtype="float32")
    assert theirs.config == ours.config
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    if kind == "bf16":
        assert torch.equal(theirs.logits(ids), ours.logits(ids))
    else:
        lr, lq = ours.logits(ids).log_softmax(-1), theirs.logits(ids).log_softmax(-1)
        assert float((lr.exp() * (lr - lq)).sum(-1).mean()) < 0.01


def test_llama_cpp_reads_our_export_with_the_same_selection(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from localglm.checkpoint.gguf import export_gguf

    src = make_tiny(tmp_path / "m", TinySpec(dtype="float32", seed=11, **LLAMA_SPEC))
    f = export_gguf(src, tmp_path / "m.gguf", "f32")[0]
    ours = localglm.load(src, dtype="float32")
    ids = torch.randint(0, ours.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(1))
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)  # f32 KV
    llm.eval(ids[0].tolist())
    assert_close(torch.tensor(np.array(llm.scores[:14])), ours.logits(ids)[0], 1e-4)  # 14 tokens past index_topk 6


def test_fp8_hub_layout_and_chat(tmp_path: Path) -> None:
    """GLM-5.x ships FP8 block-scaled weights (the indexer's weights_proj stays bf16); chat opens <think>."""
    fp8 = localglm.load(make_tiny(tmp_path / "fp8", TinySpec(dtype="fp8", num_hidden_layers=3, indexer_pattern="FSF")), dtype="float32")
    ref = localglm.load(make_tiny(tmp_path / "f32", TinySpec(dtype="float32", num_hidden_layers=3, indexer_pattern="FSF")), dtype="float32")
    ids = torch.randint(0, ref.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(8))
    lr, lq = ref.logits(ids).log_softmax(-1), fp8.logits(ids).log_softmax(-1)
    assert float((lr.exp() * (lr - lq)).sum(-1).mean()) < 0.05
    assert fp8.render_chat([{"role": "user", "content": "hi"}]).rstrip().endswith("<think>")
    done = list(fp8.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0, ignore_eos=True))[-1]
    assert isinstance(done, localglm.Done) and done.stats.decode_tokens == 4
