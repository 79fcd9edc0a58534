"""The fused native forward of several tokens (prompt chunks, speculative verification) against the
same tokens decoded one at a time by the fused path (localglm/models/fused_decode.py,
localglm/models/native/decode_layer.c with T > 1).

Each token of a T-token call gets exactly the arithmetic of a one-token call (activations quantized
per row alike, the same sums in the same order; token t writes its cache row and attends up to
itself), so the logits and every cache are asserted bit-identical, not close -- for dense and
quantized weights and experts, GQA, MLA and DSA (past its top-k), in one call for the whole model
and per layer through an expert backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from localglm.models.glm4_moe.tiny import TinySpec as Glm4Spec
from localglm.tiny import make_tiny
from quant.native import native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the native kernels cannot be built")

PROMPT = torch.randint(0, 500, (27,), generator=torch.Generator().manual_seed(7)).tolist()
CHUNKS = (5, 1, 9, 4, 8)  # prompt chunks of several sizes, a one-token one among them (sum: len(PROMPT))


def _caches(cache: Any) -> list[torch.Tensor]:
    return [t.clone() for t in (getattr(cache, name, None) for name in ("k", "v", "kv", "index_keys")) if isinstance(t, torch.Tensor)]


def _logits(net: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Each position's logits as a decode step computes them: lm_head on one hidden vector (a
    float lm_head over several rows is a GEMM, whose sums torch orders otherwise than its GEMV's)."""
    return torch.stack([net.lm_head(h).float() for h in hidden[0]])


def _one_at_a_time(net: Any, prompt: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of every position and the caches, the prompt decoded one token per call."""
    ids, cache = torch.tensor([prompt]), net.new_cache(max(32, len(prompt)))
    with torch.inference_mode():
        logits = [_logits(net, net.hidden_states(ids[:, p : p + 1], cache, p)) for p in range(len(prompt))]
    return torch.cat(logits), _caches(cache)


def _chunked(net: Any, prompt: list[int], chunks: tuple[int, ...] = CHUNKS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same through calls of several tokens, which must not reach the torch layers. As a speculative
    verification's (`steps`): a prompt chunk's DSA picks break torch.topk's ties over the chunk's rows instead,
    as transformers' forward does (tests/test_glm_moe_dsa.py), and may differ from its tokens' steps there."""

    def torch_layers(*_: object, **__: object) -> None:
        raise AssertionError("a multi-token forward ran the torch ops")

    ids, cache, logits, start = torch.tensor([prompt]), net.new_cache(max(32, len(prompt))), [], 0
    net.run_layers = torch_layers
    try:
        with torch.inference_mode():
            for n in chunks:
                logits.append(_logits(net, net.hidden_states(ids[:, start : start + n], cache, start, steps=True)))
                start += n
    finally:
        del net.run_layers
    assert start == len(prompt)
    return torch.cat(logits), _caches(cache)


def _assert_same(net: Any, prompt: list[int] = PROMPT, chunks: tuple[int, ...] = CHUNKS) -> None:
    assert net._fused_decoder() is not None
    (a, ca), (b, cb) = _one_at_a_time(net, prompt), _chunked(net, prompt, chunks)
    assert torch.equal(a, b)
    assert len(ca) == len(cb) > 0 and all(torch.equal(x, y) for x, y in zip(ca, cb))
    assert a.abs().max() > 0


def _load(tmp_path: Path, arch: str, load: dict, **spec: Any) -> Any:
    from importlib import import_module

    tiny = import_module(f"localglm.models.{arch}.tiny").TinySpec
    return localglm.load(str(make_tiny(tmp_path / arch, tiny(**spec))), **load).net


GLM4 = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=32, n_routed_experts=16, n_group=4, topk_group=2,
            num_experts_per_tok=4)  # fmt: skip
CASES = {
    "glm4_moe-bf16": ("glm4_moe", {}, GLM4),
    "glm4_moe-fp32": ("glm4_moe", dict(dtype="float32"), dict(GLM4, dtype="float32")),
    "glm4_moe-q4": ("glm4_moe", dict(experts_bits=4, attn_bits=4), GLM4),
    "glm4_moe-q8-q2": ("glm4_moe", dict(experts_bits=2, attn_bits=8, shared_bits=8, dense_bits=8), GLM4),
    "glm4_moe_lite-bf16": ("glm4_moe_lite", {}, {}),
    "glm4_moe_lite-q4": ("glm4_moe_lite", dict(experts_bits=4, attn_bits=8), dict(q_lora_rank=0, attention_bias=True, seed=1)),
    # latent rows of 480 + 32 values, a multiple of 32 (their q . k runs on the cached bf16 rows, vdpbf16ps), long
    # enough that the fp32 sums round (with 64 values they came out exact in any order)
    "glm4_moe_lite-bf16-rows32": ("glm4_moe_lite", {}, dict(kv_lora_rank=480, qk_rope_head_dim=32, seed=4)),
    "glm_moe_dsa-bf16": ("glm_moe_dsa", {}, dict(num_hidden_layers=4, indexer_pattern="FSFS", index_topk=6, seed=3)),
    # top-16: the first chunks fit it (their tokens attend together, the indexer keys still written), the
    # later ones pick per token; latent rows of 480 + 32 (vdpbf16ps scores)
    "glm_moe_dsa-bf16-rows32": ("glm_moe_dsa", {}, dict(num_hidden_layers=4, indexer_pattern="FSFS", index_topk=16, kv_lora_rank=480, index_head_dim=32,
                                                        qk_rope_head_dim=32, seed=5)),
    "glm_moe_dsa-q4": ("glm_moe_dsa", dict(experts_bits=4, attn_bits=8, indexer_bits=8), dict(num_hidden_layers=4, indexer_pattern="FSSF", index_topk=7)),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_multi_token_forward_is_bit_identical_to_one_token_steps(tmp_path: Path, case: str) -> None:
    arch, load, spec = CASES[case]
    net = _load(tmp_path, arch, load, **spec)
    assert net._fused_decoder()._experts_in_ram()[1] is not None  # experts in RAM: every layer of the tokens in one call
    _assert_same(net)


@pytest.mark.parametrize("case", ["glm4_moe-bf16", "glm4_moe-fp32", "glm4_moe_lite-bf16", "glm4_moe_lite-bf16-rows32"])
def test_chunks_longer_than_an_attention_slice(tmp_path: Path, case: str) -> None:
    """Grouped-query and latent (MLA) attention take a chunk's tokens 16 at a time (layer_ops.c ATTEND_TQ), each
    block of cached rows read once for them, the heads shared among the threads: chunks of 37 and 30 tokens
    (three and two slices, the last ones partial) after a short one still give every token its one-token
    numbers and the same cache."""
    arch, load, spec = CASES[case]
    prompt = torch.randint(0, 500, (70,), generator=torch.Generator().manual_seed(11)).tolist()
    _assert_same(_load(tmp_path, arch, load, **spec), prompt, (3, 37, 30))


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-bf16")])
def test_without_amx_tiles_too(tmp_path: Path, case: str) -> None:
    """The bf16 cases above on the vector path (AVX512-BF16 or AVX2) where the AMX tiles would run them."""
    quant = native_lib()
    was = quant.amx
    try:
        quant.set_amx(False)
        test_a_multi_token_forward_is_bit_identical_to_one_token_steps(tmp_path, case)
    finally:
        quant.set_amx(was)


@pytest.mark.parametrize("load", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(experts_bits=4)], ids=["fp32-dense", "bf16-dense", "q4"])
def test_per_layer_calls_through_an_expert_backend(tmp_path: Path, load: dict) -> None:
    """Behind a wrapper (the routing tracer: what an offloading backend gets) the experts run in the
    backend between the layer calls, for all the tokens of the call at once, and the backend sees
    every token of every MoE layer. The same bits as one token at a time: quantized experts through
    lg_moe (its per-token sums do not depend on the batch); dense ones because an expert call of up to
    layers/experts.py EXACT_ROWS rows runs row by row through the one-token kernel, and combine_experts
    rounds each weighted product to the dtype as the one-token sum does."""
    from offload.trace import TraceRecorder, TracingExperts

    net = _load(tmp_path, "glm4_moe", load, **GLM4, **({"dtype": load["dtype"]} if "dtype" in load else {}))
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    rec = TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers)
    net.experts = TracingExperts(net.experts, rec)
    assert net._fused_decoder()._experts_in_ram()[1] is None
    _assert_same(net)
    assert sum(len(call.experts) for call in rec.trace.calls) == 2 * len(PROMPT) * len(moe_layers)


@pytest.mark.parametrize("load", [dict(dtype="float32"), dict(dtype="bfloat16"), dict(lm_head_bits=8)], ids=["fp32", "bf16", "q8"])
def test_lm_head_rows_do_not_depend_on_how_many(tmp_path: Path, load: dict) -> None:
    """The lm_head of a few rows (MoeDecoder.lm_head: the native product) gives each row the numbers of
    that row alone, so a verification's logits are decode steps' bit for bit; within rounding of torch's
    product of the same weights."""
    from localglm.layers.linear import linear

    net = _load(tmp_path, "glm4_moe", load, **GLM4, **({"dtype": load["dtype"]} if "dtype" in load else {}))
    hidden = torch.randn(7, net.cfg.hidden_size).to(net.dtype)
    together = net.lm_head(hidden)
    alone = torch.stack([net.lm_head(h) for h in hidden])
    assert net._head is not None and net._head.in_kernels  # the native path took it
    assert together.dtype == net.dtype and together.shape == (7, net.cfg.vocab_size)
    assert torch.equal(together, alone)
    ref = linear(hidden, net.w.lm_head).float()
    assert (together.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_a_long_chunk_well_past_the_top_k_runs_natively_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GLM-5: a chunk longer than the native layers take at once (fused_prefill_max), after 2 top-k's of cached
    context, goes through them in pieces (each query over its own picks) and gives every token its one-token
    numbers; before that point, or as a prompt's first chunk, the torch layers run it."""
    from localglm.models.glm_moe_dsa import model as dsa_model

    net = _load(tmp_path, "glm_moe_dsa", {}, num_hidden_layers=4, indexer_pattern="FSFS", index_topk=6, seed=3)
    monkeypatch.setattr(dsa_model, "PICKED_PIECE", 8)
    net.fused_prefill_max = 4
    prompt = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(12)).tolist()
    _assert_same(net, prompt, (3, 4, 3, 2, 28))  # the 28 at position 12 >= 2 x 6: four pieces, none through torch
    with pytest.raises(AssertionError, match="ran the torch ops"):
        _chunked(net, prompt, (3, 37))  # at position 3: the torch layers


def test_dsa_picks_per_token_past_its_top_k(tmp_path: Path) -> None:
    """Inside one call every token picks its own top-k among the positions up to it (the indexer's
    selection per token), and the shared layers after a full one attend to that token's pick."""
    net = _load(tmp_path, "glm_moe_dsa", {}, num_hidden_layers=4, indexer_pattern="FSSF", index_topk=4, seed=5)
    (a, _), (b, _) = _one_at_a_time(net, PROMPT), _chunked(net, PROMPT, (len(PROMPT),))
    assert torch.equal(a, b)


def test_torch_prefill_stays_where_asked_and_for_long_chunks(tmp_path: Path) -> None:
    """fused_prefill=False keeps several-token forwards on the torch ops (one-token decode still
    native); chunks above fused_prefill_max tokens go there too (torch's GEMMs win on long ones)."""
    net = _load(tmp_path, "glm4_moe", {}, **GLM4)
    calls = []
    run_layers = net.run_layers
    net.run_layers = lambda *a, **k: calls.append(a[0].shape[1]) or run_layers(*a, **k)
    cache = net.new_cache(32)
    with torch.inference_mode():
        net.fused_prefill = False
        net.hidden_states(torch.tensor([PROMPT[:6]]), cache, 0)
        net.hidden_states(torch.tensor([PROMPT[6:7]]), cache, 6)
        net.fused_prefill, net.fused_prefill_max = True, 8
        net.hidden_states(torch.tensor([PROMPT[7:15]]), cache, 7)  # native
        net.hidden_states(torch.tensor([PROMPT[15:24]]), cache, 15)  # 9 > 8 tokens: torch
    assert calls == [6, 9]


def test_an_mtp_blocks_stream_runs_natively_with_the_same_bits(tmp_path: Path) -> None:
    """The MTP block's input is a stream (eh_proj of the embedded next token and the main model's
    stream), not token ids: MoeDecoder.run_layers hands it to the native layers, chunked or one
    position at a time with the same bits, and drafting no longer pays ~60 torch ops a token."""
    model = localglm.load(str(make_tiny(tmp_path / "mtp", Glm4Spec(**GLM4))))
    head = model.speculation.head
    fused = head.block._fused_decoder()
    assert fused is not None
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        streams = model.net.residual(ids, model.net.new_cache(32), 0)
        prev, nxt = streams[:, :-1], ids[:, 1:]
        cache = head.new_cache(32)
        one = torch.cat([head.forward(prev[:, p : p + 1], nxt[:, p : p + 1], cache, p) for p in range(nxt.shape[1])], dim=1)
        cache, out, start = head.new_cache(32), [], 0
        for n in (7, 1, 18):
            out.append(head.forward(prev[:, start : start + n], nxt[:, start : start + n], cache, start))
            start += n
    assert start == nxt.shape[1] and torch.equal(one, torch.cat(out, dim=1))
    head.block.fused_decode = head.block.fused_prefill = False  # the torch ops: the same math to bf16 rounding
    with torch.inference_mode():
        ref = head.forward(prev, nxt, head.new_cache(32), 0)
    assert (ref.float() - one.float()).abs().max() <= 0.05 * ref.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_tiles_give_every_row_the_one_row_numbers(dtype: torch.dtype) -> None:
    """decode_layer.c's dense tiles (several weight rows x up to four tokens; AVX2: bf16 widened by shift
    and mask, AVX-512: one 16-lane accumulator a dot) against lg_matvec's one-row dots, on shapes that
    leave every remainder: a K tail past the 16-value blocks, a row count no tile divides, token counts
    that end in a partial tile. The products come back unrounded (fp32 out), so a changed summation
    order shows."""
    from localglm.layers.native import LayerLib, native

    lib = native()
    assert lib is not None
    g = torch.Generator().manual_seed(5)
    for n, k in ((13, 40), (7, 256), (33, 128)):
        w = torch.randn(n, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g)
        mat = LayerLib.describe_matrix(w, dtype, bias)
        x = torch.randn(9, k, generator=g).to(dtype).float()
        alone = torch.cat([lib.rows_linear(mat, x[t : t + 1], torch.float32) for t in range(9)])  # T = 1: lg_matvec
        for T in range(2, 10):
            assert torch.equal(lib.rows_linear(mat, x[:T], torch.float32), alone[:T]), (n, k, T)
        ref = (x.double() @ w.double().T + bias.double()).float()
        assert (alone - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("amx", [False, True], ids=["vector", "amx"])
def test_bf16_products_give_every_token_the_one_token_numbers(amx: bool) -> None:
    """A bf16 model's products (bf16 weights, bf16 activations): AVX512-BF16's vdpbf16ps tiles, or AMX
    tiles (quant/native/amx.c) where the CPU and the OS allow them. Whatever the path, a token's numbers
    must not depend on how many tokens share the call (1..20: past one 16-token tile pass) or on which
    16-row block a row falls in (row counts that leave a remainder, a matrix cut at another row), and
    K tails the tiles do not take go through the vector path for every T alike."""
    from localglm.layers.native import LayerLib, native

    lib, quant = native(), native_lib()
    assert lib is not None and quant is not None
    was = quant.amx
    if amx and not quant.set_amx(True):
        quant.set_amx(was)
        pytest.skip("this CPU or kernel gives no AMX tiles")
    try:
        quant.set_amx(amx)
        g = torch.Generator().manual_seed(7)
        for n, k in ((8, 32), (37, 64), (67, 256), (16, 48), (300, 128)):
            w = torch.randn(n, k, generator=g).to(torch.bfloat16)
            bias = torch.randn(n, generator=g)
            mat = LayerLib.describe_matrix(w, torch.bfloat16, bias)
            x = torch.randn(20, k, generator=g).to(torch.bfloat16).float()
            alone = torch.cat([lib.rows_linear(mat, x[t : t + 1], torch.bfloat16) for t in range(20)])
            for T in (2, 3, 4, 5, 16, 17, 20):
                assert torch.equal(lib.rows_linear(mat, x[:T], torch.bfloat16), alone[:T]), (n, k, T)
            if n > 16:  # rows 3.. as a matrix of their own: another 16-row split, the same numbers
                cut = LayerLib.describe_matrix(w[3:].contiguous(), torch.bfloat16, bias[3:].contiguous())
                assert torch.equal(lib.rows_linear(cut, x[:5], torch.bfloat16), alone[:5, 3:]), (n, k)
            ref = (x.double() @ w.double().T + bias.double()).float()
            assert (alone - ref).abs().max() <= 1e-2 * ref.abs().max()
    finally:
        quant.set_amx(was)


def test_gguf_blocks_as_stored_multi_token_forward_is_bit_identical_to_one_token_steps() -> None:
    """A GGUF K-quant mix (llama.cpp's quantizer; tests/data/README.md): its blocks, its q/k/v stack and
    its experts in one call for several tokens, each token's numbers a one-token call's (kq_matmul_q8's
    per-token results do not depend on the token count)."""
    net = localglm.load(str(Path(__file__).parent / "data" / "glm4_moe_kquant_mix.gguf")).net
    assert net._fused_decoder()._experts_in_ram()[1] is not None
    _assert_same(net)
