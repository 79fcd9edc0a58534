"""Our model math against transformers' Glm4MoeForCausalLM on the same random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import localglm
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "default": TinySpec(dtype="float32"),
    "plain": TinySpec(
        dtype="float32", use_qk_norm=False, attention_bias=False, first_k_dense_replace=0,
        n_shared_experts=0, norm_topk_prob=False, partial_rotary_factor=1.0, head_dim=24,
    ),
    "grouped": TinySpec(
        dtype="float32", num_hidden_layers=4, first_k_dense_replace=3, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, n_shared_experts=2, rope_style="parameters", use_qk_norm=False,
    ),
    "grouped-all-moe": TinySpec(
        dtype="float32", num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=16, num_experts_per_tok=3,
        n_group=2, topk_group=1, num_key_value_heads=1, routed_scaling_factor=1.0,
    ),
}


def _hf(path: Path) -> torch.nn.Module:
    m = transformers.Glm4MoeForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny(tmp_path_factory.mktemp(request.param) / "m", VARIANTS[request.param])
    return localglm.load(path, dtype="float32"), _hf(path)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} > 1e-4 x logit scale {scale:.3g}"


def test_logits_match_transformers(pair) -> None:
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    _assert_close(ours.logits(ids), ref)


def test_kv_cache_decode_matches_full_forward(pair) -> None:
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    full = ours.logits(ids)[0]
    net = ours.net
    cache = net.new_cache(32)
    with torch.inference_mode():
        pre = net.lm_head(net.hidden_states(ids[:, :5], cache, 0))[0]  # prefill 5, then decode one by one
        steps = [pre]
        for t in range(5, 12):
            steps.append(net.lm_head(net.hidden_states(ids[:, t : t + 1], cache, t))[0])
        # a chunked prefill after cached tokens uses the masked path
        cache2 = net.new_cache(32)
        a = net.lm_head(net.hidden_states(ids[:, :4], cache2, 0))[0]
        b = net.lm_head(net.hidden_states(ids[:, 4:], cache2, 4))[0]
    _assert_close(torch.cat(steps).float(), full)
    _assert_close(torch.cat([a, b]).float(), full)


def test_greedy_generation_matches_transformers(pair) -> None:
    ours, hf = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref[0, 7:].tolist()
    got = list(ours.stream_tokens(prompt[0].tolist(), max_new_tokens=32, sampling=localglm.SamplingParams(temperature=0)))
    assert got == ref_new


def test_bf16_checkpoint_close_to_fp32(tiny_dir: Path) -> None:
    """bf16 compute tracks the fp32 forward of the same bf16 weights (no dtype bug hides in casts)."""
    m16 = localglm.load(tiny_dir)
    m32 = localglm.load(tiny_dir, dtype=torch.float32)
    assert m16.dtype == torch.bfloat16
    ids = torch.randint(0, m16.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    a, b = m16.logits(ids), m32.logits(ids)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
