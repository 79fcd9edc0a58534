"""Checks against transformers shared by the architecture tests: logits within a tolerance of the
logit scale, greedy tokens equal to `generate`'s, and incremental / chunked decode equal to one full forward."""

from __future__ import annotations

from typing import Any

import torch

import localglm


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Max abs error within `tol` of the reference's largest logit."""
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x logit scale {scale:.3g}"


def kl_divergence(ref: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(ref || q) over positions, from logits."""
    lr, lq = ref.log_softmax(-1), q.log_softmax(-1)
    return float((lr.exp() * (lr - lq)).sum(-1).mean())


def assert_greedy_matches(ours: Any, hf: Any, prompt_len: int, new: int, seed: int = 3) -> None:
    """Our greedy stream equals transformers' greedy generate on a random prompt."""
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = list(ours.stream_tokens(prompt[0].tolist(), max_new_tokens=new, sampling=localglm.SamplingParams(temperature=0)))
    assert got == ref[0, prompt_len:].tolist()


def assert_cached_decode_matches(ours: Any, n: int, prefill: int, split: int, cache_type: type, seed: int = 2) -> Any:
    """Prefill `prefill` tokens then decode one at a time, and prefill in two chunks at `split`: both equal the
    full forward of the n tokens. Returns the first cache (for layout checks)."""
    net = ours.net
    ids = torch.randint(0, ours.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    full = ours.logits(ids)[0]
    with torch.inference_mode():
        cache = net.new_cache(32)
        assert isinstance(cache, cache_type)
        steps = [net.lm_head(net.hidden_states(ids[:, :prefill], cache, 0))[0]]
        for t in range(prefill, n):
            steps.append(net.lm_head(net.hidden_states(ids[:, t : t + 1], cache, t))[0])
        cache2 = net.new_cache(32)
        a = net.lm_head(net.hidden_states(ids[:, :split], cache2, 0))[0]
        b = net.lm_head(net.hidden_states(ids[:, split:], cache2, split))[0]
    assert_close(torch.cat(steps).float(), full)
    assert_close(torch.cat([a, b]).float(), full)
    return cache
