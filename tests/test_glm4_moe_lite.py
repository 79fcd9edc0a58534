"""GLM-4.7-Flash (`glm4_moe_lite`, MLA) end to end: transformers' logits, the latent cache, prefix
reuse, quantization, GGUF both ways (llama.cpp's converter's files included), offload, chat."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import localglm
from tests.oracle import assert_cached_decode_matches, assert_close, assert_greedy_matches, kl_divergence
from localglm.cli import main
from localglm.layers.kv_cache import LatentCache
from localglm.models.glm4_moe_lite.tiny import TinySpec
from localglm.tiny import make_tiny

transformers = pytest.importorskip("transformers")
DATA = Path(__file__).parent / "data"

VARIANTS = {
    "default": TinySpec(dtype="float32"),
    "q_proj-bias-neox": TinySpec(dtype="float32", q_lora_rank=0, attention_bias=True, rope_interleave=False, seed=1),
    "grouped-wide": TinySpec(
        dtype="float32", num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, num_attention_heads=6, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, seed=2,
        rope_style="parameters", n_shared_experts=2,
    ),
}  # fmt: skip




@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny(tmp_path_factory.mktemp(request.param) / "m", VARIANTS[request.param])
    hf = transformers.Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return localglm.load(path, dtype="float32"), hf


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("lite") / "m", TinySpec())


def test_logits_match_transformers(pair) -> None:
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert_close(ours.logits(ids), ref)


def test_greedy_generation_matches_transformers(pair) -> None:
    ours, hf = pair
    assert_greedy_matches(ours, hf, 9, 24)


def test_latent_cache_decode_and_chunked_prefill_equal_the_full_forward(pair) -> None:
    """Decode reads only the latent cache (the absorbed form); chunked prefill masks by position."""
    assert_cached_decode_matches(pair[0], n=14, prefill=5, split=9, cache_type=LatentCache)


def test_the_cache_holds_only_the_latent_and_the_rope_key(lite_dir: Path) -> None:
    m = localglm.load(lite_dir)
    cfg = m.config
    cache = m.net.new_cache(100)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # bf16
    assert cache.nbytes == per_token * 100
    from localglm.model_info import kv_cache_bytes

    assert kv_cache_bytes(cfg, 100) == per_token * 100


def test_prefix_reuse_gives_the_same_tokens(lite_dir: Path) -> None:
    m = localglm.load(lite_dir, dtype="float32")
    greedy = localglm.SamplingParams(temperature=0)
    prompt = list(range(3, 40))
    first = list(m.stream_tokens(prompt, max_new_tokens=8, sampling=greedy))
    stats = localglm.GenerationStats()
    again = list(m.stream_tokens(prompt + first[:4], max_new_tokens=6, sampling=greedy, stats=stats))
    assert stats.cached_prompt_tokens > len(prompt) - 1
    fresh = list(m.stream_tokens(prompt + first[:4], max_new_tokens=6, sampling=greedy, reuse_prefix=False))
    assert again == fresh and again[:4] == first[4:]


def test_quantize_keeps_norms_and_router_and_quantizes_the_mla_projections(lite_dir: Path, tmp_path: Path) -> None:
    from localglm.checkpoint.quantized_dir import MANIFEST

    out = tmp_path / "q"
    assert main(["quantize", str(lite_dir), str(out), "--experts", "4", "--attn", "8", "-q"]) == 0
    man = json.loads((out / MANIFEST).read_text())
    quantized = set(man["tensors"])
    for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert f"model.layers.1.self_attn.{proj}.weight" in quantized
    for kept in ("q_a_layernorm", "kv_a_layernorm"):
        assert f"model.layers.1.self_attn.{kept}.weight" not in quantized
    assert "model.layers.1.mlp.gate.weight" not in quantized
    ref = localglm.load(lite_dir, dtype="float32")
    q = localglm.load(out, dtype="float32")
    otf = localglm.load(lite_dir, dtype="float32", experts_bits=4, attn_bits=8)
    ids = torch.randint(0, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    kl = kl_divergence(ref.logits(ids), q.logits(ids))
    assert kl < 0.05, kl  # the glm4_moe q4 bound (test_quant_model)
    assert_close(otf.logits(ids), q.logits(ids), 1e-3)  # quantizing while loading = loading the quantized directory


def test_gguf_export_reads_back_exactly(lite_dir: Path, tmp_path: Path) -> None:
    from localglm.checkpoint.gguf import GGUFSource, export_gguf

    f = export_gguf(lite_dir, tmp_path / "m.gguf", "f32")[0]
    with GGUFSource(f) as src:
        assert src.arch.model_type == "glm4_moe_lite"
        assert "model.layers.1.self_attn.kv_b_proj.weight" in src  # rebuilt from attn_k_b + attn_v_b
        assert src.files.metadata["deepseek2.attention.head_count_kv"] == 1
    a, b = localglm.load(f, dtype="float32"), localglm.load(lite_dir, dtype="float32")
    assert a.config == dataclasses.replace(b.config, torch_dtype="float32")  # written as f32
    ids = torch.randint(0, a.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_attn_v_b_that_does_not_fit_attn_k_b_is_one_line(lite_dir: Path, tmp_path: Path) -> None:
    """Before: a traceback from torch.cat joining kv_b_proj back together (a hostile-GGUF sweep)."""
    from localglm.checkpoint.gguf import export_gguf
    from tests.probes import run_cli
    from tests.test_gguf import copy_gguf

    bad = copy_gguf(export_gguf(lite_dir, tmp_path / "m.gguf", "f32")[0], tmp_path / "bad.gguf", halve="blk.1.attn_v_b.weight")
    for argv in (["generate", bad, "-p", "x", "-n", "1", "-q"], ["quantize", bad, tmp_path / "q", "-q"]):
        o = run_cli(*argv)
        assert o.kind == "clean" and "tensor blk.1.attn_v_b.weight has shape" in o.err and "beside blk.1.attn_k_b.weight" in o.err, o.why()


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_reads_the_gguf_llama_cpps_converter_writes(tmp_path: Path, kind: str) -> None:
    """tests/data/glm4_moe_lite_llamacpp_*.gguf were written by llama.cpp's convert_hf_to_gguf.py
    (0c1e57098, the llama-cpp-python 0.3.36 tree) from this make-tiny checkpoint (see tests/data/README.md)."""
    src = make_tiny(tmp_path / "m", TinySpec(dtype="bfloat16", qk_nope_head_dim=32, kv_lora_rank=32, v_head_dim=32, seed=7, vocab_size=512))
    theirs = localglm.load(DATA / f"glm4_moe_lite_llamacpp_{kind}.gguf", dtype="float32")
    ours = localglm.load(src, dtype="float32")
    assert theirs.config == ours.config
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(7))
    if kind == "bf16":  # the same bf16 weights: the same numbers
        assert torch.equal(theirs.logits(ids), ours.logits(ids))
    else:  # Q8_0 blocks taken as they are (experts) or dequantized; llama.cpp's own KL on this file is 0.053
        assert kl_divergence(ours.logits(ids), theirs.logits(ids)) < 0.04
    assert theirs.tokenizer.encode("def f(x): return x") == ours.tokenizer.encode("def f(x): return x")


def test_llama_cpp_reads_our_export(lite_dir: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from localglm.checkpoint.gguf import export_gguf

    f = export_gguf(make_tiny(tmp_path / "m", TinySpec(dtype="float32")), tmp_path / "m.gguf", "f32")[0]
    ours = localglm.load(tmp_path / "m", dtype="float32")
    ids = torch.randint(0, ours.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids[0].tolist())
    assert_close(torch.tensor(np.array(llm.scores[:13])), ours.logits(ids)[0], 2e-3)  # llama.cpp's f16 KV cache


def test_offload_sim_gives_the_same_tokens(lite_dir: Path, tmp_path: Path) -> None:
    from offload.trace import Trace

    greedy = localglm.SamplingParams(temperature=0)
    prompt = list(range(5, 30))
    plain = list(localglm.load(lite_dir).stream_tokens(prompt, max_new_tokens=8, sampling=greedy))
    trace = tmp_path / "t.jsonl"
    m = localglm.load(lite_dir, offload="sim", gpu_mem="8MiB", cache_policy="lru", trace=trace, stats_path=tmp_path / "s.npz")
    assert list(m.stream_tokens(prompt, max_new_tokens=8, sampling=greedy)) == plain
    snap = m.net.experts.stats_snapshot()
    assert snap["offload"] == "sim" and snap["hits"] + snap["misses"] > 0
    assert main(["simulate", str(trace), "--json"]) == 0
    assert Trace.load(trace).moe_layers == [*m.config.moe_layers, m.config.num_hidden_layers]  # the MTP block's experts are offloaded too


def test_chat_with_the_glm47_template_opens_thinking_in_the_prompt(lite_dir: Path) -> None:
    m = localglm.load(lite_dir)
    text = m.render_chat([{"role": "user", "content": "hi"}])
    assert text.rstrip().endswith("<think>")
    events = list(m.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0, ignore_eos=True))
    assert isinstance(events[-1], localglm.Done) and events[-1].stats.decode_tokens == 5


def test_inspect_plan_and_make_tiny_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "t"
    assert main(["make-tiny", str(out), "--arch", "glm4_moe_lite", "--q-lora-rank", "0", "--kv-lora-rank", "16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm4_moe_lite" and cfg["q_lora_rank"] is None and cfg["kv_lora_rank"] == 16
    assert main(["make-tiny", str(tmp_path / "u"), "--arch", "glm4_moe_lite", "--head-dim", "8"]) == 2
    assert "--head-dim belong to another architecture" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    assert "MLA, 4 heads: q_proj, kv_lora 16" in capsys.readouterr().out
    assert main(["plan", str(out), "--gpu-mem", "1GiB", "--cpu-mem", "1GiB"]) == 0
    assert "predicted: decode" in capsys.readouterr().out


def test_serve_answers_a_tool_call_with_the_official_client(lite_dir: Path) -> None:
    """The server is the engine's: a scripted GLM-4.7 tool call comes back through the OpenAI client."""
    openai = pytest.importorskip("openai")
    from localglm.server import ServerSettings, create_app
    from localglm.server.testing import ScriptedOutput, ServerThread

    model = localglm.load(lite_dir)
    scripts = ScriptedOutput(model)
    scripts.add("call", "<think>look</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value></tool_call>")
    app = create_app(model, ServerSettings(model_name="flash"), logits_processor_hook=scripts)
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        r = client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "SCRIPT:call"}], tools=[tool], max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "read_file" and json.loads(call.function.arguments) == {"path": "a.py"}
